"""The offline default's ``fit_sam2`` stage: promptable segmentation pre-training of a small SAM2.

Perceptio fine-tunes a *pre-trained* SAM2: the image encoder stays frozen and only the mask decoder
learns to read the ``[SEG]`` prompt (SPEC §4). Meta's released checkpoints cannot be downloaded
here, so the default profile first trains the small SAM2 of ``model.sam2_variant`` the way SAM2 is
trained on images: given an image and point (and sometimes box) prompts on an object, predict that
object's mask (BCE + Dice on the mask, MSE on the IoU head). Everything trains: the Hiera image
encoder and FPN neck, the prompt encoder, the mask decoder.

Data: the object masks of the REFER annotations on **training images only** (an image that any
dataset puts in a val/test split is never used, so the evaluation masks are never seen), one
example per annotation; a fixed share of the images (``sam2_fit.holdout_fraction``, by image
digest) is held out and scored (mean IoU with a single centre point prompt).

Two phases, for a variant whose mask decoder reads SAM2's high-resolution (stride 4 and 8) features
(``use_high_res_features``, as every released SAM2 and ``tiny-128``):

1. ``prompt`` (``sam2_fit.steps``): the high-resolution projections ``conv_s0``/``conv_s1`` are
   zero and frozen and the decoder does not read them; the model learns to follow its prompt from
   the stride-16 embedding alone.
2. ``refine`` (``sam2_fit.refine_steps``): from the first phase's weights, the projections train
   (starting at zero, so the first step is the first phase's model) and sharpen the masks.

Why two phases: a small SAM2 trained from scratch with its high-resolution features from the start
settles on "every object" masks and never follows its prompts, and the stride-16 embedding alone
caps its masks (docs/experiments.md has the figures).

The result is saved in Meta's release format, ``sam2.pt`` = ``{"model": state_dict}`` with
``SAM2Base`` key names, so the ``finetune`` stage loads it through
:func:`perceptio_core.model.sam2_decoder.load_sam2_checkpoint`, exactly as it loads ``sam2.1_hiera_*.pt``.
The training loop is the project's one loop (:mod:`perceptio_core.training.trainer`): checkpoints, exact
resume, loss curves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from perceptio_core.atomic_io import write_bytes, write_json
from perceptio_core.config import PerceptioConfig, to_dict
from perceptio_core.data.image_io import load_image
from perceptio_core.model.losses import mask_bce_loss, mask_dice_loss
from perceptio_core.data.masks import resize_nearest
from perceptio_core.evaluation.metrics import mask_iou
from perceptio_core.data.records import RefRecord, Sources
from perceptio_core.data.refer import ann_to_mask
from perceptio_core.model.sam2_decoder import SAM2Segmenter, build_sam2, sam2_config, sam2_pixel_values, upsample_logits
from perceptio_core.device import ProgressFn
from perceptio_core.training.schedule import holdout_by_digest
from perceptio_core.training.trainer import TrainTask, run_training

CHECKPOINT = "sam2.pt"  # Meta's layout: {"model": state_dict}


@dataclass(frozen=True)
class MaskExample:
    """One object: its image and its COCO segmentation (polygons or RLE)."""

    image_path: str
    image_digest: str
    width: int
    height: int
    segmentation: Any
    record: str  # "refcoco ann_id=12": for messages

    def mask(self) -> np.ndarray:
        return ann_to_mask(self.segmentation, self.height, self.width)

    def mask_at(self, size: int) -> np.ndarray:
        """The mask resized (nearest) to SAM2's square input, bool [size, size]; may be empty for an
        object thinner than a resized pixel."""
        return resize_nearest(self.mask().astype(np.uint8), size, size).astype(bool)


def mask_examples(sources: Sources) -> list[MaskExample]:
    """One example per annotated object of the REFER trees, on training images only: an image any
    dataset uses in a non-train split is left out whole. Sorted by (image, annotation)."""
    eval_images = sources.eval_image_ids()
    seen: dict[tuple[int, int], RefRecord] = {}
    for r in sources.refs:
        if r.image_id in eval_images or r.iscrowd or r.image_id not in sources.coco_images:
            continue
        seen.setdefault((r.image_id, r.ann_id), r)
    out = []
    for (image_id, ann_id), r in sorted(seen.items()):
        img = sources.coco_images[image_id]
        out.append(MaskExample(img.path, img.digest, img.width, img.height, r.segmentation,
                               f"{r.dataset} ann_id={ann_id}"))  # fmt: skip
    return out


def split_examples(examples: Sequence[MaskExample], fraction: float) -> tuple[list[MaskExample], list[MaskExample]]:
    """``(train, holdout)`` by image digest."""
    train = [e for e in examples if not holdout_by_digest(e.image_digest, fraction)]
    hold = [e for e in examples if holdout_by_digest(e.image_digest, fraction)]
    return train, hold


def sample_prompts(
    mask: np.ndarray, rng: np.random.Generator, max_points: int, box_prob: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Prompts on one object mask [S, S] (input-image pixels): 1..``max_points`` positive points
    drawn inside the mask, and with probability ``box_prob`` its bounding box.

    Returns ``(points [max_points, 2] (x, y), labels [max_points], box [4] or None)``; unused point
    slots have label -1 (SAM's "not a point": they get its not-a-point embedding, as SAM2 pads a
    batch of prompts of different lengths)."""
    ys, xs = np.nonzero(mask)
    points = np.zeros((max_points, 2), np.float32)
    labels = np.full((max_points,), -1, np.int64)
    n = int(rng.integers(1, max_points + 1))
    pick = rng.integers(0, len(xs), size=n)
    points[:n, 0] = xs[pick]
    points[:n, 1] = ys[pick]
    labels[:n] = 1
    box = None
    if rng.random() < box_prob:
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    return points, labels, box


