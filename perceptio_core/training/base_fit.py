"""The offline default's ``base`` stage (ARCHITECTURE "finetune"; SPEC §4 at toy scale): fit a tiny
InternVL on the world's captions and multiple-choice VQA, **without** perception tokens, with the
same training loop as fine-tuning (:mod:`perceptio_core.training.trainer`): LLM next-token NLL of the answer
only (image and prompt masked), full fine-tuning, no LoRA.

The result is saved with ``save_pretrained`` (model + tokenizer in one directory), so ``finetune``
loads it through :func:`perceptio_core.model.internvl.load_internvl` / ``load_tokenizer`` exactly as it
would load a released InternVL2.5 "-hf" directory.

Examples are ``(image path, prompt, answer)`` triples given by the caller:
captions (COCO captions JSON: prompt "Describe the image briefly.", answer the caption), VQA
(prompt = question + lettered options, answer = the letter) and, with ``base.grounding``, region
descriptions (:func:`grounding_examples`: "Describe <expression> in one sentence." -> "A small red
ball on the left side of the image."), as InternVL2.5 is pre-trained on grounding data. Without
them the stand-in base never learns which object an expression names: its vision tower (frozen in
fine-tuning, SPEC §4) sees captions only, and the fine-tuned model's [SEG] masks cover several
objects. Prompts are encoded exactly as
fine-tuning and generation encode them (:func:`perceptio_core.model.batching.encode_prompt`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from perceptio_core.model.batching import encode_image, encode_prompt, encode_target
from perceptio_core.config import PerceptioConfig
from perceptio_core.model.internvl import build_tiny_internvl, load_internvl, load_tokenizer, train_tokenizer, turn_end_id
from perceptio_core.model.processor import TileProcessor
from perceptio_core.curation.describe import describe_object, position_phrase
from perceptio_core.model.losses import IGNORE, llm_loss, shift_for_next_token
from perceptio_core.data.masks import mask_centroid
from perceptio_core.format.prompts import TEMPLATES, clean_expression, format_mc_prompt, hardblink_text
from perceptio_core.data.records import Sources
from perceptio_core.data.refer import MaskError, ann_to_mask
from perceptio_core.device import ProgressFn
from perceptio_core.training.trainer import TrainTask, run_training

TOKENIZER_DIR = "tokenizer"
GROUNDING_PROMPT = "Describe {expr} in one sentence."
CAPTION_PROMPT = "Describe the image briefly."


def grounding_examples(sources: Sources) -> list[tuple[str, str, str]]:
    """``(image path, prompt, answer)`` per distinct (object, expression) of the REFER trees'
    TRAIN splits, on images no dataset evaluates on (an image in any val/test split is left out
    whole): prompt :data:`GROUNDING_PROMPT`, answer the object's one-sentence description
    (category, attributes, position by thirds; no distance: the base has no teacher), the same
    sentence fine-tuning answers with. Objects whose mask cannot be decoded or is empty are
    skipped (curation reports them). Sorted by (image, annotation, sentence)."""
    eval_images = sources.eval_image_ids()
    centres: dict[int, tuple[float, float] | None] = {}  # ann_id -> mask centroid (one decode per object)
    seen: dict[tuple[int, int, str], tuple[str, str, str]] = {}
    for r in sources.refs:
        img = sources.coco_images.get(r.image_id)
        if r.split != "train" or r.image_id in eval_images or r.iscrowd or img is None:
            continue
        expr = clean_expression(r.sentence)
        key = (r.image_id, r.ann_id, expr.lower())
        if not expr or key in seen:
            continue
        if r.ann_id not in centres:
            try:
                centres[r.ann_id] = mask_centroid(ann_to_mask(r.segmentation, img.height, img.width).astype(bool))
            except MaskError:
                centres[r.ann_id] = None
        centre = centres[r.ann_id]
        if centre is None:
            continue
        answer = describe_object(r.category, r.attributes, position_phrase(*centre, img.width, img.height), None)
        seen[key] = (img.path, GROUNDING_PROMPT.format(expr=expr), answer)
    return [seen[k] for k in sorted(seen)]


def instruction_examples(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
                         ) -> list[tuple[str, str, str]]:
    """``(image path, prompt, answer)`` of a LLaVA-1.5 instruction JSON (SPEC §5): for each entry
    with an image that exists (under ``image_root``, default the JSON's folder), every round as
    curation reads it (:func:`perceptio_core.curation.instructions.llava_rounds`: ``<image>``
    removed), each its own single-turn example; text-only entries and the rest are left out. The
    world's file holds its train-split multiple-choice questions, MMBench-style, and a yes/no
    question per image, MME-style."""
    from perceptio_core.curation.instructions import json_records, llava_rounds
    from perceptio_core.data.image_io import confined

    root = Path(image_root) if image_root is not None else Path(path).parent
    out = []
    for entry in json_records(path):
        if not isinstance(entry, dict) or not entry.get("image") or not isinstance(entry.get("conversations"), list):
            continue
        rounds = llava_rounds(entry["conversations"])  # None: malformed (curate quarantines it, naming it)
        image = confined(root, entry["image"])  # an image named outside the root, or not a file: left out
        if rounds and image is not None and image.is_file():
            out += [(str(image), *r) for r in rounds]
    return out


HARDBLINK_POINTS = (3, 4, 5)  # SPEC §6: the point counts HardBLINK asks about


def base_examples(
    sources: Sources, grounding: bool = True, instructions: Sequence[tuple[str, str, str]] = ()
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``(examples, texts)`` of the base fit. ``examples``: ``(image path, prompt, answer)`` of the
    world's captions (prompt :data:`CAPTION_PROMPT`), the TRAIN-split multiple-choice VQA of
    ``sources`` (evaluation splits are never trained on; the pipeline's training sources carry
    none), the ``instructions`` (:func:`instruction_examples`: the world's LLaVA file holds its
    train-split VQA) and, with ``grounding``, the descriptions of the training-split referred
    objects (:func:`grounding_examples`). ``texts``: what the tokenizer is trained on besides them
    (every prompt template, referring expression, ADE20k class name and the HardBLINK question as
    depth chain-of-thought training asks it, :func:`~perceptio_core.format.prompts.hardblink_text`,
    so fine-tuning text is covered without reading the benchmark)."""
    examples = []
    for image_id, caption in sources.captions:
        img = sources.coco_images.get(image_id)
        if img is not None:
            examples.append((img.path, CAPTION_PROMPT, caption))
    for q in sources.mcq:
        if q.split == "train":
            examples.append((q.image_path, format_mc_prompt(q.question, q.options, q.hint), q.answer))
    examples += [tuple(e) for e in instructions]
    if grounding:
        examples += grounding_examples(sources)
    texts = [t for ts in TEMPLATES.values() for t in ts]
    texts += sorted({r.sentence for r in sources.refs})
    texts += sorted({hardblink_text(list("ABCDEFGH"[:n])) for n in HARDBLINK_POINTS})
    texts += sorted(sources.ade_classes.values()) if sources.ade_classes else []
    return examples, texts


def normalize_examples(examples: Iterable[Sequence[Any]]) -> list[tuple[str, str, str]]:
    """``(image path, prompt, answer)`` triples (or dicts with those keys) as string tuples."""
    out = []
    for e in examples:
        if isinstance(e, dict):
            e = (e["image"], e["prompt"], e["answer"])
        path, prompt, answer = e
        out.append((str(path), str(prompt), str(answer)))
    if not out:
        raise ValueError("no examples to fit the base on")
    return out


class ExampleDataset(Dataset):
    """``ds[i]`` -> ``(image bytes, prompt, answer)`` (the image file read in the loader worker)."""

    def __init__(self, examples: Sequence[tuple[str, str, str]]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[bytes, str, str]:
        path, prompt, answer = self.examples[int(i)]
        return Path(path).read_bytes(), prompt, answer


class LMCollator:
    """``[(image, prompt, answer)] -> {input_ids, attention_mask, labels, pixel_values, num_tiles}``:
    the prompt part as in fine-tuning (chat template, image tokens + prompt, masked with -100), the
    answer + turn end as the target; the image through ``processor`` (dynamic tiling; the tiles of
    every item concatenated, ``num_tiles`` [B] per item); right padding; sequences longer than
    ``max_length`` lose the end of their answer."""

    def __init__(self, tokenizer: Any, processor: TileProcessor, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length
        self.pad_id = int(tokenizer.pad_token_id)
        self.end_id = turn_end_id(tokenizer)

    def __call__(self, items: Sequence[tuple[Any, str, str]]) -> dict[str, torch.Tensor]:
        seqs = []
        tiles = [encode_image(self.processor, img)[1] for img, _, _ in items]
        for (_, prompt, answer), px in zip(items, tiles):
            p = encode_prompt(self.tokenizer, prompt, self.processor.tokens_per_tile * len(px))
            t = encode_target(self.tokenizer, answer, self.end_id)
            ids = (p + t)[: self.max_length]
            seqs.append((ids, [IGNORE] * len(p) + ids[len(p) :]))
        b, t = len(seqs), max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, : len(ids)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": torch.cat(tiles), "num_tiles": torch.tensor([len(t) for t in tiles])}  # fmt: skip


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_llm (SPEC §3) of an InternVL on a batch of :class:`LMCollator`."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    )
    logits, targets = shift_for_next_token(out.logits, batch["labels"])
    return llm_loss(logits, targets)


@torch.no_grad()
def image_reliance(
    model: nn.Module, tokenizer: Any, examples: Sequence[tuple[str, str, str]], max_examples: int = 64,
    batch_size: int = 16, processor: TileProcessor | None = None,
) -> dict[str, float]:
    """How much a fitted base reads its image: the answer NLL per token of ``examples`` (``(image
    path, prompt, answer)``, at most ``max_examples`` spread evenly) with their own images
    (``image_loss``) and with each example given the next example's image (``shuffled_image_loss``);
    ``image_gain`` is the difference. A base that answers from the text alone has a gain near 0,
    whatever its loss: its vision tower is then no use to fine-tuning. Pass examples whose answer
    depends on the image (captions), of distinct images. ``processor``: the model's image
    processor (default: one tile of its vision size)."""
    items = list(examples)
    if len(items) < 2:
        raise ValueError("image_reliance needs at least 2 examples of distinct images")
    if len(items) > max_examples:
        items = [items[i * len(items) // max_examples] for i in range(max_examples)]
    collate = LMCollator(tokenizer, processor or TileProcessor.for_model(model.config), 1 << 30)
    images = [Path(path).read_bytes() for path, _, _ in items]
    views = {
        "image_loss": [(img, p, a) for img, (_, p, a) in zip(images, items)],
        "shuffled_image_loss": [(images[i - 1], p, a) for i, (_, p, a) in enumerate(items)],
    }
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {name: 0.0 for name in views}
    count = 0
    for name, view in views.items():
        for lo in range(0, len(view), batch_size):
            part = {k: v.to(device) for k, v in collate(view[lo : lo + batch_size]).items()}
            n = int((part["labels"][:, 1:] != IGNORE).sum())
            count += n if name == "image_loss" else 0
            totals[name] += float(lm_loss(model, part)) * n  # lm_loss is this part's token mean
    model.train(was_training)
    result = {k: v / max(count, 1) for k, v in totals.items()}
    result["image_gain"] = result["shuffled_image_loss"] - result["image_loss"]
    return result


def caption_reliance(model_dir: str | os.PathLike[str], examples: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """:func:`image_reliance` of the base saved in ``model_dir`` on the captions among ``examples``
    (one per image); ``{}`` when there are fewer than two captioned images."""
    captions = list({path: (path, p, a) for path, p, a in examples if p == CAPTION_PROMPT}.values())
    if len(captions) < 2:
        return {}
    model = load_internvl(model_dir)
    return image_reliance(model, load_tokenizer(model_dir), captions,
                          processor=TileProcessor.for_model(model.config, [model_dir]))  # fmt: skip


class BaseFitTask(TrainTask):
    """The ``base`` stage as a :class:`TrainTask`: tokenizer trained once (process 0) into
    ``<out>/tokenizer`` and reused on resume, tiny InternVL from ``cfg.model.tiny``, all trainable."""

    name = "base"

    def __init__(
        self,
        examples: Sequence[tuple[str, str, str]],
        cfg: PerceptioConfig,
        out_dir: str | os.PathLike[str],
        tokenizer_texts: Iterable[str] | None = None,
        fresh: bool = False,
    ) -> None:
        self.examples = normalize_examples(examples)
        self.fresh = fresh
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.tokenizer_texts = list(tokenizer_texts) if tokenizer_texts is not None else None
        self.tokenizer: Any = None
        self.model_config: Any = None

    def _tokenizer(self) -> Any:
        from accelerate import PartialState

        state = PartialState()
        tok_dir = self.out_dir / TOKENIZER_DIR
        if state.is_main_process and (self.fresh or not (tok_dir / "tokenizer.json").is_file()):
            texts = [p for _, p, _ in self.examples] + [a for _, _, a in self.examples]
            texts += self.tokenizer_texts or []
            tmp = self.out_dir / f".tmp-{TOKENIZER_DIR}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            train_tokenizer(texts, self.cfg.model.tiny.tokenizer_vocab_size, tmp)
            shutil.rmtree(tok_dir, ignore_errors=True)
            os.replace(tmp, tok_dir)
        state.wait_for_everyone()
        return load_tokenizer(tok_dir)

    def build_model(self) -> nn.Module:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = self._tokenizer()
        model = build_tiny_internvl(self.cfg.model.tiny, self.tokenizer, seed=self.cfg.base.seed)
        self.model_config = model.config
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def build_dataset(self) -> Dataset:
        return ExampleDataset(self.examples)

    @property
    def processor(self) -> TileProcessor:
        """The tiny base's image processor, tiled up to ``model.max_tiles`` (saved with the model)."""
        return TileProcessor.for_model(self.model_config).with_max_tiles(self.cfg.model.max_tiles)

    def build_collate(self) -> LMCollator:
        return LMCollator(self.tokenizer, self.processor, self.cfg.model.max_length)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        llm = lm_loss(model, batch)
        return {"loss": llm, "llm": llm}

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))
        self.tokenizer.save_pretrained(str(out_dir))
        self.processor.save_pretrained(out_dir)  # as a released "-hf" checkpoint ships it

    def fingerprint(self) -> dict[str, Any]:
        h = hashlib.sha256(json.dumps(self.examples).encode())
        if self.tokenizer_texts:
            h.update(json.dumps(self.tokenizer_texts).encode())
        from perceptio_core.config import to_dict

        return {"examples": h.hexdigest()[:16], "tiny": to_dict(self.cfg.model.tiny),
                "max_length": self.cfg.model.max_length, "max_tiles": self.cfg.model.max_tiles}  # fmt: skip


def fit_base(
    examples: Iterable[Sequence[Any]],
    cfg: PerceptioConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = True,
    progress: ProgressFn | None = None,
    tokenizer_texts: Iterable[str] | None = None,
    parents: dict[str, str] | None = None,
    grad_dump_dir: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Fit the tiny base on ``examples`` (``(image path, prompt, answer)``) with ``cfg.base``.

    ``out_dir`` is a durable scratch directory (checkpoints, history, plots); the fitted base, in
    the transformers InternVL layout with its tokenizer, is ``<out_dir>/model``. ``tokenizer_texts``:
    extra texts the BPE tokenizer is trained on (e.g. the fine-tuning prompts and answers).
    Returns the loop's metrics (``loss_first``, ``loss_last``, ``llm_first``, ``llm_last``, ...).
    """
    task = BaseFitTask(list(examples), cfg, out_dir, tokenizer_texts, fresh=not resume)
    return run_training(
        task, cfg.base, out_dir, device=cfg.run.device, resume=resume, progress=progress,
        parents=parents, grad_dump_dir=grad_dump_dir,
    )  # fmt: skip


__all__ = [
    "GROUNDING_PROMPT",
    "BaseFitTask",
    "ExampleDataset",
    "LMCollator",
    "fit_base",
    "grounding_examples",
    "image_reliance",
    "lm_loss",
    "normalize_examples",
]
