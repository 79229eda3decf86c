"""Stages ``train_vqvae`` and ``tokenize_depth`` (SPEC §2: the depth codebook, every map as N codes)."""

from __future__ import annotations

from tasks.runner import StageContext, StageOutput, StageSpec

FIGURE_ROWS = 4
CURVE_TERMS = ("loss", "mse", "commit", "batch_usage", "batch_perplexity")


def train_vqvae(ctx: StageContext) -> StageOutput:
    import numpy as np

    from perceptio_core.depth.maps import DepthMaps
    from perceptio_core.depth.tokenizer import DepthTokenizer
    from perceptio_core.evaluation import viz
    from perceptio_core.training import vqvae_fit
    from perceptio_core.training.schedule import split_by_digest
    from perceptio_core.training.trainer import FINAL, HISTORY, read_history
    from tasks.common import load_sources, publish_training, scratch_dir
    from tasks.progress import Progress

    cfg = ctx.cfg.vqvae
    maps = DepthMaps(ctx.upstream_dir("teacher_depth"))
    train, hold = split_by_digest(sorted(maps.digests), cfg.holdout_fraction)
    out = scratch_dir(ctx)
    prog = Progress("train vqvae", ctx.log)
    metrics = vqvae_fit.train_vqvae(
        maps.stack(train), maps.stack(hold), cfg, out, device=ctx.cfg.run.device, progress=prog,
        parents={n: r.key for n, r in ctx.upstream.items()},
    )  # fmt: skip
    prog.close()
    figures = publish_training(ctx, out, model_prefix="")
    ctx.writer.write_json("split.json", {"train": train, "holdout": hold})
    history = [{k: r[k] for k in ("step", *CURVE_TERMS)} for r in read_history(out / HISTORY)]
    with ctx.writer.atomic("loss_curve.png") as f:
        viz.loss_curves(history, f, title="VQ-VAE training")
    figures["VQ-VAE training loss"] = "loss_curve.png"
    images = {r.digest: r for r in load_sources(ctx).depth_images()}
    shown = [d for d in hold if images.get(d) is not None][:FIGURE_ROWS]
    if shown:
        tok = DepthTokenizer.from_pretrained(out / FINAL, device=ctx.cfg.run.device)
        teacher = maps.stack(shown)
        recon = tok.decode(tok.encode(teacher)).cpu().numpy()
        rows = []
        for d, t, r in zip(shown, teacher, recon):
            true = np.load(images[d].depth_path) if images[d].depth_path else None
            rows.append((np.asarray(viz.load_rgb(images[d].path)), true, t, r))
        with ctx.writer.atomic("reconstructions.png") as f:
            viz.depth_grid(rows, ["image", "true depth", "teacher", "VQ-VAE reconstruction"], f, metric_columns=[1])
        figures["held-out: image | true depth | teacher | VQ-VAE reconstruction"] = "reconstructions.png"
    metrics.update({"train_maps": len(train), "holdout_maps": len(hold)})
    return StageOutput(metrics=metrics, figures=figures)


# ---- tokenize_depth -----------------------------------------------------------------------------


def tokenize_depth(ctx: StageContext) -> StageOutput:
    import hashlib

    import numpy as np
    import torch

    from perceptio_core.depth.maps import DepthMaps
    from perceptio_core.depth.tokenizer import DepthTokenizer
    from perceptio_core.depth.vqvae import code_statistics
    from tasks.progress import Progress

    maps = DepthMaps(ctx.upstream_dir("teacher_depth"))
    tok = DepthTokenizer.from_pretrained(ctx.upstream_dir("train_vqvae"), device=ctx.cfg.run.device)
    digests = sorted(maps.digests)
    out = np.zeros((len(digests), tok.num_tokens), dtype=np.int32)  # K and N are the codebook's
    prog = Progress("tokenize depth", ctx.log)
    for i, (ds, batch) in enumerate(maps.batches(digests, 256)):
        out[i * 256 : i * 256 + len(ds)] = tok.encode(batch).cpu().numpy()
        prog(min((i + 1) * 256, len(digests)), len(digests))
    prog.close()
    with ctx.writer.atomic("tokens.npy") as f:
        np.save(f, out)
    ctx.writer.write_json("digests.json", digests)
    stats = code_statistics(torch.from_numpy(out), tok.codebook_size)
    metrics = {
        "images": len(digests),
        "tokens_per_image": tok.num_tokens,
        "code_usage": stats["usage"],
        "perplexity": stats["perplexity"],
        "tokens_sha256": hashlib.sha256(out.tobytes()).hexdigest()[:16],
    }
    return StageOutput(metrics=metrics)


TRAIN_VQVAE = StageSpec(
    name="train_vqvae",
    upstream=("sources", "teacher_depth"),
    sections=("vqvae",),
    body=train_vqvae,
    description="VQ-VAE depth codebook (a grid of K codes) trained on the teacher maps",
)
TOKENIZE_DEPTH = StageSpec(
    name="tokenize_depth",
    upstream=("teacher_depth", "train_vqvae"),
    sections=(),  # everything it depends on is in the codebook artifact (K, grid, map size)
    body=tokenize_depth,
    description="N depth-code indices per image (N = grid^2 of the codebook)",
)
