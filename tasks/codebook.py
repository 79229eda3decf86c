"""Stages ``train_vqvae`` and ``tokenize_depth`` (SPEC §2: the depth codebook, every map as N codes)."""

from __future__ import annotations

import hashlib

import numpy as np

from perceptio_core.evaluation import viz
from perceptio_core.depth.maps import DepthMaps
from perceptio_core.depth.tokenizer import DepthTokenizer
from perceptio_core.data.image_io import holdout_by_digest
from perceptio_core.depth.vqvae import train_vqvae
from tasks.common import load_sources
from tasks.progress import Progress
from tasks.runner import StageContext, StageOutput, StageSpec

FIGURE_ROWS = 4


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


TRAIN_VQVAE = StageSpec(
    name="train_vqvae",
    upstream=("sources", "teacher_depth"),
    sections=("vqvae",),
    body=vqvae,
    description="VQ-VAE depth codebook (10x10 grid of K codes) trained on the teacher maps",
)
TOKENIZE_DEPTH = StageSpec(
    name="tokenize_depth",
    upstream=("teacher_depth", "train_vqvae"),
    sections=("vqvae.grid", "vqvae.input_size"),
    body=tokenize,
    description="100 depth-code indices per image",
)
