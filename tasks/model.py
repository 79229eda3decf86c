"""Stages ``base``, ``finetune`` and ``evaluate`` (SPEC §3, §4, §6)."""

from __future__ import annotations

import shutil
from pathlib import Path

from perceptio_core.base_fit import fit_base
from perceptio_core.config import PerceptioConfig
from perceptio_core.depth_maps import DepthMaps
from perceptio_core.evaluate import format_mc_prompt, make_predictors, run_evaluation, write_report
from perceptio_core.finetune import train as finetune_train
from perceptio_core.infer import load_model
from perceptio_core.internvl import load_internvl, load_tokenizer
from perceptio_core.prompts import TEMPLATES
from perceptio_core.records import Sources
from perceptio_core.sam2_fit import CHECKPOINT, fit_sam2
from perceptio_core.sam2_fit import FIGURE as SAM2_FIGURE
from tasks.depth import load_sources
from tasks.progress import Progress
from tasks.runner import StageContext, StageOutput, StageSpec

CAPTION_PROMPT = "Describe the image briefly."


def _scratch(ctx: StageContext) -> Path:
    """A durable local folder for a training stage's checkpoints: a rerun resumes from it."""
    p = ctx.run.workdir / "cache" / f"{ctx.spec.name}-{ctx.key}"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _publish_training(ctx: StageContext, out: Path) -> dict[str, str]:
    """Copy a training run's final model, history and loss curves into the artifact."""
    ctx.writer.add_tree(out / "model", "model")
    for name in ("history.jsonl", "metrics.json"):
        if (out / name).exists():
            ctx.writer.add_file(out / name, name)
    figures = {}
    if (out / "plots").is_dir():
        for p in sorted((out / "plots").glob("*.png")):
            ctx.writer.add_file(p, f"plots/{p.name}")
            figures[f"loss curve: {p.stem.removeprefix('loss_')}"] = f"plots/{p.name}"
    return figures


# ---- base ---------------------------------------------------------------------------------------


