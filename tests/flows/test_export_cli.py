"""``perceptio export`` and ``perceptio infer --model`` through ``flows.cli.main``.

The run is laid out as a pipeline run leaves it (no pipeline is run here, it would take minutes):
an artifact store written through ``ArtifactWriter`` with manifests as ``tasks.runner`` writes them
(sources -> train_vqvae -> finetune -> evaluate; the finetune artifact's ``model/`` is a tiny
trained ``PerceptioModel``, the evaluate artifact holds ``metrics.json``) and
``<workdir>/runs/<id>/summary.json`` as ``flows.pipeline`` writes it. The full pipeline's own
``infer --run`` is tested in tests/flows/test_pipeline_e2e.py."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import lineage_rows, main as cli_main, resolve_run, run_metrics
from storage import ArtifactStore, Manifest
from tasks.runner import flatten

from perceptio_helpers import build_tiny, one_torch_thread  # noqa: F401

KEYS = {"sources": "src0001", "train_vqvae": "vq0002", "finetune": "ft0003", "evaluate": "ev0004"}
INPUTS = {"sources": {}, "train_vqvae": {"sources": KEYS["sources"]},
          "finetune": {"sources": KEYS["sources"], "train_vqvae": KEYS["train_vqvae"]},
          "evaluate": {"finetune": KEYS["finetune"], "sources": KEYS["sources"]}}  # fmt: skip
METRICS = {"sources": {"coco_images": 24}, "train_vqvae": {"delta1": 0.9},
           "finetune": {"llm_first": 4.5, "llm_last": 1.5, "steps": 2},
           "evaluate": {"refcoco": {"val": {"ciou": 0.25, "giou": 0.3}}, "hardblink": {"mean": {"accuracy": 0.5}}}}  # fmt: skip
RUN_ID = "20261203-000000-abcdef"
# the README's lines for these commands (tests/test_readme.py: RUN_BY maps them to
# test_readme_export_and_infer_model_commands below)
README_EXPORT = "perceptio export --run perceptio-work --out perceptio-model --merge"
README_INFER = 'perceptio infer --model perceptio-model --image photo.jpg --query "the red ball" --out answer/'


def _commit(store: ArtifactStore, stage: str, fill) -> Manifest:
    w = store.writer(stage, KEYS[stage])
    fill(w)
    config = {"model": {"lora_rank": 16}, "finetune": {"steps": 2}} if stage == "finetune" else {stage: {"x": 1}}
    return w.commit(Manifest(stage=stage, key=KEYS[stage], url="", inputs=INPUTS[stage], config=config,
                             config_digest=f"cfg-{stage}", code={"digest": f"code-{stage}", "git_commit": "0123abcd"},
                             metrics=METRICS[stage], produced_by={"run_id": RUN_ID}))  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir whose store and summary look like a finished run's."""
    wd = tmp_path_factory.mktemp("workdir")
    store = ArtifactStore(wd / "store")
    model = build_tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" model: LoRA and new rows off their initialisation
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(wd / "cache" / "model")
    _commit(store, "sources", lambda w: w.write_json("index.json", {"images": 24}))
    _commit(store, "train_vqvae", lambda w: w.write_json("config.json", {}))
    _commit(store, "finetune", lambda w: w.add_tree(wd / "cache" / "model", "model"))
    _commit(store, "evaluate", lambda w: w.write_json("metrics.json", METRICS["evaluate"]))
    stages = {s: {"key": k, "url": store.artifact_url(s, k), "status": "computed", "metrics": METRICS[s]}
              for s, k in KEYS.items()}  # fmt: skip
    summary = {"run_id": RUN_ID, "flow_run_id": None, "workdir": str(wd), "store": store.url, "wall_s": 1.0,
               "stages": stages,
               "metrics": {f"{s}.{k}": v for s in stages for k, v in flatten(METRICS[s]).items()}}  # fmt: skip
    (wd / "runs" / RUN_ID).mkdir(parents=True)
    (wd / "runs" / RUN_ID / "summary.json").write_text(json.dumps(summary))
    return wd


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    img = np.zeros((50, 70, 3), np.uint8)
    img[25:, :] = (90, 120, 60)
    img[10:30, 20:40] = (220, 30, 30)
    path = tmp_path_factory.mktemp("img") / "new.png"
    Image.fromarray(img).save(path)
    return path