def centre_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel nearest its centre of mass (inside the object even for a ring or an L)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return float(xs[i]), float(ys[i])


class MaskDataset(Dataset):
    """``ds[i]`` -> dict of ``pixel_values`` [3, S, S], ``mask`` [S, S] float, ``points`` [P, 2],
    ``labels`` [P], ``box`` [4], ``has_box``: the image resized to SAM2's square input, the mask
    resized alike (nearest), prompts drawn with a generator seeded by (seed, i) so that a resumed
    run sees the same prompts."""

    def __init__(self, examples: Sequence[MaskExample], image_size: int, max_points: int, box_prob: float,
                 seed: int) -> None:  # fmt: skip
        self.examples = list(examples)
        self.image_size = image_size
        self.max_points = max_points
        self.box_prob = box_prob
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.examples[int(i)]
        s = self.image_size
        image: Image.Image = load_image(e.image_path)
        mask = e.mask_at(s)
        if not mask.any():  # an object too thin to survive the resize: its own centre pixel
            full = e.mask()
            x, y = centre_point(full)
            mask[min(int(y * s / e.height), s - 1), min(int(x * s / e.width), s - 1)] = True
        rng = np.random.default_rng([self.seed, int(i)])
        points, labels, box = sample_prompts(mask, rng, self.max_points, self.box_prob)
        return {
            "pixel_values": sam2_pixel_values(image, s),
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "points": torch.from_numpy(points),
            "labels": torch.from_numpy(labels),
            "box": torch.from_numpy(box if box is not None else np.zeros(4, np.float32)),
            "has_box": torch.tensor(box is not None),
        }


