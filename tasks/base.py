"""Stage ``base`` (offline default): the tiny InternVL fitted on the world's captions, VQA and
region descriptions, standing in for InternVL2.5."""

from __future__ import annotations

from pathlib import Path

from perceptio_core.training.base_fit import fit_base, grounding_examples, image_reliance
from perceptio_core.config import PerceptioConfig
from perceptio_core.format.prompts import TEMPLATES, format_mc_prompt
from perceptio_core.data.records import Sources
from tasks.common import load_sources, publish_training, scratch_dir
from tasks.progress import Progress
from tasks.runner import StageContext, StageOutput, StageSpec

CAPTION_PROMPT = "Describe the image briefly."


def base_examples(sources: Sources, grounding: bool = True) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(image, prompt, answer) triples of the base fit: the world's captions, its TRAIN-split
    multiple-choice VQA (evaluation splits are never trained on) and, with ``grounding``, the
    descriptions of the training-split referred objects (:func:`grounding_examples`); plus the
    texts the tokenizer is trained on (every prompt template and referring expression, so
    fine-tuning text is covered)."""
    examples = []
    for image_id, caption in sources.captions:
        img = sources.coco_images.get(image_id)
        if img is not None:
            examples.append((img.path, CAPTION_PROMPT, caption))
    for q in sources.vqa:
        if q.split == "train":
            examples.append((q.image_path, format_mc_prompt(q.question, q.options, q.hint), q.answer))
    if grounding:
        examples += grounding_examples(sources)
    texts = [t for ts in TEMPLATES.values() for t in ts]
    texts += sorted({r.sentence for r in sources.refs})
    texts += sorted({h.question for h in sources.hardblink})
    texts += sorted(sources.ade_classes.values()) if sources.ade_classes else []
    return examples, texts


def base_image_reliance(model_dir: Path, examples: list[tuple[str, str, str]]) -> dict[str, float]:
    """:func:`~perceptio_core.training.base_fit.image_reliance` of the fitted base on its captions (one per
    image): does it read the image at all?"""
    from perceptio_core.model.internvl import load_internvl, load_tokenizer

    captions = list({path: (path, p, a) for path, p, a in examples if p == CAPTION_PROMPT}.values())
    if len(captions) < 2:
        return {}
    return image_reliance(load_internvl(model_dir), load_tokenizer(model_dir), captions)


def base(ctx: StageContext) -> StageOutput:
    sources = load_sources(ctx)
    examples, texts = base_examples(sources, ctx.cfg.base.grounding)
    if not examples:
        raise RuntimeError("base: the sources have no captions or train-split VQA to fit a base on")
    out = scratch_dir(ctx)
    prog = Progress("fit base", ctx.log)
    metrics = fit_base(
        examples, ctx.cfg, out, resume=True, progress=prog, tokenizer_texts=texts,
        parents={n: r.key for n, r in ctx.upstream.items()},
    )
    prog.close()
    figures = publish_training(ctx, out)
    metrics = {**metrics, "examples": len(examples), **base_image_reliance(out / "model", examples)}
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
    sections=("model.tiny", "base"),
    body=base,
    description="the tiny InternVL base fitted on the world's captions, VQA and region descriptions (offline default)",
    enabled=_base_enabled,
)
