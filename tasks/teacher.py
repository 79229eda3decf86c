"""Stages ``fit_teacher`` and ``teacher_depth`` (SPEC §2: Depth Anything V2 over every image)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from perceptio_core.evaluation import viz
from perceptio_core.config import PerceptioConfig
from perceptio_core.depth.maps import DepthMaps, chunk_plan, done_chunks, write_chunk
from perceptio_core.depth.metrics import teacher_vs_true_metrics
from perceptio_core.depth.teacher import fit_teacher, load_teacher, predict_depth
from perceptio_core.data.records import ImageRecord, QuarantineEntry
from storage import code_digest
from tasks.common import load_sources
from tasks.progress import Progress
from tasks.runner import StageContext, StageOutput, StageSpec

METRIC_IMAGES = 200  # images with true depth the teacher is scored on (a fixed, sorted sample)
FIGURE_ROWS = 4


def _teacher_dir(ctx: StageContext) -> str:
    if ctx.cfg.teacher.checkpoint:
        return ctx.cfg.teacher.checkpoint
    return str(ctx.upstream_dir("fit_teacher"))


# ---- fit_teacher --------------------------------------------------------------------------------


def fit(ctx: StageContext) -> StageOutput:
    sources = load_sources(ctx)
    images = [r for r in sources.depth_images() if r.depth_path]
    if not images:
        raise RuntimeError(
            "fit_teacher: the data has no true depth to fit a teacher on; set teacher.checkpoint to a "
            "Depth Anything V2 checkpoint (a local directory or a hub id)"
        )
    scratch = ctx.run.workdir / "cache" / f"fit_teacher-{ctx.key}"
    shutil.rmtree(scratch, ignore_errors=True)
    prog = Progress("fit teacher", ctx.log)
    metrics = fit_teacher(
        images, ctx.cfg.teacher.fit, ctx.cfg.teacher.input_size, scratch,
        device=ctx.cfg.run.device, progress=prog, map_size=ctx.cfg.teacher.map_size,
    )
    prog.close()
    for p in sorted(scratch.iterdir()):
        ctx.writer.add_file(p, p.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return StageOutput(metrics=metrics)


def _checkpoint_fingerprint(cfg: PerceptioConfig, workdir: Path) -> str:
    """A released checkpoint given by path is keyed on its files' content; a hub id on its name."""
    ck = cfg.teacher.checkpoint
    if not ck:
        return "fitted"
    p = Path(ck).expanduser()
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if f.is_file() and f.suffix in (".json", ".safetensors", ".bin")]
        return "dir:" + code_digest(files)
    if p.exists() or ck.startswith((".", "/", "~")):
        raise FileNotFoundError(f"teacher.checkpoint {ck} is not a folder")
    return "hub:" + ck


# ---- teacher_depth ------------------------------------------------------------------------------


def teacher_depth(ctx: StageContext) -> StageOutput:
    cfg = ctx.cfg.teacher
    sources = load_sources(ctx)
    images = {r.digest: r for r in sources.depth_images()}
    plan = chunk_plan(list(images), cfg.chunk_size)
    done = done_chunks(ctx.writer.staging)
    todo = [i for i in range(len(plan)) if i not in done]
    ctx.log.info(
        "teacher_depth: %d images in %d chunks, %d already done%s", len(images), len(plan),
        len(done), " (resuming)" if done else "",
    )
    if todo:
        model, processor = load_teacher(_teacher_dir(ctx), device=ctx.cfg.run.device)
        prog = Progress("teacher depth", ctx.log)
        total = sum(len(plan[i]) for i in todo)
        finished = 0
        for ci in todo:
            digests = plan[ci]
            paths = [images[d].path for d in digests]
            ok_d, maps, ranges, errors = [], [], [], {}
            for r in predict_depth(
                model, processor, paths, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                device=ctx.cfg.run.device, precision=cfg.precision, map_size=cfg.map_size,
            ):
                d = digests[r.index]
                if r.error is not None:
                    errors[d] = r.error
                else:
                    ok_d.append(d)
                    maps.append(r.map)
                    ranges.append((r.raw_min, r.raw_max))
            arr = np.stack(maps) if maps else np.zeros((0, cfg.map_size, cfg.map_size), np.float32)
            write_chunk(ctx.writer.staging, ci, ok_d, arr, ranges, errors, ctx.writer.atomic)
            finished += len(digests)
            prog(finished, total, {"chunk": float(ci)})
        prog.close()
    maps = DepthMaps(ctx.writer.staging)
    quarantine = [
        QuarantineEntry("teacher_depth", f"image {d[:12]} ({images[d].file_name})", reason)
        for d, reason in sorted(maps.errors.items())
    ]
    metrics = {"images": len(maps), "chunks": len(plan), "resumed_chunks": len(done)}
    metrics.update(_score_teacher(maps, images))
    figures = {}
    scored = _scored_images(maps, images)[:FIGURE_ROWS]
    if scored:
        rows = [
            (np.asarray(viz.load_rgb(images[d].path)), np.load(images[d].depth_path), maps.get(d))
            for d in scored
        ]
        with ctx.writer.atomic("teacher_depth.png") as f:
            viz.depth_grid(rows, ["image", "true depth", "teacher (rel. inverse depth)"], f, metric_columns=[1])
        figures["image | true depth | teacher depth"] = "teacher_depth.png"
    return StageOutput(metrics=metrics, quarantine=quarantine, figures=figures)


def _scored_images(maps: DepthMaps, images: dict[str, ImageRecord]) -> list[str]:
    return [d for d in sorted(maps.digests) if images.get(d) and images[d].depth_path][:METRIC_IMAGES]


def _score_teacher(maps: DepthMaps, images: dict[str, ImageRecord]) -> dict[str, float]:
    """``absrel_vs_true`` and ``pair_order_acc_vs_true`` over images that have true depth."""
    rows = []
    for d in _scored_images(maps, images):
        true = np.load(images[d].depth_path)
        rows.append(teacher_vs_true_metrics(maps.get(d), true, seed=int(d[:6], 16)))
    if not rows:
        return {}
    return {
        "absrel_vs_true": float(np.mean([r["absrel"] for r in rows])),
        "delta1_vs_true": float(np.mean([r["delta1"] for r in rows])),
        "pair_order_acc_vs_true": float(np.mean([r["pair_order"] for r in rows])),
        "scored_images": len(rows),
    }


FIT_TEACHER = StageSpec(
    name="fit_teacher",
    upstream=("sources",),
    sections=("teacher.fit", "teacher.input_size", "teacher.map_size"),
    body=fit,
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
