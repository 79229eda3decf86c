"""The default pipeline on a reduced world (the ``smoke`` profile), through the CLI, checked by what
it produced: summary, manifests, artifacts, cache behaviour, resume after a kill."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main as cli_main
from storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["sources", "benchmarks", "fit_teacher", "teacher_depth", "train_vqvae", "tokenize_depth", "curate",
          "base", "fit_sam2", "finetune", "evaluate"]


def _run(workdir: Path, *extra: str) -> dict:
    rc = cli_main(["run", "--config", "smoke", "--workdir", str(workdir), *extra])
    assert rc == 0
    runs = sorted((workdir / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((runs[-1] / "summary.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("e2e")
    return wd, _run(wd)


@pytest.mark.slow
def test_first_run_computes_every_stage(first_run):
    wd, summary = first_run
    assert list(summary["stages"]) == STAGES
    assert {s["status"] for s in summary["stages"].values()} == {"computed"}
    m = summary["metrics"]
    for name in ["teacher_depth.absrel_vs_true", "teacher_depth.pair_order_acc_vs_true",
                 "train_vqvae.recon_absrel", "train_vqvae.delta1", "train_vqvae.code_usage",
                 "train_vqvae.perplexity"]:
        assert name in m and np.isfinite(m[name]), name
    assert 0.0 <= m["train_vqvae.code_usage"] <= 1.0
    assert m["sources.coco_images"] == 24
    # the resolved config is written beside the run
    run_dir = wd / "runs" / summary["run_id"]
    assert "vqvae:" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_artifacts_and_lineage_in_the_store(first_run, capsys):
    wd, summary = first_run
    store = ArtifactStore(wd / "store")
    keys = {s: summary["stages"][s]["key"] for s in STAGES}
    vq = store.verify("train_vqvae", keys["train_vqvae"], digests=True)
    assert vq.inputs == {"sources": keys["sources"], "teacher_depth": keys["teacher_depth"]}
    assert {"model.safetensors", "config.json"} <= set(vq.files)
    assert vq.config["vqvae"]["codebook_size"] == 32 and vq.code["digest"]
    tok_dir = store.dir("tokenize_depth", keys["tokenize_depth"])
    tokens = np.load(tok_dir / "tokens.npy")
    digests = json.loads((tok_dir / "digests.json").read_text())
    assert tokens.shape == (len(digests), 100) and tokens.min() >= 0 and tokens.max() < 32
    # every training image (COCO + ADE) has a teacher map or a quarantine entry
    td = store.manifest("teacher_depth", keys["teacher_depth"])
    assert td.metrics["images"] + td.quarantine["count"] == summary["metrics"]["sources.coco_images"] + summary["metrics"]["sources.ade20k"]
    capsys.readouterr()
    assert cli_main(["lineage", "train_vqvae", "--config", "smoke", "--workdir", str(wd)]) == 0
    out = capsys.readouterr().out
    assert f"train_vqvae/{keys['train_vqvae']}" in out
    assert f"<- teacher_depth/{keys['teacher_depth']}" in out and f"<- sources/{keys['sources']}" in out


@pytest.mark.slow
def test_second_run_is_all_cached_then_vqvae_change_reruns_only_downstream(first_run, capsys, monkeypatch):
    wd, summary = first_run
    def no_model(*a, **k):
        raise AssertionError("a cached teacher stage must not load or fit a model")

    # the stage bodies import these where they run
    monkeypatch.setattr("perceptio_core.depth.teacher.write_teacher_maps", no_model)
    monkeypatch.setattr("perceptio_core.training.teacher_fit.fit_teacher", no_model)
    again = _run(wd)
    assert {s: r["status"] for s, r in again["stages"].items()} == {s: "cached" for s in STAGES}
    assert {s: r["key"] for s, r in again["stages"].items()} == {s: r["key"] for s, r in summary["stages"].items()}
    changed = _run(wd, "--set", "vqvae.steps=41")
    status = {s: r["status"] for s, r in changed["stages"].items()}
    assert status == {"sources": "cached", "benchmarks": "cached", "fit_teacher": "cached", "teacher_depth": "cached",
                      "train_vqvae": "computed", "tokenize_depth": "computed", "curate": "computed",
                      "base": "cached", "fit_sam2": "cached", "finetune": "computed", "evaluate": "computed"}
    capsys.readouterr()
    assert cli_main(["stages", "--config", "smoke", "--workdir", str(wd), "--set", "vqvae.steps=42"]) == 0
    out = capsys.readouterr().out
    assert "teacher_depth" in out and out.count("stale") == 5  # vqvae, tokenize, curate, finetune, evaluate


@pytest.mark.slow
def test_only_needs_its_upstream_in_the_store(tmp_path, capsys):
    rc = cli_main(["run", "--config", "smoke", "--workdir", str(tmp_path), "--only", "train_vqvae"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "stage sources is needed but not selected" in err and "not in the store" in err
    # an unknown stage is a clear error naming it
    assert cli_main(["run", "--config", "smoke", "--workdir", str(tmp_path), "--only", "nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import perceptio_core.depth.teacher as td
real = td.write_chunk
def write_then_die(*a, **k):
    real(*a, **k)
    if a[1] == 0:  # the first chunk is durable: die like a killed job
        os.kill(os.getpid(), signal.SIGKILL)
td.write_chunk = write_then_die
from flows.cli import main
sys.exit(main(["run", "--config", "smoke", "--workdir", {wd!r}, "--only", "teacher_depth"]))
"""


