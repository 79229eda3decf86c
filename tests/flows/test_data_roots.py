"""A data root holds what it holds (issue 17): the datasets a run needs that the root lacks are named
in one error, each with the ``--set`` that skips it, before any stage runs; the defaults demand only
what the chosen stages read (captions only for the offline base fit, the benchmarks only for
``benchmarks``/``evaluate``); a RefCOCO-only root (REFER trees + COCO images, copied from the tiny
world) runs the training stages' input with the listed ``--set`` lines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perceptio_core.config import load_config
from perceptio_core.data.records import MissingDataError
from tasks.runner import compute_keys
from tasks.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]  # the repository root
TRAINING_STAGES = [s for s in STAGES if s.name not in {"benchmarks", "evaluate"}]


def refcoco_only_root(world: Path, dest: Path) -> Path:
    """REFER's three trees and their COCO images, nothing else (no ADE20k, captions, LLaVA file,
    HardBLINK, VQA TSV, true depth)."""
    shutil.copytree(world / "images" / "train2014", dest / "images" / "train2014")
    for ds in ("refcoco", "refcoco+", "refcocog"):
        shutil.copytree(world / ds, dest / ds)
    return dest


def _skips(message: str) -> dict[str, list[str]]:
    """``{config key: the --set overrides the error suggests}`` from an error's lines."""
    out = {}
    for line in message.splitlines():
        m = re.search(r"\((data\.[a-z0-9_.]+)[,)].* \(skip it: (.+)\)$", line)
        if m:
            out[m.group(1)] = [s.strip().strip("'") for s in m.group(2).split("--set ") if s.strip()]
    return out


def test_only_what_the_chosen_stages_read_is_demanded(tiny_world, tmp_path):
    root = refcoco_only_root(tiny_world, tmp_path / "refcoco-only")
    ov = [f"data.root={root}"]
    with pytest.raises(MissingDataError) as info:
        compute_keys(load_config("smoke", ov), STAGES, tmp_path / "w")
    assert set(_skips(str(info.value))) == {"data.captions", "data.ade20k", "data.llava_json", "data.glamm_json",
                                            "data.hardblink", "data.mcq.mmbench", "data.mme"}
    # the training stages alone: the benchmarks are not demanded
    with pytest.raises(MissingDataError) as info:
        compute_keys(load_config("smoke", ov), TRAINING_STAGES, tmp_path / "w")
    assert set(_skips(str(info.value))) == {"data.captions", "data.ade20k", "data.llava_json", "data.glamm_json"}
    # captions feed only the offline base: with a released base they are neither demanded nor keyed
    released = ov + ["model.base=OpenGVLab/InternVL2_5-1B-MPO-hf", "model.sam2_checkpoint=facebook/sam2.1-hiera-tiny"]
    with pytest.raises(MissingDataError) as info:
        compute_keys(load_config("smoke", released), TRAINING_STAGES, tmp_path / "w")
    assert set(_skips(str(info.value))) == {"data.ade20k", "data.llava_json", "data.glamm_json"}
    skip = ["data.ade20k=", "data.llava_json=", "data.glamm_json="]
    a = compute_keys(load_config("smoke", released + skip), TRAINING_STAGES, tmp_path / "w")
    b = compute_keys(load_config("smoke", released + skip + ["data.captions=elsewhere.json"]), TRAINING_STAGES,
                     tmp_path / "w")
    assert a == b and a["sources"][1]["config"]["data.captions"] == ""


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    """``perceptio ARGV`` in a process of its own: a flow run inside a test that captures stderr
    would leave Prefect's console handler bound to the captured (then closed) stream, and every
    later in-process flow of the session would fail logging to it."""
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_refcoco_only_root_runs_its_sources_with_the_listed_sets(tiny_world, tmp_path):
    root = refcoco_only_root(tiny_world, tmp_path / "refcoco-only")
    run = ["run", "--config", "smoke", "--workdir", str(tmp_path / "w"), "--set", f"data.root={root}"]
    r = _cli(run)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr
    assert "perceptio: error: 7 datasets named by the config are missing:" in err
    err = err[err.index("perceptio: error:"):]  # what the CLI printed (Prefect's log comes before it)
    skips = _skips(err)
    assert skips == {"data.captions": ["data.captions="], "data.ade20k": ["data.ade20k="],
                     "data.llava_json": ["data.llava_json="], "data.glamm_json": ["data.glamm_json="],
                     "data.hardblink": ["data.hardblink="],
                     "data.mcq.mmbench": ["data.mcq.mmbench="], "data.mme": ["data.mme="]}
    for key, path in [("data.ade20k", root / "ADEChallengeData2016"), ("data.hardblink", root / "HardBLINK"),
                      ("data.mcq.mmbench", root / "vqa" / "mmbench_world.tsv"),
                      ("data.mme", root / "MME_Benchmark_release_version")]:
        assert f"({key}) not found: {path} (skip it: --set {key}=)" in err
    sets = [a for k in ("data.captions", "data.ade20k", "data.llava_json", "data.glamm_json")
            for s in skips[k] for a in ("--set", s)]
    # the training sets alone suffice for a training stage; every key of the training stages computes
    r = _cli(run + sets + ["--only", "sources"])
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((tmp_path / "w" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    summary = json.loads((runs[-1] / "summary.json").read_text())
    src = summary["stages"]["sources"]
    assert src["status"] == "computed" and src["quarantine"]["count"] == 0
    assert src["metrics"]["coco_images"] == 24 and src["metrics"]["ade20k"] == 0 and src["metrics"]["captions"] == 0
    assert {"refs.refcoco", "refs.refcoco+", "refs.refcocog"} <= set(src["metrics"])
    cfg = load_config("smoke", [f"data.root={root}", *sets[1::2]])
    assert compute_keys(cfg, TRAINING_STAGES, tmp_path / "w")["sources"][0] == src["key"]
