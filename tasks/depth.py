"""Stages ``fit_teacher``, ``teacher_depth``, ``train_vqvae`` and ``tokenize_depth`` (SPEC §2)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from perceptio_core.config import PerceptioConfig
from perceptio_core.depth_maps import DepthMaps, chunk_plan, done_chunks, write_chunk
from perceptio_core.depth_metrics import teacher_vs_true_metrics
from perceptio_core.depth_teacher import fit_teacher, load_teacher, predict_depth
from perceptio_core.depth_tokens import DepthTokenizer
from perceptio_core.image_io import holdout_by_digest
from perceptio_core.records import ImageRecord, QuarantineEntry, Sources
from perceptio_core.vqvae import train_vqvae
from perceptio_core import viz
from storage import code_digest
from tasks.progress import Progress
from tasks.runner import StageContext, StageOutput, StageSpec

METRIC_IMAGES = 200  # images with true depth the teacher is scored on (a fixed, sorted sample)
FIGURE_ROWS = 4


def load_sources(ctx: StageContext) -> Sources:
    with open(ctx.upstream_dir("sources") / "sources.json") as f:
        return Sources.from_json(f.read())


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


# ---- train_vqvae --------------------------------------------------------------------------------


def vqvae(ctx: StageContext) -> StageOutput:
    cfg = ctx.cfg.vqvae
    maps = DepthMaps(ctx.upstream_dir("teacher_depth"))
    digests = sorted(maps.digests)
    hold = [d for d in digests if holdout_by_digest(d, cfg.holdout_fraction)]
    train = [d for d in digests if not holdout_by_digest(d, cfg.holdout_fraction)]
    if not train or not hold:
        raise RuntimeError(f"train_vqvae: {len(train)} training and {len(hold)} held-out maps; need both")
    pos = {d: i for i, d in enumerate(maps.digests)}
    train_maps = maps[[pos[d] for d in train]]
    hold_maps = maps[[pos[d] for d in hold]]
    prog = Progress("train vqvae", ctx.log)
    model, metrics, history = train_vqvae(
        train_maps, cfg, device=ctx.cfg.run.device, progress=prog, holdout=hold_maps
    )
    prog.close()
    model.save_pretrained(ctx.writer.staging)
    ctx.writer.write_json("history.json", history)
    ctx.writer.write_json("split.json", {"train": train, "holdout": hold})
    figures = {}
    with ctx.writer.atomic("loss_curve.png") as f:
        viz.loss_curves(history, f, title="VQ-VAE training")
    figures["VQ-VAE training loss"] = "loss_curve.png"
    sources = load_sources(ctx)
    images = {r.digest: r for r in sources.depth_images()}
    shown = [d for d in hold if images.get(d) is not None][:FIGURE_ROWS]
    if shown:
        tok = DepthTokenizer(model)
        teacher = np.stack([maps.get(d) for d in shown])
        recon = tok.decode(tok.encode(_resize(teacher, cfg.input_size))).detach().cpu().numpy()
        rows = []
        for d, t, r in zip(shown, teacher, recon):
            true = np.load(images[d].depth_path) if images[d].depth_path else None
            rows.append((np.asarray(viz.load_rgb(images[d].path)), true, t, r))
        with ctx.writer.atomic("reconstructions.png") as f:
            viz.depth_grid(rows, ["image", "true depth", "teacher", "VQ-VAE reconstruction"], f, metric_columns=[1])
        figures["held-out: image | true depth | teacher | VQ-VAE reconstruction"] = "reconstructions.png"
    metrics.update({"train_maps": len(train), "holdout_maps": len(hold)})
    return StageOutput(metrics=metrics, figures=figures)


def _resize(maps: np.ndarray, size: int) -> np.ndarray:
    if maps.shape[-1] == size:
        return maps
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


# ---- tokenize_depth -----------------------------------------------------------------------------


def tokenize(ctx: StageContext) -> StageOutput:
    cfg = ctx.cfg.vqvae
    maps = DepthMaps(ctx.upstream_dir("teacher_depth"))
    tok = DepthTokenizer.from_pretrained(ctx.upstream_dir("train_vqvae"), device=ctx.cfg.run.device)
    digests = sorted(maps.digests)
    out = np.zeros((len(digests), cfg.num_tokens), dtype=np.int32)
    prog = Progress("tokenize depth", ctx.log)
    for i, (ds, batch) in enumerate(maps.batches(digests, 256)):
        idx = tok.encode(_resize(batch, cfg.input_size)).cpu().numpy()
        out[i * 256 : i * 256 + len(ds)] = idx
        prog(min((i + 1) * 256, len(digests)), len(digests))
    prog.close()
    with ctx.writer.atomic("tokens.npy") as f:
        np.save(f, out)
    ctx.writer.write_json("digests.json", digests)
    counts = np.bincount(out.ravel(), minlength=cfg.codebook_size)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    metrics = {
        "images": len(digests),
        "tokens_per_image": cfg.num_tokens,
        "code_usage": float((counts > 0).mean()),
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "tokens_sha256": hashlib.sha256(out.tobytes()).hexdigest()[:16],
    }
    return StageOutput(metrics=metrics)


def read_tokens(folder: str | Path) -> dict[str, np.ndarray]:
    """The tokenize_depth artifact as {image digest: [N] int array}."""
    folder = Path(folder)
    digests = json.loads((folder / "digests.json").read_text())
    tokens = np.load(folder / "tokens.npy")
    return dict(zip(digests, tokens))


_DEPTH_CODE = ("perceptio_core.depth_teacher", "perceptio_core.device", "perceptio_core.depth_maps",
               "perceptio_core.depth_metrics", "perceptio_core.viz", "tasks.depth", "tasks.progress")

FIT_TEACHER = StageSpec(
    name="fit_teacher",
    upstream=("sources",),
    sections=("teacher.fit", "teacher.input_size", "teacher.map_size"),
    code=_DEPTH_CODE,
    body=fit,
    description="fit a small Depth Anything V2 on the world's true depth (offline default)",
    enabled=lambda cfg: not cfg.teacher.checkpoint,
)
TEACHER_DEPTH = StageSpec(
    name="teacher_depth",
    upstream=("sources", "fit_teacher"),
    sections=("teacher.checkpoint", "teacher.input_size", "teacher.map_size", "teacher.chunk_size",
              "teacher.precision"),
    code=_DEPTH_CODE,
    body=teacher_depth,
    description="Depth Anything V2 relative depth of every training image, keyed by image digest",
    fingerprint=_checkpoint_fingerprint,
)
TRAIN_VQVAE = StageSpec(
    name="train_vqvae",
    upstream=("sources", "teacher_depth"),
    sections=("vqvae",),
    code=_DEPTH_CODE + ("perceptio_core.vqvae", "perceptio_core.depth_tokens"),
    body=vqvae,
    description="VQ-VAE depth codebook (10x10 grid of K codes) trained on the teacher maps",
)
TOKENIZE_DEPTH = StageSpec(
    name="tokenize_depth",
    upstream=("teacher_depth", "train_vqvae"),
    sections=("vqvae.grid", "vqvae.input_size"),
    code=("perceptio_core.depth_maps", "perceptio_core.depth_tokens", "perceptio_core.vqvae",
          "tasks.depth"),
    body=tokenize,
    description="100 depth-code indices per image",
)
