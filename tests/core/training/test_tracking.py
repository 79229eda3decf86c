"""Experiment tracking (issue 21): a fit through the one training loop writes its history to
TensorBoard (every loss term and the lr at the step the history records, equal within float32
tolerance), a resumed fit logs its whole curve, a stage's metrics join its run, ``run.trackers: []``
writes nothing, and a tracker asked for but not installed stops with the pip command."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import yaml

from perceptio_core.config import TrainLoopConfig, load_config, to_dict
from perceptio_core.training import tracking as tracking_mod
from perceptio_core.training.trainer import Trainer, read_history, run_training
from perceptio_core.training.tracking import (
    TrackerUnavailableError,
    TrackingSpec,
    flat_hparams,
    numeric_metrics,
    tracking_scope,
)

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from test_trainer import ToyTask  # noqa: E402  (the trainer tests' toy task)

TERMS = ("loss", "mse", "l1")


def TinyTask() -> ToyTask:  # noqa: N802  (the trainer tests' toy task: two logged terms besides the total)
    return ToyTask(n=20, dropout=0.0)


def _loop(**kw) -> TrainLoopConfig:
    base = dict(steps=7, batch_size=4, grad_accum=1, lr=0.05, num_workers=0, checkpoint_every=3, warmup_frac=0.3)
    return TrainLoopConfig(**{**base, **kw})


def _spec(tmp_path, run_id="run-a") -> TrackingSpec:
    cfg = load_config("smoke")
    return TrackingSpec.for_stage(cfg, run_id, "fit_tiny", key="k0123", workdir=tmp_path / "work")


def _scalars(logdir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _assert_matches_history(scalars, rows):
    steps = [r["step"] for r in rows]
    for term in (*TERMS, "lr"):
        got = scalars[f"train/{term}"]
        assert sorted(got) == steps, term
        for r in rows:
            assert got[r["step"]] == pytest.approx(r[term], rel=1e-6, abs=1e-7), (term, r["step"])


def test_a_tracked_fit_writes_every_loss_term_and_the_lr_at_its_step(tmp_path):
    spec = _spec(tmp_path)
    out = tmp_path / "fit"
    run_training(TinyTask(), _loop(), out, device="cpu", tracking=spec)
    rows = read_history(out / "history.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 8))
    logdir = tmp_path / "work" / "tracking" / "run-a" / "fit_tiny"
    assert spec.logdir() == logdir and list(logdir.glob("events.out.tfevents.*"))
    scalars = _scalars(logdir)
    _assert_matches_history(scalars, rows)
    assert len({round(v, 8) for v in scalars["train/lr"].values()}) > 3  # warm-up then cosine, not flat
    assert all(v > 0 for v in scalars["train/samples_per_s"].values())
    assert sorted(scalars["train/grad_norm"]) == list(range(1, 8))
    # hyper-parameters: the resolved config flat, the loop as run, and the run id and store key
    hp_files = list(logdir.glob("*/hparams.yml"))
    assert len(hp_files) == 1
    hp = yaml.safe_load(hp_files[0].read_text())
    assert hp["run_id"] == "run-a" and hp["key"] == "k0123" and hp["stage"] == "fit_tiny"
    assert hp["vqvae.codebook_size"] == load_config("smoke").vqvae.codebook_size
    assert hp["loop.steps"] == 7 and hp["task"] == "toy" and hp["run.trackers"] == '["tensorboard"]'
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
    assert not any("+" in k for k in hp)  # data.refer_split_by.refcoco+ made tracker-safe


def test_a_resumed_fit_logs_its_whole_curve_in_the_new_run(tmp_path):
    out = tmp_path / "fit"
    first = Trainer(TinyTask(), _loop(), out, device="cpu", tracking=_spec(tmp_path, "run-a"))
    first.setup()
    first.resume()
    first.train(stop_at=5)  # "killed" after step 5; the checkpoint at step 3 is the last
    first.end_tracking()
    run_training(TinyTask(), _loop(), out, device="cpu", tracking=_spec(tmp_path, "run-b"))
    rows = read_history(out / "history.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 8))
    _assert_matches_history(_scalars(tmp_path / "work" / "tracking" / "run-b" / "fit_tiny"), rows)
    assert sorted(_scalars(tmp_path / "work" / "tracking" / "run-a" / "fit_tiny")["train/loss"]) == [1, 2, 3, 4, 5]


def test_the_current_scope_is_tracked_and_no_spec_or_no_trackers_writes_nothing(tmp_path):
    work = tmp_path / "work"
    run_training(TinyTask(), _loop(steps=2), tmp_path / "a", device="cpu")  # no scope: nothing
    spec_off = TrackingSpec.for_stage(load_config("smoke", ["run.trackers=[]"]), "run-a", "fit_tiny", workdir=work)
    with tracking_scope(spec_off):
        run_training(TinyTask(), _loop(steps=2), tmp_path / "b", device="cpu")
    assert not (work / "tracking").exists()
    with tracking_scope(_spec(tmp_path, "run-c")):
        run_training(TinyTask(), _loop(steps=2), tmp_path / "c", device="cpu")
    assert sorted(_scalars(work / "tracking" / "run-c" / "fit_tiny")["train/mse"]) == [1, 2]


def test_a_stage_run_through_the_runner_tracks_its_loop_and_its_metrics(tmp_path):
    from tasks.runner import RunContext, StageOutput, StageSpec, execute_stage

    def body(ctx):
        metrics = run_training(TinyTask(), _loop(steps=3), tmp_path / "scratch" / ctx.run.run_id, device="cpu")
        return StageOutput(metrics={**metrics, "eval": {"refcoco+": {"ciou": 0.25}}, "note": "text", "ok": True})

    spec = StageSpec(name="fit_tiny", upstream=(), sections=(), body=body)
    material = {"config": {}, "code": "0" * 16, "upstream": {}}
    log = logging.getLogger("test_tracking")
    for run_id, overrides in (("run-on", []), ("run-off", ["run.trackers=[]"])):
        cfg = load_config("smoke", [f"run.workdir={tmp_path / 'work'}", *overrides])
        run = RunContext(cfg=cfg, workdir=tmp_path / "work", run_id=run_id, force=frozenset({"fit_tiny"}))
        ref, manifest = execute_stage(spec, run, f"key-{run_id}", material, {}, log)
        assert ref.status == "computed"
    runs = tmp_path / "work" / "tracking"
    assert sorted(p.name for p in runs.iterdir()) == ["run-on"]  # trackers [] wrote nothing
    scalars = _scalars(runs / "run-on" / "fit_tiny")
    assert sorted(scalars["train/loss"]) == [1, 2, 3]
    assert scalars["stage/loss_last"] == {3: pytest.approx(manifest.metrics["loss_last"], rel=1e-6)}
    assert scalars["stage/eval.refcoco_.ciou"] == {3: 0.25}
    assert not any(t.startswith(("stage/note", "stage/ok")) for t in scalars)
    hp = yaml.safe_load(next((runs / "run-on" / "fit_tiny").glob("*/hparams.yml")).read_text())
    assert hp["key"] == "key-run-on" and hp["run.workdir"] == str(tmp_path / "work")


def test_a_tracker_asked_for_but_not_installed_names_the_key_and_the_pip_command(tmp_path, monkeypatch):
    real = tracking_mod._installed
    monkeypatch.setattr(tracking_mod, "_installed", lambda p: False if p in ("wandb", "mlflow") else real(p))
    spec = TrackingSpec.for_stage(load_config("smoke", ["run.trackers=[tensorboard, wandb]"]), "r", "fit_tiny",
                                  workdir=tmp_path / "work")  # fmt: skip
    with pytest.raises(TrackerUnavailableError, match=r"run\.trackers asks for wandb.*pip install wandb"):
        run_training(TinyTask(), _loop(steps=2), tmp_path / "fit", device="cpu", tracking=spec)
    assert not (tmp_path / "fit").exists()  # stopped before anything ran

    from tasks.runner import RunContext
    from tasks.tracking import stage_tracking

    cfg = load_config("smoke", ["run.trackers=[mlflow]"])
    with pytest.raises(TrackerUnavailableError, match=r"run\.trackers asks for mlflow.*pip install mlflow"):
        stage_tracking(RunContext(cfg=cfg, workdir=tmp_path / "work", run_id="r"), "fit_tiny", "k")


def test_wandb_gets_the_project_run_name_tags_config_and_steps(tmp_path, monkeypatch):
    """A stand-in ``wandb`` module records what accelerate's WandBTracker hands it."""
    calls: dict[str, list] = {"init": [], "config": [], "log": [], "finish": []}

    class _Run:
        def log(self, values, step=None, **kw):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or _Run()
    fake.config = types.SimpleNamespace(update=lambda values, **kw: calls["config"].append(dict(values)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real = tracking_mod._installed
    monkeypatch.setattr(tracking_mod, "_installed", lambda p: True if p == "wandb" else real(p))
    cfg = load_config("smoke", ["run.trackers=[wandb]"])
    spec = TrackingSpec.for_stage(cfg, "run-w", "fit_tiny", key="kw", workdir=tmp_path / "work")
    out = tmp_path / "fit"
    metrics = run_training(TinyTask(), _loop(steps=3), out, device="cpu", tracking=spec)
    tracking_mod.log_stage_metrics(spec, metrics)
    init = calls["init"][0]
    assert init["project"] == "perceptio" and init["name"] == "run-w/fit_tiny" and init["id"] == "run-w-fit_tiny"
    assert calls["init"][1]["id"] == init["id"] and calls["init"][1]["resume"] == "allow"  # the stage joins the run
    assert set(init["tags"]) == {"run-w", "fit_tiny", "kw"}
    assert calls["config"][0]["run_id"] == "run-w" and calls["config"][0]["loop.steps"] == 3
    rows = read_history(out / "history.jsonl")
    assert [s for s, _ in calls["log"][:3]] == [1, 2, 3]
    for (step, values), r in zip(calls["log"], rows):
        assert values["train/l1"] == r["l1"] and values["train/lr"] == r["lr"]
    assert calls["log"][3] == (3, pytest.approx({f"stage/{k}": v for k, v in numeric_metrics(metrics).items()}))
    assert len(calls["finish"]) == 2
    assert not (tmp_path / "work" / "tracking" / "run-w" / "fit_tiny").exists()  # no TensorBoard asked for


def test_flat_hparams_and_numeric_metrics_keep_scalars_only():
    hp = flat_hparams({"a": {"b": 1, "c": None, "d": [1, 2], "e": {"f": "x"}}, "g": True, "h": list(range(200))})
    assert hp == {"a.b": 1, "a.d": "[1, 2]", "a.e.f": "x", "g": True}
    assert numeric_metrics({"m": {"x+y": 2}, "s": "t", "b": False, "n": None}) == {"m.x_y": 2.0}
    assert flat_hparams(to_dict(load_config("smoke")))["run.trackers"] == '["tensorboard"]'
