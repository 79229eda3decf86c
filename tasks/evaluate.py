"""Stage ``evaluate`` (SPEC §6): the benchmarks, the base comparison and the report.

It reads the REFER val/test splits from the ``sources`` artifact (the same REFER files training
reads) and HardBLINK, the multiple-choice benchmarks and MME from the ``benchmarks`` artifact,
joined into one :class:`~perceptio_core.data.records.Sources` for
:func:`~perceptio_core.evaluation.evaluate.run_evaluation`; it is the only stage downstream of
``benchmarks``."""

from __future__ import annotations

import shutil

from perceptio_core.depth.maps import DepthMaps
from perceptio_core.evaluation.evaluate import make_predictors, run_evaluation
from perceptio_core.evaluation.report import write_report
from perceptio_core.evaluation.stats import within_noise
from perceptio_core.evaluation.infer import load_model
from perceptio_core.model.internvl import load_internvl, load_tokenizer
from tasks.common import load_benchmarks, load_sources
from tasks.progress import Progress
from tasks.runner import StageContext, StageOutput, StageSpec


def evaluate(ctx: StageContext) -> StageOutput:
    cfg = ctx.cfg
    sources = load_sources(ctx).with_benchmarks(load_benchmarks(ctx))
    device = cfg.run.device if cfg.run.device != "auto" else "cpu"
    model = load_model(ctx.upstream_dir("finetune") / "model", device=device)
    base_model = base_tok = None
    if cfg.evaluate.compare_base:
        base_dir = ctx.upstream_dir("base") / "model" if "base" in ctx.upstream else cfg.model.base
        # on the run's device in the Perceptio model's dtype: the comparison costs what the model's does
        base_model = load_internvl(str(base_dir)).to(device=device, dtype=model.base_model.dtype)
        base_tok = load_tokenizer(str(base_dir) if cfg.model.tokenizer is None else cfg.model.tokenizer)
    preds = make_predictors(model, cfg.evaluate, base_model=base_model, base_tokenizer=base_tok)
    prog = Progress("evaluate", ctx.log)
    ev = run_evaluation(
        sources=sources, cfg=cfg.evaluate, **preds,
        teacher_maps=DepthMaps(ctx.upstream_dir("teacher_depth")),
        depth_spec=model.depth_spec, progress=prog,
    )
    prog.close()
    report_dir = ctx.run.workdir / "cache" / f"evaluate-{ctx.key}"
    shutil.rmtree(report_dir, ignore_errors=True)
    write_report(ev, report_dir)
    ctx.writer.add_tree(report_dir, "report")
    ctx.writer.write_json("metrics.json", ev.metrics)
    ctx.writer.write_json("intervals.json", {k: e.to_dict() for k, e in ev.intervals.items()})
    ctx.writer.write_json("differences.json", {k: {**e.to_dict(), "within_noise": within_noise(e)}
                                               for k, e in ev.differences.items()})
    figures = {
        f"sample: {p.stem}": f"report/{p.relative_to(report_dir).as_posix()}"
        for p in sorted(report_dir.rglob("*.png"))[:8]
    }
    for name, why in ev.notes.items():  # a metric left out or partial, and why (in the log and manifest)
        ctx.log.info("evaluate: %s: %s", name, why)
    return StageOutput(metrics=dict(ev.metrics), figures=figures, notes=[f"{k}: {v}" for k, v in ev.notes.items()])


EVALUATE = StageSpec(
    name="evaluate",
    upstream=("sources", "benchmarks", "teacher_depth", "finetune", "base"),
    sections=("evaluate",),
    body=evaluate,
    description="RefCOCO/+/g cIoU & gIoU, HardBLINK 3/4/5, multiple-choice benchmarks, MME, perception-block and "
                "depth quality, each with its 95% interval and its difference to the base",
)
