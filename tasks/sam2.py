"""Stage ``fit_sam2`` (offline default): a small SAM2 pre-trained for promptable segmentation,
standing in for Meta's released checkpoint."""

from __future__ import annotations

from perceptio_core.config import PerceptioConfig
from tasks.runner import StageContext, StageOutput, StageSpec


def fit_sam2(ctx: StageContext) -> StageOutput:
    from perceptio_core.training import sam2_fit
    from tasks.common import load_sources, publish_training, scratch_dir
    from tasks.progress import Progress

    sources = load_sources(ctx)
    out = scratch_dir(ctx)
    prog = Progress("fit SAM2", ctx.log)
    metrics = sam2_fit.fit_sam2(sources, ctx.cfg, out, resume=True, progress=prog,
                       parents={n: r.key for n, r in ctx.upstream.items()})  # fmt: skip
    prog.close()
    figures = publish_training(ctx, out)
    if (out / sam2_fit.FIGURE).is_file():
        ctx.writer.add_file(out / sam2_fit.FIGURE, sam2_fit.FIGURE)
        figures["held-out images: point prompt, true mask, SAM2 mask"] = sam2_fit.FIGURE
    ctx.log.info(
        "fit_sam2: point-prompt mIoU on held-out images %.3f (untrained %.3f, training images %.3f%s)",
        metrics["holdout_point_miou"], metrics["init_point_miou"], metrics["train_point_miou"],
        f"; held-out after the prompt phase {metrics['prompt_phase_holdout_point_miou']:.3f}"
        if "prompt_phase_holdout_point_miou" in metrics else "",
    )
    return StageOutput(metrics=metrics, figures=figures)


def _sam2_enabled(cfg: PerceptioConfig) -> bool:
    return not cfg.model.sam2_checkpoint


FIT_SAM2 = StageSpec(
    name="fit_sam2",
    upstream=("sources",),
    sections=("model.sam2_variant", "sam2_fit"),
    body=fit_sam2,
    description="a small SAM2 pre-trained for promptable segmentation on the world's masks (offline default)",
    enabled=_sam2_enabled,
)
