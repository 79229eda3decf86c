"""Stage ``evaluate`` (SPEC §6): the benchmarks, the base comparison and the report.

It reads the REFER val/test splits from the ``sources`` artifact (the same REFER files training
reads) and HardBLINK, the multiple-choice benchmarks and MME from the ``benchmarks`` artifact,
joined into one :class:`~perceptio_core.data.records.Sources` for
:func:`~perceptio_core.evaluation.evaluate.run_evaluation`; it is the only stage downstream of
``benchmarks``.

Predictions are kept in ``<workdir>/cache/predictions`` (:mod:`perceptio_core.evaluation.predictions`),
keyed by each model's tag (:func:`model_tags`), the image and the prompt: a cut evaluation resumes,
a metric or benchmark change generates only what is new, and with ``evaluate.processes > 1`` the
generation runs in that many processes first (``flows/eval_script.py`` under ``torchrun``), the stage
then scoring everything from the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from storage import code_digest
from tasks.runner import StageContext, StageOutput, StageSpec, module_files, versioned_modules


# what generates (and stores) a prediction: these modules and every project module they import
GENERATION_ENTRIES = ("perceptio_core.model.generation", "perceptio_core.evaluation.predictions")


def model_tags(ctx: StageContext) -> dict[str, str]:
    """The prediction-cache tag of each evaluated model (:mod:`perceptio_core.evaluation.predictions`):
    what its answers depend on, and nothing a metric does: the weights' key (the fine-tuned model's;
    the offline base's, or with a released base the fine-tuning key, which covers its content), the
    decoding settings and the generation code. A change to a metric or a benchmark leaves the tags
    alone, so only new (image, prompt) pairs are generated."""
    from perceptio_core.evaluation.evaluate import BASE, PERCEPTIO

    e = ctx.cfg.evaluate
    code = code_digest(module_files(versioned_modules(list(GENERATION_ENTRIES))))
    decode = f"{e.max_new_tokens}/{e.num_beams}/{e.max_tiles}/{code}"
    model = f"{ctx.upstream['finetune'].key}/{decode}"
    base = ctx.upstream["base"].key if "base" in ctx.upstream else ctx.upstream["finetune"].key
    return {PERCEPTIO: f"{model}/constrained={e.constrained}", f"{PERCEPTIO}-unconstrained": f"{model}/free",
            BASE: f"base:{base}/{decode}"}


def evaluate(ctx: StageContext) -> StageOutput:
    from perceptio_core.depth.maps import DepthMaps
    from perceptio_core.evaluation.evaluate import load_predictors, run_evaluation
    from perceptio_core.evaluation.predictions import PredictionCache
    from perceptio_core.evaluation.report import write_report
    from perceptio_core.evaluation.stats import within_noise
    from tasks.common import load_benchmarks, load_sources
    from tasks.progress import Progress

    cfg = ctx.cfg
    sources = load_sources(ctx).with_benchmarks(load_benchmarks(ctx))
    device = cfg.run.device if cfg.run.device != "auto" else "cpu"
    model_dir = ctx.upstream_dir("finetune") / "model"
    base_dir = None
    if cfg.evaluate.compare_base:
        base_dir = ctx.upstream_dir("base") / "model" if "base" in ctx.upstream else cfg.model.base
    tags = model_tags(ctx)
    cache_dir = ctx.run.workdir / "cache" / "predictions"
    if cfg.evaluate.processes > 1:
        _generate_in_processes(ctx, model_dir, base_dir, cache_dir, tags, device)
    model, preds = load_predictors(model_dir, cfg.evaluate, base_dir, cfg.model.tokenizer, device)
    prog = Progress("evaluate", ctx.log)
    cache = PredictionCache(cache_dir)
    ctx.log.info("evaluate: %d predictions already in %s", len(cache), cache_dir)
    ev = run_evaluation(
        sources=sources, cfg=cfg.evaluate, **preds,
        teacher_maps=DepthMaps(ctx.upstream_dir("teacher_depth")),
        depth_spec=model.depth_spec, progress=prog, cache=cache, model_tags=tags,
    )
    prog.close()
    report_dir = ctx.run.workdir / "cache" / f"evaluate-{ctx.key}"
    shutil.rmtree(report_dir, ignore_errors=True)
    write_report(ev, report_dir)
    ctx.writer.add_tree(report_dir, "report")
    ctx.writer.write_json("metrics.json", ev.metrics)
    ctx.writer.write_json("intervals.json", {k: e.to_dict() for k, e in ev.intervals.items()})
    # the per-sample outcomes behind every interval (0/1 per question, [intersection, union] per
    # expression, in a fixed sample order): what compares two evaluations pairwise (perceptio ablate)
    ctx.writer.write_json("samples.json", {k: [[int(x) for x in v] if isinstance(v, (tuple, list)) else int(v)
                                               for v in vals] for k, vals in ev.samples.items()})
    ctx.writer.write_json("differences.json", {k: {**e.to_dict(), "within_noise": within_noise(e)}
                                               for k, e in ev.differences.items()})
    figures = {
        f"sample: {p.stem}": f"report/{p.relative_to(report_dir).as_posix()}"
        for p in sorted(report_dir.rglob("*.png"))[:8]
    }
    for name, why in ev.notes.items():  # a metric left out or partial, and why (in the log and manifest)
        ctx.log.info("evaluate: %s: %s", name, why)
    return StageOutput(metrics=dict(ev.metrics), figures=figures, notes=[f"{k}: {v}" for k, v in ev.notes.items()])


def _generate_in_processes(ctx: StageContext, model_dir: Path, base_dir: Any, cache_dir: Path,
                           tags: dict[str, str], device: str) -> None:
    """``torchrun --nproc_per_node <evaluate.processes> -m flows.eval_script JOB``: every process
    generates its share of the missing predictions into ``cache_dir`` (flows/eval_script.py)."""
    from perceptio_core.atomic_io import write_json, write_text
    from perceptio_core.config import dump_config
    from tasks.common import scratch_dir
    from tasks.data import data_root

    work = scratch_dir(ctx)
    cfg_path = work / "config.yaml"
    write_text(cfg_path, dump_config(ctx.cfg))
    job = work / "job.json"
    write_json(job, dict(config=str(cfg_path), sources=str(ctx.upstream_dir("sources") / "sources.json"),
                         benchmarks=str(ctx.upstream_dir("benchmarks") / "benchmarks.json"), model=str(model_dir),
                         data_root=str(data_root(ctx.cfg, ctx.run.workdir)),
                         base=str(base_dir) if base_dir is not None else None,
                         base_tokenizer=ctx.cfg.model.tokenizer, cache=str(cache_dir), tags=tags,
                         device=device))  # fmt: skip
    n = ctx.cfg.evaluate.processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "flows.eval_script", str(job)]
    ctx.log.info("evaluate: generating in %d processes: %s", n, " ".join(cmd))
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"data-parallel evaluation failed (exit {done.returncode}); its last output:\n"
                           f"{(done.stdout + done.stderr)[-4000:]}")
    ctx.log.info("evaluate: %s", done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "done")


EVALUATE = StageSpec(
    name="evaluate",
    upstream=("sources", "benchmarks", "teacher_depth", "finetune", "base"),
    sections=("evaluate",),
    body=evaluate,
    description="RefCOCO/+/g cIoU & gIoU, HardBLINK 3/4/5, multiple-choice benchmarks, MME, perception-block and "
                "depth quality, each with its 95% interval and its difference to the base",
)
