"""docs/custom-data.md: training on a dataset of one's own. The doc's worked example is run as the
doc has it: its ``python`` block is ``docs/examples/custom-data/make_dataset.py`` character for
character, and its ``bash`` blocks run verbatim in a fresh folder (``perceptio`` and ``python3``
there are this checkout's); the run reads the custom REFER dataset, the LLaVA and GCG files,
curates them and scores the custom val split, with the counts the doc states and nothing
quarantined. The format examples of the doc are what the script writes, and read back through the
pipeline's own readers."""

from __future__ import annotations

import collections
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from perceptio_core.config import CurateConfig
from perceptio_core.curation.inputs import CurateStats
from perceptio_core.curation.instructions import glamm_samples, llava_samples
from perceptio_core.curation.shards import read_shards
from perceptio_core.data.masks import decode_mask
from perceptio_core.data.records import Sources
from perceptio_core.data.refer import ann_to_mask, load_refs, read_refer
from perceptio_core.format.tokens import SEG

ROOT = Path(__file__).resolve().parents[2]  # the repository root
DOC = ROOT / "docs" / "custom-data.md"
SCRIPT = ROOT / "docs" / "examples" / "custom-data" / "make_dataset.py"


def _blocks(lang: str) -> list[str]:
    """The doc's fenced blocks of one language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def _make_dataset(out: Path) -> None:
    runpy.run_path(str(SCRIPT), run_name="make_dataset")["main"](str(out))


def test_the_doc_shows_the_script_the_test_runs():
    python = _blocks("python")
    assert SCRIPT.read_text() in python, "the worked example's python block differs from make_dataset.py"
    assert len(python) == 2  # the refs example and the script


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_the_format_examples_are_what_the_script_writes_and_read_back(tmp_path, monkeypatch):
    data = tmp_path / "my-data"
    _make_dataset(data)
    instances, llava, gcg, samples = (json.loads(b) for b in _blocks("json"))
    written = json.loads((data / "shapes" / "instances.json").read_text())
    assert instances["images"] == written["images"][:1]
    assert instances["annotations"] == written["annotations"][:2]
    assert instances["categories"] == [{"id": c["id"], "name": c["name"]} for c in written["categories"]]
    conversations = json.loads((data / "conversations.json").read_text())
    assert llava == [conversations[0], conversations[-1]]
    assert gcg == json.loads((data / "grounded.json").read_text())[:1]
    assert set(samples) == {"shapes", "depth_cot", "llava", "glamm"}

    # the examples alone, as a user would copy them, through the readers the pipeline uses
    example = tmp_path / "example"
    (example / "shapes").mkdir(parents=True)
    (example / "images").mkdir()
    Image.new("RGB", (96, 64), (150, 150, 150)).save(example / "images" / "shapes_0000.jpg")
    (example / "shapes" / "instances.json").write_text(json.dumps(instances))
    monkeypatch.chdir(example / "shapes")
    refs_block = next(b for b in _blocks("python") if b != SCRIPT.read_text())
    exec(compile(refs_block, "docs/custom-data.md (refs example)", "exec"), {})
    refs = load_refs(example / "shapes" / "refs(unc).p")
    assert refs[0] == load_refs(data / "shapes" / "refs(unc).p")[0]
    res = read_refer(example / "shapes", example / "images", "shapes", "unc")
    assert res.quarantine == []
    assert [(r.ref_id, r.sentence, r.category) for r in res.refs] == [
        (1, "the blue triangle", "triangle"), (1, "the triangle on the left", "triangle"),
        (2, "the green circle", "circle")]
    circle = instances["annotations"][1]
    assert int(ann_to_mask(circle["segmentation"], 64, 96).sum()) == circle["area"]  # the RLE is the mask

    (example / "conversations.json").write_text(json.dumps(llava))
    (example / "grounded.json").write_text(json.dumps(gcg))
    stats = CurateStats()
    got = list(llava_samples(str(example / "conversations.json"), None, {}, stats))
    assert [(len(s.turns), bool(s.image)) for s in got] == [(2, True), (1, False)]  # the text-only one kept
    got = list(glamm_samples(str(example / "grounded.json"), None, {}, CurateConfig(), {}, stats))
    assert len(got) == 1 and len(got[0].masks_rle) == 2 and got[0].target.count(SEG) == 2
    assert sum(stats.dropped.values()) == 0


def _shims(bin_dir: Path) -> dict[str, str]:
    """``perceptio`` and ``python3`` on PATH as this checkout's CLI and interpreter."""
    bin_dir.mkdir()
    cli = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    (bin_dir / "perceptio").write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{cli}" "$@"\n')
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_the_worked_example_trains_on_its_own_dataset(tmp_path):
    (tmp_path / "make_dataset.py").write_text(SCRIPT.read_text())
    script = "\n".join(_blocks("bash"))
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=_shims(tmp_path / "bin"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "my-data: 16 images, 48 refs (36 train, 12 val), 13 conversations, 12 grounded captions" in r.stdout
    summary = json.loads(Path(tmp_path, re.search(r"^summary: (.+)$", r.stdout, re.M).group(1)).read_text())
    stages = summary["stages"]
    assert all(s["status"] == "computed" and s["quarantine"]["count"] == 0 for s in stages.values())

    # what the doc says the summary shows: each stage line's status, quarantine and headline figures
    table = {line.split()[0]: line for line in r.stdout.splitlines() if line.split()[:1] and line.split()[0] in stages}
    for line in _blocks("text")[0].splitlines()[1:]:
        name, status, _key, _wall, quarantined, *metrics = line.replace(",", " ").split()
        got = table[name].replace(",", " ").split()
        assert got[1] == status and got[4] == quarantined, (line, table[name])
        assert set(metrics) <= set(got[5:]), (line, table[name])

    # sources: the custom REFER dataset per split (sentences, refs), its 16 images
    store = Path(summary["store"])
    sources = Sources.from_json((store / "sources" / stages["sources"]["key"] / "sources.json").read_text())
    assert sources.quarantine == [] and len(sources.coco_images) == 16
    assert {r.dataset for r in sources.refs} == {"shapes"}
    assert collections.Counter(r.split for r in sources.refs) == {"train": 72, "val": 24}
    assert collections.Counter(s for s, _ in {(r.split, r.ref_id) for r in sources.refs}) == {"train": 36, "val": 12}

    # curate: the samples per source the doc shows, nothing dropped or quarantined
    cur = stages["curate"]["metrics"]
    assert cur["samples"] == json.loads(_blocks("json")[3]) and cur["dropped_total"] == 0
    art = store / "curate" / stages["curate"]["key"]
    assert pq.read_table(art / "quarantine.parquet").num_rows == 0
    manifest = pq.read_table(art / "manifest.parquet").to_pylist()
    assert collections.Counter((m["source"], m["task"]) for m in manifest) == {
        ("shapes", "refer_seg"): 12, ("depth_cot", "depth_cot"): 72, ("llava", "instruct"): 13,
        ("glamm", "grounded_conv"): 12}
    # each custom sample: 3 to 5 rounds, one mask per round, the annotation's mask, with depth tokens
    instances = json.loads((tmp_path / "my-data" / "shapes" / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    shards = sorted(str(p) for p in art.glob("*.tar"))
    custom = [s for s in read_shards(shards) if s.source == "shapes"]
    assert len(custom) == 12 and {s.split for s in custom} == {"train"}
    for s in custom:
        rounds = s.meta["rounds"]
        assert 3 <= len(rounds) == len(s.masks_rle) == len(s.turns) <= 5 and len(s.depth_tokens) == 100
        for rnd, rle in zip(rounds, s.masks_rle):
            truth = ann_to_mask(anns[rnd["ann_id"]]["segmentation"], 64, 96).astype(bool)
            assert np.array_equal(decode_mask(rle), truth), (s.key, rnd)

    # evaluate scored the custom val split
    assert summary["metrics"]["evaluate.shapes.val.n"] >= 1
    assert "evaluate.shapes.val.ciou" in summary["metrics"]