def test_the_run_record_metrics_and_lineage_from_each_form_of_run(run):
    store_dir = run / "store" / "finetune" / KEYS["finetune"]
    for arg in (run, run / "runs" / RUN_ID, store_dir, store_dir / "model"):
        rec = resolve_run(arg)
        assert rec.finetune_key == KEYS["finetune"] and rec.model_dir.resolve() in {store_dir, store_dir / "model"}, arg
        m = run_metrics(rec)  # from the summary's evaluate stage, or found in the store by its finetune input
        assert m["finetune.llm_last"] == 1.5 and m["evaluate.refcoco.val.ciou"] == 0.25, arg
    rows = lineage_rows(resolve_run(run).store, "finetune", KEYS["finetune"])
    assert [(r["stage"], r["key"]) for r in rows] == [("finetune", KEYS["finetune"]), ("sources", KEYS["sources"]),
                                                      ("train_vqvae", KEYS["train_vqvae"])]  # fmt: skip
    assert rows[0]["config_digest"] == "cfg-finetune" and rows[0]["code_digest"] == "code-finetune"
    assert rows[0]["inputs"] == [f"sources/{KEYS['sources']}", f"train_vqvae/{KEYS['train_vqvae']}"]
    assert rows[0]["git_commit"] == "0123abcd" and rows[0]["run_id"] == RUN_ID


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_export_then_infer_model_from_the_export_alone(run, image, tmp_path, capsys, monkeypatch, merge):
    out = tmp_path / "exported"
    # the README's form: perceptio export --run perceptio-work --out perceptio-model [--merge]
    argv = ["export", "--run", str(run), "--out", str(out)] + (["--merge"] if merge else [])
    capsys.readouterr()
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "reload check:" in printed and f"perceptio infer --model {out}" in printed
    record = json.loads((out / "export.json").read_text())
    assert record["merged"] is merge and record["source"]["finetune_key"] == KEYS["finetune"]
    assert record["metrics"]["evaluate.hardblink.mean.accuracy"] == 0.5 and record["metrics"]["finetune.llm_first"] == 4.5
    assert [r["stage"] for r in record["lineage"]] == ["finetune", "sources", "train_vqvae"]
    assert record["config"] == {"model": {"lora_rank": 16}, "finetune": {"steps": 2}}  # the finetune artifact's
    card = (out / "model_card.md").read_text()
    assert "| evaluate.refcoco.val.ciou | 0.25 |" in card and f"| finetune | {KEYS['finetune']} | cfg-finetune |" in card
    assert (out / "adapter").is_dir() is not merge

    # moved away from the store, which is gone too: the export alone answers
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(str(out), str(moved))
    shutil.copytree(run, tmp_path / "workdir-backup")  # the module's other tests still need the run
    shutil.rmtree(run / "store")
    try:
        monkeypatch.chdir(tmp_path / "elsewhere")
        capsys.readouterr()
        rc = cli_main(["infer", "--model", "model", "--image", str(image), "--query", "the red box",
                       "--out", str(tmp_path / "answer"), "--max-new-tokens", "12"])  # fmt: skip
        assert rc == 0
        printed = capsys.readouterr().out
        assert printed.startswith("answer: ") and "perception block: " in printed
        result = json.loads((tmp_path / "answer" / "result.json").read_text())
        assert result["image"].endswith("new.png") and "red box" in result["prompt"]
        assert Path(result["model"]) == moved.resolve()
    finally:
        shutil.rmtree(run / "store", ignore_errors=True)
        shutil.copytree(tmp_path / "workdir-backup" / "store", run / "store")


def test_infer_takes_exactly_one_of_run_and_model(run, image, tmp_path, capsys):
    for argv in (["infer", "--image", str(image), "--query", "x"],
                 ["infer", "--run", str(run), "--model", str(run), "--image", str(image), "--query", "x"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2
    assert "--run" in capsys.readouterr().err
    assert cli_main(["infer", "--model", str(tmp_path), "--image", str(image), "--query", "x"]) == 2
    assert "no saved Perceptio model" in capsys.readouterr().err


def test_a_tampered_export_and_an_existing_out_are_refused(run, image, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli_main(["export", "--run", str(run / "runs" / RUN_ID), "--out", str(out), "--no-reload-check"]) == 0
    assert json.loads((out / "export.json").read_text())["check"] == {}
    capsys.readouterr()
    assert cli_main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    cfg = out / "depth_tokenizer" / "config.json"
    cfg.write_text(cfg.read_text().replace("}", ' }', 1))
    assert cli_main(["infer", "--model", str(out), "--image", str(image), "--query", "x",
                     "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "depth_tokenizer/config.json" in err and "export fails its manifest" in err
    assert not (tmp_path / "o").exists()
    assert cli_main(["export", "--run", str(run), "--out", str(out), "--force"]) == 0  # replaced by a good one
    assert cli_main(["infer", "--model", str(out), "--image", str(image), "--query", "x",
                     "--out", str(tmp_path / "o"), "--max-new-tokens", "4"]) == 0  # fmt: skip


def test_readme_export_and_infer_model_commands(run, image, tmp_path, monkeypatch, capsys):
    """The README's ``perceptio export`` and ``perceptio infer --model`` lines, run as written (the
    workdir ``perceptio-work`` is this module's run, ``photo.jpg`` a new picture); a README that shows
    other lines of these commands fails here until this test runs them."""
    from test_readme import readme_commands

    shown = {c for c, _ in readme_commands() if c.startswith(("perceptio export", "perceptio infer --model"))}
    assert shown <= {README_EXPORT, README_INFER}, f"run these README lines in this test: {shown}"
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(image, tmp_path / "photo.jpg")
    export = shlex.split(README_EXPORT.replace("perceptio-work", str(run)))
    assert cli_main(export[1:]) == 0
    assert json.loads((tmp_path / "perceptio-model" / "export.json").read_text())["merged"] is True
    capsys.readouterr()
    assert cli_main(shlex.split(README_INFER)[1:]) == 0
    assert capsys.readouterr().out.startswith("answer: ")
    result = json.loads((tmp_path / "answer" / "result.json").read_text())
    assert "the red ball" in result["prompt"] and Path(result["model"]) == (tmp_path / "perceptio-model").resolve()
