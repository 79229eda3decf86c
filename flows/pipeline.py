"""The Perceptio pipeline as a Prefect flow (ARCHITECTURE.md, the DAG).

The flow body only sequences the stages; :class:`Plan` decides for each one whether it runs in this
run (all of them by default, one with ``only``, a stage and its descendants with ``from_stage``) or
is taken from the store as it is. Only the stages a run touches (the selected ones and their
upstream) have their keys computed and their inputs checked, so a dataset only an untouched stage
reads is not demanded (the benchmarks, for ``--only teacher_depth``); every dataset missing for
those it touches is named in one error before any stage runs. Every run writes
``<workdir>/runs/<run-id>/summary.json`` and the resolved ``config.yaml``.

The DAG has two roots: ``sources`` (the training datasets), which every training stage hangs
from, and ``benchmarks`` (HardBLINK, the multiple-choice TSVs, MME), which only ``evaluate`` reads.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import State

from perceptio_core.config import ConfigError, PerceptioConfig, dump_config, load_config, remember_profile
from perceptio_core.atomic_io import write_json, write_text
from tasks.runner import ArtifactRef, PipelineError, RunContext, compute_keys, flatten, interrupts, workdir_lock
from tasks.stage_task import StageResult, stage_task
from tasks.stages import BY_NAME, STAGES, downstream_of, upstream_of


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def resolve_config(
    profile: str | None, overrides: list[str] | None, workdir: str | None
) -> PerceptioConfig:
    ov = list(overrides or [])
    if workdir:
        ov.append(f"run.workdir={workdir}")
    return load_config(profile, ov)


class Plan:
    """Runs or resolves each stage and records what happened, for the summary."""

    def __init__(self, run: RunContext, only: str | None = None, from_stage: str | None = None):
        for name in (only, from_stage):
            if name is not None and name not in BY_NAME:
                raise ConfigError(f"unknown stage {name!r} (stages: {', '.join(BY_NAME)})")
        if only and from_stage:
            raise ConfigError("give --only or --from, not both")
        self.run = run
        if only:
            self.selected = {only}
        elif from_stage:
            self.selected = downstream_of(from_stage)
        else:
            self.selected = set(BY_NAME)
        # the stages this run touches: the selected ones and what they read (``--only train_vqvae``
        # must not ask for a tokenize_depth artifact its changed config has not produced yet)
        self.needed = set(self.selected).union(*(upstream_of(s) for s in self.selected))
        # keys of those alone: a dataset only an untouched stage reads (the benchmarks, for a run
        # that stops before evaluate) is not demanded
        self.keys = compute_keys(run.cfg, [s for s in STAGES if s.name in self.needed], run.workdir)
        self.records: dict[str, dict[str, Any]] = {}
        # what each stage task of this run returned: handed to downstream tasks as it is, so that
        # Prefect links them to it and draws the edge (tasks.stage_task.StageResult)
        self.task_results: dict[str, StageResult] = {}
        self.t0 = time.time()
        self.current: tuple[str, str, float] | None = None  # (stage, key, start) of the stage running now

    def step(self, name: str, *upstream: ArtifactRef | State | None) -> ArtifactRef | None:
        """Run (or resolve) stage ``name`` given its upstream references; None when the stage is
        not part of the DAG under this config (e.g. ``fit_teacher`` with a released teacher) or not
        needed by this run (downstream of an ``only`` stage)."""
        spec = BY_NAME[name]
        if name not in self.keys or name not in self.needed:
            return None
        refs = {r.stage: r for r in (_unwrap(u) for u in upstream if u is not None)}
        wanted = {u for u in spec.upstream if u in self.keys}
        if set(refs) != wanted:
            raise RuntimeError(f"stage {name} takes {sorted(wanted)}, the flow gave {sorted(refs)}")
        key, material = self.keys[name]
        store = self.run.store
        url = store.artifact_url(name, key)
        t0 = time.time()
        if name not in self.selected:
            manifest = store.trust(name, key)  # verified; a damaged one is moved aside
            if manifest is None:
                raise PipelineError(
                    f"stage {name} is needed but not selected in this run, and its artifact "
                    f"{url} is not in the store (never made, or damaged and moved aside): run it "
                    f"first (or use --from {name})"
                )
            ref = ArtifactRef(name, key, url, "reused")
        else:
            reused = [r.url for r in refs.values() if r.status == "reused"]
            inputs = {n: self.task_results.get(n, r) for n, r in refs.items()}
            self.current = (name, key, t0)
            result = stage_task(name, url, reused)(name, self.run, key, material, inputs)
            self.current = None
            if isinstance(result, State):  # a stage reused from the store returns Cached
                result = result.result()
            if isinstance(result, StageResult):
                self.task_results[name] = result
            ref = _unwrap(result)
            manifest = store.manifest(name, key)
        self.records[name] = {
            "key": key,
            "url": ref.url,
            "status": ref.status,
            "wall_s": round(time.time() - t0, 3),
            "compute_wall_s": manifest.timings.get("wall_s"),
            "metrics": manifest.metrics,
            "quarantine": {
                "count": manifest.quarantine.get("count", 0),
                "reasons": manifest.quarantine.get("reasons", {}),
            },
        }
        return ref

    def summary(self) -> dict[str, Any]:
        flat = {
            f"{stage}.{k}": v
            for stage, rec in self.records.items()
            for k, v in flatten(rec["metrics"]).items()
        }
        return {
            "run_id": self.run.run_id,
            "flow_run_id": self.run.flow_run_id,
            "workdir": str(self.run.workdir),
            "store": self.run.store_url,
            "wall_s": round(time.time() - self.t0, 3),
            "stages": self.records,
            "metrics": flat,
        }

    def interrupted(self) -> dict[str, Any]:
        """The summary of a run cut by Ctrl-C or SIGTERM: the stages that finished as they are, the
        one that was running marked ``interrupted`` (its finished chunks or checkpoints stay in its
        staging folder, from which the next run resumes); written like :meth:`finish`'s."""
        if self.current is not None:
            name, key, t0 = self.current
            self.records[name] = {"key": key, "url": self.run.store.artifact_url(name, key), "status": "interrupted",
                                  "wall_s": round(time.time() - t0, 3), "metrics": {},
                                  "quarantine": {"count": 0, "reasons": {}}}  # fmt: skip
        return self._write({**self.summary(), "interrupted": True})

    def finish(self) -> dict[str, Any]:
        return self._write(self.summary())

    @property
    def summary_path(self) -> Path:
        return self.run.workdir / "runs" / self.run.run_id / "summary.json"

    def _write(self, summary: dict[str, Any]) -> dict[str, Any]:
        write_json(self.summary_path, summary, sort_keys=False)  # stages in pipeline order
        return summary


