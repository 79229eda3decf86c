"""Stage ``base`` (offline default): the tiny InternVL fitted on the world's captions, the LLaVA
instruction file (the world's holds its train-split multiple-choice VQA) and region descriptions,
standing in for InternVL2.5. It reads the training sources only: no benchmark (HardBLINK, the VQA
TSV) keys or feeds it."""

from __future__ import annotations

from perceptio_core.config import PerceptioConfig
from tasks.runner import StageContext, StageOutput, StageSpec


def fit_base(ctx: StageContext) -> StageOutput:
    from perceptio_core.data.sources import data_path
    from perceptio_core.training import base_fit
    from tasks.common import load_sources, publish_training, scratch_dir
    from tasks.progress import Progress

    sources = load_sources(ctx)
    instructions = []
    if ctx.cfg.data.llava_json:  # relative to the data root, as the sources stage checked it
        instructions = base_fit.instruction_examples(data_path(sources.root, ctx.cfg.data.llava_json))
    examples, texts = base_fit.base_examples(sources, ctx.cfg.base.grounding, instructions)
    if not examples:
        raise RuntimeError("base: the sources have no captions, instructions or referred objects to fit a base on")
    out = scratch_dir(ctx)
    prog = Progress("fit base", ctx.log)
    metrics = base_fit.fit_base(
        examples, ctx.cfg, out, resume=True, progress=prog, tokenizer_texts=texts,
        parents={n: r.key for n, r in ctx.upstream.items()},
    )
    prog.close()
    figures = publish_training(ctx, out)
    metrics = {**metrics, "examples": len(examples), **base_fit.caption_reliance(out / "model", examples)}
    if "image_gain" in metrics:
        ctx.log.info(
            "base: caption loss %.3f with the true images, %.3f with shuffled ones (image gain %.3f)",
            metrics["image_loss"], metrics["shuffled_image_loss"], metrics["image_gain"],
        )  # fmt: skip
    return StageOutput(metrics=metrics, figures=figures)


def _base_enabled(cfg: PerceptioConfig) -> bool:
    return not cfg.model.base


BASE = StageSpec(
    name="base",
    upstream=("sources",),
    sections=("model.tiny", "base", "data.llava_json"),
    body=fit_base,
    description="the tiny InternVL base fitted on the world's captions, VQA and region descriptions (offline default)",
    enabled=_base_enabled,
)
