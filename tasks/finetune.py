"""Stage ``finetune`` (SPEC §3, §4): LoRA fine-tuning with perception tokens."""

from __future__ import annotations

from tasks.checkpoints import model_fingerprint
from tasks.runner import StageContext, StageOutput, StageSpec


def finetune(ctx: StageContext) -> StageOutput:
    from perceptio_core.training import finetune as finetune_fit
    from perceptio_core.training.sam2_fit import CHECKPOINT
    from tasks.common import publish_training, scratch_dir
    from tasks.progress import Progress

    out = scratch_dir(ctx)
    base_dir = ctx.upstream_dir("base") / "model" if "base" in ctx.upstream else None
    sam2_ckpt = ctx.upstream_dir("fit_sam2") / "model" / CHECKPOINT if "fit_sam2" in ctx.upstream else None
    prog = Progress("finetune", ctx.log)
    metrics = finetune_fit.finetune(
        ctx.cfg, ctx.upstream_dir("curate"), out,
        base_dir=base_dir,
        depth_tokenizer=ctx.upstream_dir("train_vqvae"),
        depth_maps_dir=ctx.upstream_dir("teacher_depth"),
        sam2_checkpoint=sam2_ckpt,
        resume=True, progress=prog,
        parents={n: r.key for n, r in ctx.upstream.items()},
    )
    prog.close()
    figures = publish_training(ctx, out)
    return StageOutput(metrics=metrics, figures=figures)


FINETUNE = StageSpec(
    name="finetune",
    upstream=("base", "fit_sam2", "curate", "teacher_depth", "train_vqvae"),
    sections=("model", "loss", "finetune"),
    body=finetune,
    fingerprint=model_fingerprint,  # model.base / tokenizer / sam2_checkpoint: found and keyed on content
    description="LoRA fine-tuning with perception tokens (InternVL + SAM2 mask decoder + frozen VQ-VAE)",
)