def _unwrap(x: ArtifactRef | StageResult | State) -> ArtifactRef:
    if isinstance(x, State):
        x = x.result()
    if isinstance(x, StageResult):
        x = x.ref
    if not isinstance(x, ArtifactRef):
        raise TypeError(f"expected an ArtifactRef, got {type(x).__name__}")
    return x


def start_run(
    profile: str | None, overrides: list[str] | None, workdir: str | None, run_id: str | None
) -> RunContext:
    cfg = resolve_config(profile, overrides, workdir)
    wd = Path(cfg.run.workdir).expanduser().resolve()
    run = RunContext(cfg=cfg, workdir=wd, run_id=run_id or new_run_id())
    fr = runtime_flow_run.id
    run.flow_run_id = str(fr) if fr else None
    out = wd / "runs" / run.run_id
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_config(cfg))
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.parent_task_run_id is None:
        # the workdir remembers the profile and overrides of its last run, for the commands given
        # the workdir alone (perceptio stages/lineage/verify/run --workdir W); a subflow (an
        # ablation variant, whose overrides are the variant's) leaves that to its parent
        remember_profile(wd, profile, overrides or [], run_id=run.run_id, flow="perceptio-pipeline")
    if cfg.run.torch_threads:
        import torch

        torch.set_num_threads(cfg.run.torch_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run


@flow(name="perceptio-pipeline", log_prints=True)
def perceptio_pipeline(
    profile: str = "tiny",
    overrides: list[str] | None = None,
    workdir: str | None = None,
    only: str | None = None,
    from_stage: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """The whole pipeline; ``only``/``from_stage`` restrict which stages run in this run."""
    run = start_run(profile, overrides, workdir, run_id)
    log = get_run_logger()
    with workdir_lock(run.workdir, run.cfg.run.lock_wait_s, log.warning):  # one run per workdir at a time
        plan = Plan(run, only=only, from_stage=from_stage)
        try:
            return _steps(plan)
        except interrupts():  # Ctrl-C, or SIGTERM (Prefect's TerminationSignal)
            plan.interrupted()
            log.warning("run %s interrupted%s; the finished stages are in the store, the summary in %s", run.run_id,
                        f" in {plan.current[0]}" if plan.current else "", plan.summary_path)
            raise


def _steps(plan: Plan) -> dict[str, Any]:
    """The DAG, stage after stage: the body of :func:`perceptio_pipeline`."""
    world = plan.step("sources")
    benchmarks = plan.step("benchmarks")
    fitted = plan.step("fit_teacher", world)
    depth = plan.step("teacher_depth", world, fitted)
    codebook = plan.step("train_vqvae", world, depth)
    tokens = plan.step("tokenize_depth", depth, codebook)
    samples = plan.step("curate", world, depth, codebook, tokens)
    base = plan.step("base", world)
    segmenter = plan.step("fit_sam2", world)
    model = plan.step("finetune", base, segmenter, samples, depth, codebook)
    plan.step("evaluate", world, benchmarks, depth, model, base)
    return plan.finish()


# Each stage's headline metrics, in this order (the README's table names them): (metric pattern,
# label); a pattern's ``*`` matches one dotted name part. The full list stays in summary.json.
HEADLINE: dict[str, list[tuple[str, str]]] = {
    "sources": [("coco_images", "COCO images"), ("refs.*", "refs {}"), ("ade20k", "ADE20k")],
    "benchmarks": [("hardblink", "HardBLINK"), ("mcq.*", "MCQ {}"), ("mme", "MME")],
    "fit_teacher": [("holdout_absrel", "hold-out AbsRel"), ("loss_last", "loss last")],
    "teacher_depth": [("images", "maps"), ("absrel_vs_true", "AbsRel vs true")],
    "train_vqvae": [("delta1", "delta1"), ("code_usage", "code usage"), ("recon_absrel", "AbsRel")],
    "tokenize_depth": [("code_usage", "code usage")],
    "curate": [("samples_total", "samples")],
    "base": [("loss_first", "loss first"), ("loss_last", "last")],
    "fit_sam2": [("holdout_point_miou", "hold-out point mIoU")],
    "finetune": [("loss_first", "loss first"), ("loss_last", "last")],
    "evaluate": [("refcoco.val.ciou", "RefCOCO val cIoU"), ("refcoco+.val.ciou", "RefCOCO+ val cIoU"),
                 ("refcocog.val.ciou", "RefCOCOg val cIoU"), ("hardblink.mean.accuracy", "HardBLINK mean"),
                 ("mcq.*.accuracy", "MCQ {}"), ("mme.perception.score", "MME perception")],
}


def headline(stage: str, metrics: dict[str, Any]) -> list[str]:
    """The headline figures of ``stage`` (:data:`HEADLINE`) found in its ``metrics``, each as
    ``label value``; an evaluation figure the base has too gets ``(base x)`` beside it."""
    flat = flatten(metrics)
    out = []
    for pattern, label in HEADLINE.get(stage, []):
        rx = re.compile(re.escape(pattern).replace(r"\*", r"([^.]+)"))
        for k, v in flat.items():
            m = rx.fullmatch(k)
            if m is None:
                continue
            name = label.format(*m.groups())
            text = f"{name} {v:.3g}" if isinstance(v, float) else f"{name} {v}"
            base = flat.get(f"base.{k}")
            if isinstance(base, (int, float)):
                text += f" (base {base:.3g})"
            out.append(text)
    return out


def summary_table(summary: dict[str, Any]) -> str:
    """The per-stage summary every ``perceptio run`` prints: each stage's status, key, time,
    quarantine and its headline metrics (:func:`headline`); all metrics are in summary.json."""
    lines = [f"run {summary['run_id']}  ({summary['wall_s']:.1f} s)  store {summary['store']}"]
    lines.append(f"{'stage':<16}{'status':<12}{'key':<22}{'wall s':>8}  {'quarantined':>11}  headline")
    for name, rec in summary["stages"].items():
        figures = ", ".join(headline(name, rec.get("metrics") or {}))
        q = rec.get("quarantine", {}).get("count", 0)
        lines.append(f"{name:<16}{rec['status']:<12}{rec.get('key', '-'):<22}{rec.get('wall_s', 0.0):>8.1f}  "
                     f"{q:>11}  {figures}")
    return "\n".join(lines)