def collate_masks(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def prompt_masks(
    sam2: SAM2Segmenter,
    pixel_values: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    box: torch.Tensor | None = None,
    has_box: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's promptable single-image segmentation (``SAM2Base._forward_sam_heads`` for one mask):
    point prompts [B, P, 2] with labels [B, P] (1 positive, 0 negative, -1 unused) and optional
    boxes [B, 4] where ``has_box``. Returns low-resolution mask logits [B, 1, S/4, S/4] and the
    IoU prediction [B, 1]."""
    features = sam2.encode_image(pixel_values)
    coords, lab = points, labels
    if box is not None and has_box is not None and bool(has_box.any()):
        # a box is two corner points with labels 2 and 3, as SAM2's predictor concatenates them;
        # rows without a box get two unused (-1) slots
        corners = box.view(-1, 2, 2)
        corner_labels = torch.where(has_box[:, None], torch.tensor([2, 3]), torch.tensor([-1, -1]))
        coords = torch.cat([corners, coords], dim=1)
        lab = torch.cat([corner_labels, lab], dim=1)
    sparse, dense = sam2.sam_prompt_encoder(points=(coords, lab), boxes=None, masks=None)
    return sam2.run_mask_decoder(features, sparse, dense)


def batch_mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row IoU [B] of ``logits > 0`` [B, H, W] against a 0/1 ``target`` [B, H, W] (1 when both
    are empty), on the tensors' device: the IoU head's training target. Row for row it equals
    :func:`perceptio_core.evaluation.metrics.mask_iou`, which scores the fitted model."""
    pred = logits > 0
    gt = target > 0.5
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


PHASES = ("prompt", "refine")


class Sam2FitTask(TrainTask):
    """``fit_sam2`` as a :class:`TrainTask`: every SAM2 part trainable except the object-score head
    (the single-image path never reads it). ``phase`` is one of :data:`PHASES` (module docstring):
    ``"prompt"`` starts from a seeded random init with the high-resolution projections zero, frozen
    and unread; ``"refine"`` starts from ``init`` (the first phase's checkpoint) with them trained."""

    name = "fit_sam2"

    def __init__(self, train: Sequence[MaskExample], cfg: PerceptioConfig, phase: str = "prompt",
                 init: str | os.PathLike[str] | None = None) -> None:  # fmt: skip
        if phase not in PHASES or (phase == "refine") != (init is not None):
            raise ValueError(f"fit_sam2: phase {phase!r} with init {init!r} (the refine phase, and only it, starts from a checkpoint)")
        self.examples = list(train)
        self.cfg = cfg
        self.phase = phase
        self.init = init
        self.image_size = 0

    def build_model(self) -> nn.Module:
        model = build_sam2(self.cfg.model.sam2_variant, self.init, freeze_image_encoder=False,
                           seed=self.cfg.sam2_fit.seed)  # fmt: skip
        for p in model.parameters():
            p.requires_grad_(True)
        dec = model.sam_mask_decoder
        if dec.pred_obj_scores:
            for p in dec.pred_obj_score_head.parameters():
                p.requires_grad_(False)
        for p in model.sam_prompt_encoder.mask_downscaling.parameters():  # no mask prompts here
            p.requires_grad_(False)
        if self.phase == "prompt" and dec.use_high_res_features:
            for conv in (dec.conv_s0, dec.conv_s1):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
                conv.requires_grad_(False)
            # zero projections add nothing; not reading them also skips their cost. The saved
            # checkpoint holds the zero projections, so it loads as the variant and predicts alike.
            dec.use_high_res_features = False
        self.image_size = model.image_size
        return _FitModule(model)

    def build_dataset(self) -> Dataset:
        c = self.cfg.sam2_fit
        size = self.image_size or int(sam2_config(self.cfg.model.sam2_variant)["image_size"])
        return MaskDataset(self.examples, size, c.max_points, c.box_prob, c.seed)

    def build_collate(self) -> Any:
        return collate_masks

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model(batch)

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        save_sam2_checkpoint(model.sam2, out_dir, self.cfg.model.sam2_variant)

    def fingerprint(self) -> dict[str, Any]:
        h = hashlib.sha256(json.dumps([(e.image_digest, e.record) for e in self.examples]).encode())
        return {"examples": h.hexdigest()[:16], "variant": self.cfg.model.sam2_variant,
                "fit": to_dict(self.cfg.sam2_fit), "phase": self.phase}  # fmt: skip


class _FitModule(nn.Module):
    """The SAM2 under training with its loss in ``forward`` (what the loop's DDP wrapper calls)."""

    def __init__(self, sam2: SAM2Segmenter) -> None:
        super().__init__()
        self.sam2 = sam2

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        low, iou_pred = prompt_masks(self.sam2, batch["pixel_values"], batch["points"], batch["labels"],
                                     batch["box"], batch["has_box"])  # fmt: skip
        gt = batch["mask"]
        logits = upsample_logits(low, tuple(gt.shape[-2:]))[:, 0]
        bce = mask_bce_loss(logits, gt)
        dice = mask_dice_loss(logits, gt)
        iou = F.mse_loss(iou_pred[:, 0].float(), batch_mask_iou(logits.detach(), gt))
        return {"loss": bce + dice + iou, "mask_bce": bce, "mask_dice": dice, "iou_mse": iou}


def save_sam2_checkpoint(sam2: SAM2Segmenter, out_dir: str | os.PathLike[str], variant: str) -> Path:
    """``out_dir/sam2.pt`` in Meta's release layout (``{"model": state_dict}``, SAM2Base key names;
    the video parts a released file also holds are absent) and ``out_dir/config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in sam2.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"model": state}, buf)
    write_bytes(out / CHECKPOINT, buf.getvalue())
    write_json(out / "config.json", {"variant": variant, "config": sam2.config}, sort_keys=False)
    return out / CHECKPOINT


@torch.no_grad()
def point_miou(sam2: SAM2Segmenter, examples: Sequence[MaskExample], batch_size: int = 16) -> float:
    """Mean IoU over ``examples`` of the mask SAM2 predicts from one positive point at the object's
    centre, scored at SAM2's input resolution."""
    if not examples:
        return float("nan")
    sam2.eval()
    s = sam2.image_size
    ious = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        px, gts, pts = [], [], []
        for e in chunk:
            m = e.mask_at(s)
            if not m.any():
                continue
            px.append(sam2_pixel_values(load_image(e.image_path), s))
            gts.append(m)
            pts.append(centre_point(m))
        if not px:
            continue
        points = torch.tensor(pts, dtype=torch.float32)[:, None, :]
        labels = torch.ones(len(pts), 1, dtype=torch.long)
        low, _ = prompt_masks(sam2, torch.stack(px), points, labels)
        pred = (upsample_logits(low, (s, s))[:, 0] > 0).numpy()
        ious += [mask_iou(p, g) for p, g in zip(pred, gts)]
    return float(np.mean(ious)) if ious else float("nan")


FIGURE = "figures/prompted_masks.png"
PROMPT_PHASE_DIR = "prompt_phase"


@torch.no_grad()
def prompted_masks_figure(sam2: SAM2Segmenter, examples: Sequence[MaskExample], out: str | os.PathLike[str],
                          rows: int = 4) -> Path:  # fmt: skip
    """A PNG grid, one row per example: the image at SAM2's input size with the centre-point prompt
    (red), the true mask, the mask SAM2 predicts from that point (green overlays)."""
    from perceptio_core.evaluation.viz import depth_grid, mask_overlay

    sam2.eval()
    s = sam2.image_size
    cells = []
    for e in examples[:rows]:
        m = e.mask_at(s)
        if not m.any():
            continue
        img = load_image(e.image_path)
        rgb = np.asarray(img.convert("RGB").resize((s, s), Image.Resampling.BILINEAR))
        x, y = centre_point(m)
        low, _ = prompt_masks(sam2, sam2_pixel_values(img, s)[None], torch.tensor([[[x, y]]]),
                              torch.ones(1, 1, dtype=torch.long))  # fmt: skip
        pred = (upsample_logits(low, (s, s))[0, 0] > 0).numpy()
        marked = rgb.copy()
        marked[max(0, int(y) - 2) : int(y) + 3, max(0, int(x) - 2) : int(x) + 3] = (230, 30, 30)
        cells.append([marked, mask_overlay(rgb, m), mask_overlay(rgb, pred)])
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    depth_grid(cells, ["image + point prompt", "true mask", "SAM2 mask"], path)
    return path


def fit_sam2(
    sources: Sources,
    cfg: PerceptioConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = True,
    progress: ProgressFn | None = None,
    parents: dict[str, str] | None = None,
) -> dict[str, float]:
    """Train the SAM2 of ``cfg.model.sam2_variant`` on the world's object masks (module docstring)
    with ``cfg.sam2_fit``. ``out_dir`` is a durable scratch directory; the result is
    ``<out_dir>/model/sam2.pt``, a picture of held-out prompted masks ``<out_dir>/figures/
    prompted_masks.png``. With two phases the first runs in ``<out_dir>/prompt_phase`` (its own
    checkpoints and curves) and the second in ``out_dir``. Returns the last phase's loop metrics
    plus ``holdout_point_miou`` / ``train_point_miou`` (the fitted model), ``init_point_miou``
    (the same SAM2 untrained), ``prompt_phase_holdout_point_miou`` and ``prompt_phase_steps`` (after
    the first of two phases), and the example counts."""
    c = cfg.sam2_fit
    examples = mask_examples(sources)
    train, hold = split_examples(examples, c.holdout_fraction)
    if not train:
        raise RuntimeError(
            "fit_sam2: the data has no training-split object masks to fit SAM2 on; set "
            "model.sam2_checkpoint to Meta's released SAM2 checkpoint"
        )
    score = train[:: max(1, len(train) // max(1, c.eval_examples))][: c.eval_examples]
    held = hold[: c.eval_examples]
    two_phases = bool(sam2_config(cfg.model.sam2_variant)["decoder"]["use_high_res_features"]) and c.refine_steps > 0
    phase_metrics: dict[str, float] = {}
    if two_phases:
        first = Path(out_dir) / PROMPT_PHASE_DIR
        prompt = Sam2FitTask(train, cfg, "prompt")
        prompt.tracking_run = "prompt"  # each phase tracked in a run of its own (<run_id>/fit_sam2/<phase>)
        run_training(prompt, c, first, device=cfg.run.device, resume=resume, progress=progress, parents=parents)
        prompted = build_sam2(cfg.model.sam2_variant, first / "model" / CHECKPOINT, seed=0)
        phase_metrics = {"prompt_phase_holdout_point_miou": point_miou(prompted, held),
                         "prompt_phase_steps": float(c.steps)}  # fmt: skip
        task = Sam2FitTask(train, cfg, "refine", init=first / "model" / CHECKPOINT)
        task.tracking_run = "refine"
        loop = dataclasses.replace(c, steps=c.refine_steps)
    else:
        task, loop = Sam2FitTask(train, cfg), c
    metrics = run_training(task, loop, out_dir, device=cfg.run.device, resume=resume, progress=progress,
                           parents=parents)  # fmt: skip
    fitted = build_sam2(cfg.model.sam2_variant, Path(out_dir) / "model" / CHECKPOINT, seed=0)
    untrained = build_sam2(cfg.model.sam2_variant, None, seed=c.seed)
    metrics.update(
        **phase_metrics,
        holdout_point_miou=point_miou(fitted, held),
        train_point_miou=point_miou(fitted, score),
        init_point_miou=point_miou(untrained, held),
        train_examples=float(len(train)),
        holdout_examples=float(len(hold)),
    )
    write_json(Path(out_dir) / "metrics.json", metrics, indent=1)  # as the loop
    if held or score:
        prompted_masks_figure(fitted, held or score, Path(out_dir) / FIGURE)
    return metrics


__all__ = [
    "CHECKPOINT",
    "FIGURE",
    "MaskDataset",
    "PHASES",
    "PROMPT_PHASE_DIR",
    "MaskExample",
    "Sam2FitTask",
    "batch_mask_iou",
    "collate_masks",
    "fit_sam2",
    "mask_examples",
    "point_miou",
    "prompt_masks",
    "prompted_masks_figure",
    "sample_prompts",
    "save_sam2_checkpoint",
    "split_examples",
]