def base_examples(sources: Sources) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(image, prompt, answer) triples of the base fit: the world's captions and its TRAIN-split
    multiple-choice VQA (evaluation splits are never trained on); plus the texts the tokenizer is
    trained on (every prompt template and referring expression, so fine-tuning text is covered)."""
    examples = []
    for image_id, caption in sources.captions:
        img = sources.coco_images.get(image_id)
        if img is not None:
            examples.append((img.path, CAPTION_PROMPT, caption))
    for q in sources.vqa:
        if q.split == "train":
            examples.append((q.image_path, format_mc_prompt(q.question, q.options, q.hint), q.answer))
    texts = [t for ts in TEMPLATES.values() for t in ts]
    texts += sorted({r.sentence for r in sources.refs})
    texts += sorted({h.question for h in sources.hardblink})
    texts += sorted(sources.ade_classes.values()) if sources.ade_classes else []
    return examples, texts


def base(ctx: StageContext) -> StageOutput:
    sources = load_sources(ctx)
    examples, texts = base_examples(sources)
    if not examples:
        raise RuntimeError("base: the sources have no captions or train-split VQA to fit a base on")
    out = _scratch(ctx)
    prog = Progress("fit base", ctx.log)
    metrics = fit_base(
        examples, ctx.cfg, out, resume=True, progress=prog, tokenizer_texts=texts,
        parents={n: r.key for n, r in ctx.upstream.items()},
    )
    prog.close()
    figures = _publish_training(ctx, out)
    metrics = {**metrics, "examples": len(examples)}
    return StageOutput(metrics=metrics, figures=figures)


# ---- fit_sam2 -----------------------------------------------------------------------------------


def sam2(ctx: StageContext) -> StageOutput:
    sources = load_sources(ctx)
    out = _scratch(ctx)
    prog = Progress("fit SAM2", ctx.log)
    metrics = fit_sam2(sources, ctx.cfg, out, resume=True, progress=prog,
                       parents={n: r.key for n, r in ctx.upstream.items()})  # fmt: skip
    prog.close()
    figures = _publish_training(ctx, out)
    if (out / SAM2_FIGURE).is_file():
        ctx.writer.add_file(out / SAM2_FIGURE, SAM2_FIGURE)
        figures["held-out images: point prompt, true mask, SAM2 mask"] = SAM2_FIGURE
    ctx.log.info(
        "fit_sam2: point-prompt mIoU on held-out images %.3f (untrained %.3f, training images %.3f)",
        metrics["holdout_point_miou"], metrics["init_point_miou"], metrics["train_point_miou"],
    )
    return StageOutput(metrics=metrics, figures=figures)


def _sam2_enabled(cfg: PerceptioConfig) -> bool:
    return not cfg.model.sam2_checkpoint


# ---- finetune -----------------------------------------------------------------------------------


def finetune(ctx: StageContext) -> StageOutput:
    out = _scratch(ctx)
    base_dir = ctx.upstream_dir("base") / "model" if "base" in ctx.upstream else None
    sam2_ckpt = ctx.upstream_dir("fit_sam2") / "model" / CHECKPOINT if "fit_sam2" in ctx.upstream else None
    prog = Progress("finetune", ctx.log)
    metrics = finetune_train(
        ctx.cfg, ctx.upstream_dir("curate"), out,
        base_dir=base_dir,
        depth_tokenizer=ctx.upstream_dir("train_vqvae"),
        depth_maps_dir=ctx.upstream_dir("teacher_depth"),
        sam2_checkpoint=sam2_ckpt,
        resume=True, progress=prog,
        parents={n: r.key for n, r in ctx.upstream.items()},
    )
    prog.close()
    figures = _publish_training(ctx, out)
    return StageOutput(metrics=metrics, figures=figures)


# ---- evaluate -----------------------------------------------------------------------------------


def evaluate(ctx: StageContext) -> StageOutput:
    cfg = ctx.cfg
    sources = load_sources(ctx)
    device = cfg.run.device if cfg.run.device != "auto" else "cpu"
    model = load_model(ctx.upstream_dir("finetune") / "model", device=device)
    base_model = base_tok = None
    if cfg.evaluate.compare_base:
        base_dir = ctx.upstream_dir("base") / "model" if "base" in ctx.upstream else cfg.model.base
        base_model = load_internvl(str(base_dir))
        base_tok = load_tokenizer(str(base_dir) if cfg.model.tokenizer is None else cfg.model.tokenizer)
    preds = make_predictors(model, cfg.evaluate, base_model=base_model, base_tokenizer=base_tok)
    prog = Progress("evaluate", ctx.log)
    ev = run_evaluation(
        sources=sources, cfg=cfg.evaluate, **preds,
        teacher_maps=DepthMaps(ctx.upstream_dir("teacher_depth")),
        num_tokens=model.num_depth_tokens, codebook_size=model.codebook_size, progress=prog,
    )
    prog.close()
    report_dir = ctx.run.workdir / "cache" / f"evaluate-{ctx.key}"
    shutil.rmtree(report_dir, ignore_errors=True)
    write_report(ev, report_dir)
    ctx.writer.add_tree(report_dir, "report")
    ctx.writer.write_json("metrics.json", ev.metrics)
    figures = {
        f"sample: {p.stem}": f"report/{p.relative_to(report_dir).as_posix()}"
        for p in sorted(report_dir.rglob("*.png"))[:8]
    }
    return StageOutput(metrics=dict(ev.metrics), figures=figures)


def _base_enabled(cfg: PerceptioConfig) -> bool:
    return not cfg.model.base


_MODEL_CODE = ("tasks.model", "tasks.depth", "perceptio_core.internvl", "perceptio_core.sam2_decoder",
               "perceptio_core.perceptio_model", "perceptio_core.losses", "perceptio_core.batching",
               "perceptio_core.trainer", "perceptio_core.schedule", "perceptio_core.wds_loader",
               "perceptio_core.depth_tokens", "perceptio_core.vqvae", "perceptio_core.perception_tokens")

BASE = StageSpec(
    name="base",
    upstream=("sources",),
    sections=("model.tiny", "base"),
    code=_MODEL_CODE + ("perceptio_core.base_fit", "perceptio_core.evaluate", "perceptio_core.prompts"),
    body=base,
    description="the tiny InternVL base fitted on the world's captions and VQA (offline default)",
    enabled=_base_enabled,
)
FIT_SAM2 = StageSpec(
    name="fit_sam2",
    upstream=("sources",),
    sections=("model.sam2_variant", "sam2_fit"),
    code=("tasks.model", "tasks.depth", "perceptio_core.sam2_fit", "perceptio_core.sam2_decoder",
          "perceptio_core.losses", "perceptio_core.trainer", "perceptio_core.schedule", "perceptio_core.masks",
          "perceptio_core.refer"),
    body=sam2,
    description="a small SAM2 pre-trained for promptable segmentation on the world's masks (offline default)",
    enabled=_sam2_enabled,
)
FINETUNE = StageSpec(
    name="finetune",
    upstream=("base", "fit_sam2", "curate", "teacher_depth", "train_vqvae"),
    sections=("model", "loss", "finetune"),
    code=_MODEL_CODE + ("perceptio_core.finetune",),
    body=finetune,
    description="LoRA fine-tuning with perception tokens (InternVL + SAM2 mask decoder + frozen VQ-VAE)",
)
EVALUATE = StageSpec(
    name="evaluate",
    upstream=("sources", "teacher_depth", "finetune", "base"),
    sections=("evaluate",),
    code=_MODEL_CODE + ("perceptio_core.evaluate", "perceptio_core.metrics", "perceptio_core.answers",
                        "perceptio_core.generation", "perceptio_core.infer", "perceptio_core.depth_metrics"),
    body=evaluate,
    description="RefCOCO/+/g cIoU & gIoU, HardBLINK 3/4/5, MC VQA, perception-block and depth quality",
)

