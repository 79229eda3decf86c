"""Stages ``fit_teacher`` and ``teacher_depth`` (SPEC §2: Depth Anything V2 over every image)."""

from __future__ import annotations

from pathlib import Path

from perceptio_core.config import PerceptioConfig
from tasks.checkpoints import checkpoint_fingerprint
from tasks.runner import StageContext, StageOutput, StageSpec

METRIC_IMAGES = 200  # images with true depth the teacher is scored on (a fixed, sorted sample)
FIGURE_ROWS = 4


def _teacher_dir(ctx: StageContext) -> str:
    if ctx.cfg.teacher.checkpoint:
        return ctx.cfg.teacher.checkpoint
    return str(ctx.upstream_dir("fit_teacher"))


# ---- fit_teacher --------------------------------------------------------------------------------


def fit_teacher(ctx: StageContext) -> StageOutput:
    from perceptio_core.training import teacher_fit
    from tasks.common import load_sources, publish_training, scratch_dir
    from tasks.progress import Progress

    images = [r for r in load_sources(ctx).depth_images() if r.depth_path]
    if not images:
        raise RuntimeError(
            "fit_teacher: the data has no true depth to fit a teacher on; set teacher.checkpoint to a "
            "Depth Anything V2 checkpoint (a local directory or a hub id)"
        )
    out = scratch_dir(ctx)
    prog = Progress("fit teacher", ctx.log)
    metrics = teacher_fit.fit_teacher(
        images, ctx.cfg.teacher.fit, ctx.cfg.teacher.input_size, out, device=ctx.cfg.run.device,
        progress=prog, map_size=ctx.cfg.teacher.map_size, parents={n: r.key for n, r in ctx.upstream.items()},
    )  # fmt: skip
    prog.close()
    figures = publish_training(ctx, out, model_prefix="")
    return StageOutput(metrics=metrics, figures=figures)


def _checkpoint_fingerprint(cfg: PerceptioConfig, workdir: Path) -> str:
    """A released checkpoint given by path is keyed on its files' content; a hub id on its name;
    a missing path stops the run before the first stage (:mod:`tasks.checkpoints`)."""
    if not cfg.teacher.checkpoint:
        return "fitted"
    return checkpoint_fingerprint("teacher.checkpoint", cfg.teacher.checkpoint, workdir)


# ---- teacher_depth ------------------------------------------------------------------------------


def teacher_depth(ctx: StageContext) -> StageOutput:
    import numpy as np

    from perceptio_core.data.records import QuarantineEntry
    from perceptio_core.depth.maps import DepthMaps
    from perceptio_core.depth.metrics import teacher_scores
    from perceptio_core.depth.teacher import write_teacher_maps
    from perceptio_core.evaluation import viz
    from tasks.common import load_sources
    from tasks.progress import Progress

    images = {r.digest: r for r in load_sources(ctx).depth_images()}
    prog = Progress("teacher depth", ctx.log)
    run = write_teacher_maps(
        _teacher_dir(ctx), {d: r.path for d, r in images.items()}, ctx.writer.staging, ctx.writer.atomic,
        ctx.cfg.teacher, device=ctx.cfg.run.device, progress=prog,
    )  # fmt: skip
    prog.close()
    maps = DepthMaps(ctx.writer.staging)
    ctx.log.info(
        "teacher_depth: %d maps of %d images in %d chunks, %d of them from an earlier run",
        len(maps), len(images), run["chunks"], run["resumed_chunks"],
    )  # fmt: skip
    quarantine = [
        QuarantineEntry("teacher_depth", f"image {d[:12]} ({images[d].file_name})", reason)
        for d, reason in sorted(maps.errors.items())
    ]
    scored = [d for d in sorted(maps.digests) if images.get(d) and images[d].depth_path][:METRIC_IMAGES]
    metrics: dict[str, float] = {"images": len(maps), **run}
    if scored:
        s = teacher_scores((d, maps.get(d), np.load(images[d].depth_path)) for d in scored)
        metrics.update(absrel_vs_true=s["absrel"], delta1_vs_true=s["delta1"],
                       pair_order_acc_vs_true=s["pair_order"], scored_images=int(s["images"]))  # fmt: skip
    figures = {}
    if scored:
        rows = [
            (np.asarray(viz.load_rgb(images[d].path)), np.load(images[d].depth_path), maps.get(d))
            for d in scored[:FIGURE_ROWS]
        ]
        with ctx.writer.atomic("teacher_depth.png") as f:
            viz.depth_grid(rows, ["image", "true depth", "teacher (rel. inverse depth)"], f, metric_columns=[1])
        figures["image | true depth | teacher depth"] = "teacher_depth.png"
    return StageOutput(metrics=metrics, quarantine=quarantine, figures=figures)


FIT_TEACHER = StageSpec(
    name="fit_teacher",
    upstream=("sources",),
    sections=("teacher.fit", "teacher.input_size", "teacher.map_size"),
    body=fit_teacher,
    description="fit a small Depth Anything V2 on the world's true depth (offline default)",
    enabled=lambda cfg: not cfg.teacher.checkpoint,
)
TEACHER_DEPTH = StageSpec(
    name="teacher_depth",
    upstream=("sources", "fit_teacher"),
    sections=("teacher.checkpoint", "teacher.input_size", "teacher.map_size", "teacher.chunk_size",
              "teacher.precision"),
    body=teacher_depth,
    description="Depth Anything V2 relative depth of every training image, keyed by image digest",
    fingerprint=_checkpoint_fingerprint,
)