@pytest.mark.slow
def test_teacher_killed_half_way_resumes_without_recomputing(first_run, tmp_path):
    wd0, summary0 = first_run
    key = summary0["stages"]["teacher_depth"]["key"]
    # a workdir whose store has the upstream artifacts but not teacher_depth's
    wd = tmp_path / "killed"
    shutil.copytree(wd0 / "store", wd / "store", ignore=shutil.ignore_patterns("teacher_depth"))
    shutil.copytree(wd0 / "worlds", wd / "worlds")
    # the killed run computes with this process's thread count, as the first run did (the CLI's thread
    # default, exported by the in-process runs, would change the float sums)
    import torch

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(tmp_path / "killed.log", "w") as log:
        p = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), wd=str(wd))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            rc = p.wait(timeout=600)
        finally:  # the killed run's helpers (Prefect's temporary server) go with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    store = ArtifactStore(wd / "store")
    assert not store.has("teacher_depth", key)  # nothing trusted was published
    staged = sorted(x.name for x in (wd / "store" / "teacher_depth" / f".staging-{key}").iterdir())
    assert staged == ["maps-000000.json", "maps-000000.npy"]
    summary = _run(wd, "--only", "teacher_depth")
    td = summary["stages"]["teacher_depth"]
    assert td["status"] == "computed" and td["key"] == key
    assert td["metrics"]["resumed_chunks"] == 1
    # the resumed artifact holds the same maps as the uninterrupted run's
    a = store.dir("teacher_depth", key)
    b = ArtifactStore(wd0 / "store").dir("teacher_depth", key)
    for f in sorted(b.glob("maps-*.npy")):
        np.testing.assert_array_equal(np.load(a / f.name), np.load(f))


@pytest.mark.slow
def test_curated_shards_read_back_as_the_manifest(first_run):
    import pyarrow.parquet as pq

    from perceptio_core.curation.shards import read_shards

    wd, summary = first_run
    store = ArtifactStore(wd / "store")
    cur = store.dir("curate", summary["stages"]["curate"]["key"])
    manifest = pq.read_table(cur / "manifest.parquet").to_pylist()
    shards = sorted(str(p) for p in cur.glob("samples-*.tar"))
    samples = list(read_shards(shards))
    assert [s.key for s in samples] == [r["key"] for r in manifest]
    assert [s.source for s in samples] == [r["source"] for r in manifest]
    assert [s.has_depth for s in samples] == [r["has_depth"] for r in manifest]
    m = summary["metrics"]
    assert m["curate.samples_total"] == len(samples) > 0 and m["curate.shards"] == len(shards)
    refer = [s for s in samples if s.task == "refer_seg"]
    assert refer and all(s.target.startswith("[SEG]<d_start>") and len(s.depth_tokens) == 100 for s in refer)


@pytest.mark.slow
def test_finetune_and_evaluate_outputs(first_run):
    wd, summary = first_run
    store = ArtifactStore(wd / "store")
    ft = store.manifest("finetune", summary["stages"]["finetune"]["key"])
    assert "model/adapter/adapter_config.json" in ft.files and "model/heads.safetensors" in ft.files
    assert set(ft.inputs) == {"base", "fit_sam2", "curate", "teacher_depth", "train_vqvae"}
    fs = store.manifest("fit_sam2", summary["stages"]["fit_sam2"]["key"])
    assert "model/sam2.pt" in fs.files and set(fs.inputs) == {"sources"}
    m = summary["metrics"]
    assert 0.0 <= m["fit_sam2.holdout_point_miou"] <= 1.0 and m["fit_sam2.train_examples"] > 0
    for term in ["llm", "seg_bce", "seg_dice", "marker", "token", "count", "rec"]:
        assert np.isfinite(m[f"finetune.{term}_first"]) and np.isfinite(m[f"finetune.{term}_last"])
    for name in ["evaluate.refcoco.val.ciou", "evaluate.refcoco.val.giou", "evaluate.hardblink.mean.accuracy",
                 "evaluate.perception_block.wellformed", "evaluate.base.hardblink.mean.accuracy"]:
        assert name in m and 0.0 <= m[name] <= 1.0, name
    ev = store.dir("evaluate", summary["stages"]["evaluate"]["key"])
    report = (ev / "report" / "report.md").read_text()
    assert "| refcoco | val | ciou |" in report and "| hardblink | mean | accuracy |" in report
    assert list((ev / "report" / "figures").glob("*.png"))


@pytest.mark.slow
def test_infer_on_an_image_not_in_the_dataset(first_run, tmp_path, capsys):
    from PIL import Image

    wd, _ = first_run
    img = np.zeros((50, 70, 3), np.uint8)
    img[25:, :] = (90, 120, 60)  # a ground
    img[10:30, 20:40] = (220, 30, 30)  # a red square
    Image.fromarray(img).save(tmp_path / "new.png")
    capsys.readouterr()
    rc = cli_main(["infer", "--run", str(wd), "--image", str(tmp_path / "new.png"),
                   "--query", "the red box", "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "perception block: " in out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["image"].endswith("new.png") and "red box" in result["prompt"]
    # a bad image is a clear error naming the path
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert cli_main(["infer", "--run", str(wd), "--image", str(tmp_path / "bad.jpg"), "--query", "x",
                     "--out", str(tmp_path / "o2")]) == 2
    assert "bad.jpg" in capsys.readouterr().err


def _stale_stages(wd: Path, overrides: list[str], capsys) -> set[str]:
    """The stages ``perceptio stages --json`` reports stale under ``overrides``."""
    capsys.readouterr()
    assert cli_main(["stages", "--config", "smoke", "--workdir", str(wd), "--json",
                     *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("\n[") + 1:])
    return {r["stage"] for r in rows if not r["fresh"]}


@pytest.mark.slow
def test_a_benchmark_edit_reruns_evaluation_and_no_training_stage(first_run, tmp_path, capsys):
    """HardBLINK (or the VQA TSV) pointed at an edited copy: exactly the stages that read the
    benchmarks are stale (keys computed, nothing run), and a rerun recomputes only them, with the
    edited answer in what evaluate read."""
    from perceptio_core.config import load_config
    from perceptio_core.data.records import Benchmarks
    from tasks.data import world_dir
    from tasks.runner import compute_keys
    from tasks.stages import STAGES as SPECS

    wd, summary = first_run
    keys = {s: r["key"] for s, r in summary["stages"].items()}
    world = world_dir(load_config("smoke"), wd)
    benchmark_readers = {"benchmarks", "evaluate"}

    # HardBLINK: a copy with one answer changed
    hb = tmp_path / "HardBLINK"
    shutil.copytree(world / "HardBLINK", hb)
    answers = hb / "answers" / "blink_3pointscenter_answers.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    old = rows[0]["text"]
    rows[0]["text"] = "(B)" if old != "(B)" else "(A)"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ov = [f"data.hardblink={hb}"]
    assert _stale_stages(wd, ov, capsys) == benchmark_readers
    new = {s: k for s, (k, _) in compute_keys(load_config("smoke", ov), SPECS, wd).items()}
    assert {s for s in STAGES if new[s] != keys[s]} == benchmark_readers

    # a multiple-choice TSV: a copy with one answer changed (keys only)
    tsv = tmp_path / "mmbench.tsv"
    lines = (world / "vqa" / "mmbench_world.tsv").read_text().splitlines(keepends=True)
    header, row = lines[0].rstrip("\n").split("\t"), lines[1].split("\t")
    col = header.index("answer")
    row[col] = "B" if row[col] != "B" else "A"
    tsv.write_text(lines[0] + "\t".join(row) + "".join(lines[2:]))
    assert _stale_stages(wd, [f"data.mcq.mmbench={tsv}"], capsys) == benchmark_readers
    # another MCQ benchmark added beside it, and MME skipped (keys only)
    assert _stale_stages(wd, [f"data.mcq.seedbench={tsv}"], capsys) == benchmark_readers
    assert _stale_stages(wd, ["data.mme="], capsys) == benchmark_readers

    # the rerun computes the benchmark readers only; evaluate read the edited answer
    again = _run(wd, "--set", ov[0])
    assert {s for s, r in again["stages"].items() if r["status"] == "computed"} == benchmark_readers
    assert {s for s, r in again["stages"].items() if r["status"] == "cached"} == set(STAGES) - benchmark_readers
    bkey = again["stages"]["benchmarks"]["key"]
    store = ArtifactStore(wd / "store")
    bdir = store.dir("benchmarks", bkey)
    bench = Benchmarks.from_json((bdir / "benchmarks.json").read_text(), artifact=bdir)
    edited = next(r for r in bench.hardblink if r.qid == f"3pt/{rows[0]['question_id']}")
    assert edited.answer == rows[0]["text"] != old and edited.image_path.startswith(str(hb.resolve()))
    ev = store.manifest("evaluate", again["stages"]["evaluate"]["key"])
    assert ev.inputs["benchmarks"] == bkey and ev.inputs["finetune"] == keys["finetune"]
    assert again["metrics"]["benchmarks.hardblink"] == summary["metrics"]["benchmarks.hardblink"] > 0


@pytest.mark.slow
def test_missing_benchmarks_are_demanded_only_by_runs_that_reach_them(first_run, capsys):
    wd, _ = first_run
    gone = ["--set", f"data.hardblink={wd / 'no-hardblink'}", "--set", f"data.mcq.mmbench={wd / 'no.tsv'}"]
    # a training stage alone: the benchmarks are not read, so not demanded
    only = _run(wd, "--only", "teacher_depth", *gone)
    assert "benchmarks" not in only["stages"] and only["stages"]["teacher_depth"]["status"] == "cached"
    # the whole pipeline: one error naming both, each with the --set that skips it, before any stage
    capsys.readouterr()
    assert cli_main(["run", "--config", "smoke", "--workdir", str(wd), *gone]) == 2
    err = capsys.readouterr().err
    assert "2 datasets named by the config are missing" in err
    assert f"HardBLINK folder (data.hardblink) not found: {wd / 'no-hardblink'} (skip it: --set data.hardblink=)" in err
    assert (f"multiple-choice TSV 'mmbench' (data.mcq.mmbench) not found: {wd / 'no.tsv'} "
            "(skip it: --set data.mcq.mmbench=)") in err
    # skipped as the error says: evaluate runs without them (refer only)
    skipped = _run(wd, "--set", "data.hardblink=", "--set", "data.mcq.mmbench=", "--set", "data.mme=")
    assert skipped["stages"]["benchmarks"]["metrics"]["hardblink"] == 0
    assert skipped["stages"]["evaluate"]["status"] == "computed" and skipped["stages"]["finetune"]["status"] == "cached"
    assert not any(k.startswith(("evaluate.hardblink", "evaluate.mcq", "evaluate.mme")) for k in skipped["metrics"])


@pytest.mark.slow
def test_evaluation_in_two_processes_gives_the_single_process_metrics(first_run):
    """``evaluate.processes=2``: two torchrun CPU processes (gloo) generate disjoint shares of the
    predictions (the cache emptied first), the stage scores them: the metrics of the first run's
    one-process evaluation. Then a metric-only rerun: nothing is generated again."""
    import shutil

    wd, summary = first_run
    shutil.rmtree(wd / "cache" / "predictions")
    two = _run(wd, "--only", "evaluate", "--set", "evaluate.processes=2")
    assert two["stages"]["evaluate"]["status"] == "computed"
    chunks = sorted((wd / "cache" / "predictions").glob("chunk-*.json"))
    assert {p.name.split("-")[1] for p in chunks} == {"0000", "0001"}  # both ranks wrote their shares
    one = {k: v for k, v in summary["metrics"].items() if k.startswith("evaluate.")}
    got = {k: v for k, v in two["metrics"].items() if k.startswith("evaluate.")}
    assert got.keys() == one.keys()
    for k, v in one.items():
        assert got[k] == pytest.approx(v, abs=1e-3, nan_ok=True), k
    # every prediction is cached now: a bootstrap change re-scores without generating
    store = ArtifactStore(wd / "store")
    again = _run(wd, "--only", "evaluate", "--set", "evaluate.bootstrap=500")
    ev_dir = store.dir("evaluate", again["stages"]["evaluate"]["key"])
    report = (ev_dir / "report" / "report.md").read_text()
    assert "- perceptio.from_cache: " in report and "- perceptio.samples_per_s: 0.000" in report


@pytest.mark.slow
def test_a_copied_workdir_reads_itself_and_damage_is_found_and_recomputed(first_run, tmp_path, capsys):
    """Issue 19: a workdir copied elsewhere (the original out of reach) runs on its own store and
    world; bytes changed in an artifact (same size) are reported by ``perceptio verify`` and the
    next run moves the artifact aside and computes it again."""
    wd0, summary0 = first_run
    keys = {s: r["key"] for s, r in summary0["stages"].items()}
    wd = tmp_path / "copy"
    shutil.copytree(wd0 / "store", wd / "store", ignore=shutil.ignore_patterns("evaluate"))
    shutil.copytree(wd0 / "worlds", wd / "worlds")
    away = [(wd0 / "store", wd0 / "store.away"), (wd0 / "worlds", wd0 / "worlds.away")]
    for a, b in away:
        a.rename(b)
    try:
        again = _run(wd, "--only", "evaluate")
    finally:
        for a, b in away:
            b.rename(a)
    assert again["stages"]["evaluate"]["status"] == "computed"
    assert again["stages"]["evaluate"]["key"] == keys["evaluate"]
    same = [k for k in summary0["metrics"] if k.startswith(("evaluate.hardblink.", "evaluate.mcq.", "evaluate.refcoco."))
            and k.endswith(("accuracy", "ciou"))]
    assert len(same) >= 4 and any(k.startswith("evaluate.mcq.") for k in same)
    assert {k: again["metrics"][k] for k in same} == {k: summary0["metrics"][k] for k in same}
    assert str(wd0) not in (wd / "store" / "evaluate" / keys["evaluate"] / "manifest.json").read_text()

    td = wd / "store" / "teacher_depth" / keys["teacher_depth"]
    chunk = sorted(td.glob("maps-*.npy"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    capsys.readouterr()
    assert cli_main(["verify", "--config", "smoke", "--workdir", str(wd)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED teacher_depth/{keys['teacher_depth']}" in out and f"{chunk.name} fails its sha256" in out
    fixed = _run(wd, "--only", "teacher_depth")
    assert fixed["stages"]["teacher_depth"]["status"] == "computed"
    assert [p.name.split("-")[0] for p in (wd / "store" / "teacher_depth" / ".quarantine").iterdir()] == \
        [keys["teacher_depth"]]
    np.testing.assert_array_equal(np.load(td / chunk.name),
                                  np.load(wd0 / "store" / "teacher_depth" / keys["teacher_depth"] / chunk.name))
    assert cli_main(["verify", "--config", "smoke", "--workdir", str(wd)]) == 0
    assert "0 damaged" in capsys.readouterr().out


@pytest.mark.slow
def test_ablate_runs_a_variant_once_and_only_the_new_one_after(first_run):
    """Issue 20: ``perceptio ablate`` on the smoke run's workdir: the full model is all in the store,
    the variant fine-tunes and evaluates once; run again nothing is computed; another variant
    computes only its own fine-tuning and evaluation. The table holds every figure for both."""
    wd, summary = first_run

    def ablate(variants):
        assert cli_main(["ablate", "--config", "smoke", "--workdir", str(wd), "--variants", variants]) == 0
        out = sorted((wd / "ablations").iterdir())[-1]
        return json.loads((out / "ablation.json").read_text()), (out / "ablation.md").read_text()

    first, md = ablate("no_rec")
    assert first["variants"] == ["full", "no_rec"]
    assert first["runs"]["full"]["computed"] == []
    assert sorted(first["runs"]["no_rec"]["computed"]) == ["evaluate", "finetune"]
    assert first["runs"]["full"]["keys"]["finetune"] == summary["stages"]["finetune"]["key"]
    shared = set(summary["stages"]) - {"finetune", "evaluate"}
    assert {s: first["runs"]["no_rec"]["keys"][s] for s in shared} == {s: summary["stages"][s]["key"] for s in shared}
    metrics = {r["metric"] for r in first["rows"]}
    assert {"hardblink.3.accuracy", "hardblink.mean.accuracy"} <= metrics and any(m.endswith(".ciou") for m in metrics)
    for r in first["rows"]:
        assert set(r["values"]) == {"full", "no_rec"} and set(r["differences"]) == {"no_rec"}
        full = r["values"]["full"]
        assert full["lo"] <= full["value"] <= full["hi"] and full["n"] > 0
    assert "| HardBLINK | mean |" in md and "no_rec - full" in md
    again, _ = ablate("no_rec")
    assert [again["runs"][v]["computed"] for v in ("full", "no_rec")] == [[], []]
    assert again["rows"] == first["rows"]
    other, _ = ablate("no_dtok")
    assert other["runs"]["full"]["computed"] == [] and sorted(other["runs"]["no_dtok"]["computed"]) == ["evaluate",
                                                                                                        "finetune"]
