"""The offline default's ``fit_teacher`` stage (SPEC §2): a small Depth Anything V2 fitted on the
world's true depth, on the one training loop (:mod:`perceptio_core.training.trainer`).

The model is :func:`perceptio_core.depth.teacher.build_teacher_config` with its processor. It is
trained as MiDaS (Ranftl et al., TPAMI 2022, §5) and Depth Anything train relative models: on
inverse depth (disparity), with the scale-and-shift-invariant loss (the prediction aligned to the
target per image by a least-squares scale and shift, then L1 in units of the target's mean
absolute deviation, :func:`ssi_loss`) plus the multi-scale gradient-matching term
(:func:`gradient_matching_loss`). Images are flipped horizontally with probability 1/2 (drawn from
the global torch RNG, which a checkpoint restores). A share of the images
(``teacher.fit.holdout_fraction``, by image digest:
:func:`perceptio_core.training.schedule.holdout_by_digest`, the rule of every fit) is never trained
on and only scored.

A plain least-squares alignment may take a negative scale and so reward a prediction ordered the
wrong way round (depth instead of disparity; we saw it happen on a few images per run). An image
whose fitted scale is not positive is aligned by its median and mean absolute deviation instead
(Depth Anything's affine-invariant normalisation, positive scale by construction), which turns it
round (:func:`align_positive`). We use least squares rather than the median/MAD normalisation
alone because it fits faster (16 synthetic scenes overfitted for 200 steps: AbsRel 0.10 against
0.19) and it is the alignment the evaluation uses (:mod:`perceptio_core.depth.metrics`).

The fitted model is saved with ``save_pretrained`` (``config.json`` + ``model.safetensors`` +
``preprocessor_config.json``), so the teacher stage loads it exactly as it loads a released one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from transformers import DepthAnythingForDepthEstimation

from perceptio_core.atomic_io import write_json
from perceptio_core.config import TeacherFitConfig, TrainLoopConfig, to_dict
from perceptio_core.data.records import ImageRecord
from perceptio_core.depth.teacher import build_teacher_config, build_teacher_processor, evaluate_teacher, load_teacher
from perceptio_core.device import ProgressFn
from perceptio_core.training.schedule import split_by_digest
from perceptio_core.training.trainer import FINAL, METRICS, TrainTask, run_training

# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _median_mad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image median and mean absolute deviation over ``mask``. x, mask: [B, H, W] -> [B, 1, 1] x2."""
    flat = x.flatten(1).masked_fill(~mask.flatten(1), float("nan"))
    med = flat.nanmedian(dim=1).values.nan_to_num(0.0)[:, None, None]
    n = mask.flatten(1).sum(1).clamp_min(1)[:, None, None]
    mad = ((x - med).abs() * mask).flatten(1).sum(1)[:, None, None] / n
    return med, mad.clamp_min(1e-8)


def align_positive(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image affine alignment of ``pred`` to ``target`` with a positive scale. [B, H, W] -> [B, H, W].

    The least-squares scale and shift over ``mask`` where the fitted scale is positive; elsewhere
    (a prediction ordered the wrong way round) the median/MAD alignment
    ``(pred - med_p) / mad_p * mad_t + med_t``, whose scale is positive by construction, so the loss
    turns the prediction round instead of rewarding an inverted one.
    """
    mf = mask.float()
    n = mf.sum((1, 2)).clamp_min(1)
    pm = (pred * mf).sum((1, 2)) / n  # [B]
    tm = (target * mf).sum((1, 2)) / n
    pc = (pred - pm[:, None, None]) * mf
    tc = (target - tm[:, None, None]) * mf
    scale = (pc * tc).sum((1, 2)) / (pc * pc).sum((1, 2)).clamp_min(1e-12)
    shift = tm - scale * pm
    lsq = scale[:, None, None] * pred + shift[:, None, None]
    med_p, mad_p = _median_mad(pred, mask)
    med_t, mad_t = _median_mad(target, mask)
    robust = (pred - med_p) / mad_p * mad_t + med_t
    return torch.where((scale > 0)[:, None, None], lsq, robust)


def ssi_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-and-shift-invariant L1 on disparity (MiDaS / Depth Anything).

    pred, target: [B, H, W] disparities (any affine scale); mask: [B, H, W] bool valid pixels.
    ``pred`` is aligned to ``target`` per image (:func:`align_positive`) and the residual is measured
    in units of the target's mean absolute deviation, so every image weighs alike whatever its depth
    range. Returns ``(loss, residual)``: the masked mean of ``|residual|`` and ``residual`` [B, H, W]
    (zero outside ``mask``) for :func:`gradient_matching_loss`.
    """
    _, mad_t = _median_mad(target, mask)
    residual = (align_positive(pred, target, mask) - target) / mad_t * mask
    return residual.abs().sum() / mask.sum().clamp_min(1), residual


def gradient_matching_loss(residual: torch.Tensor, mask: torch.Tensor, scales: int = 4) -> torch.Tensor:
    """MiDaS multi-scale gradient matching: mean |d/dx r| + |d/dy r| of the normalised residual
    ``r`` [B, H, W] at ``scales`` subsamplings (1, 2, 4, ...), over pixel pairs both valid."""
    total = residual.new_zeros(())
    for k in range(scales):
        step = 2**k
        r, m = residual[:, ::step, ::step], mask[:, ::step, ::step].float()
        mx = m[:, :, 1:] * m[:, :, :-1]
        my = m[:, 1:, :] * m[:, :-1, :]
        gx = ((r[:, :, 1:] - r[:, :, :-1]).abs() * mx).sum()
        gy = ((r[:, 1:, :] - r[:, :-1, :]).abs() * my).sum()
        total = total + (gx + gy) / (mx.sum() + my.sum()).clamp_min(1)
    return total / scales


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def split_images(images: Sequence[ImageRecord], fraction: float) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """``(train, holdout)`` of ``images`` by their digests
    (:func:`~perceptio_core.training.schedule.split_by_digest`), each in the given order."""
    for rec in images:
        if not rec.digest:
            raise ValueError(f"fit_teacher: image {rec.file_name!r} ({rec.source}) has no digest")
    return split_by_digest(images, fraction, lambda r: r.digest)


class DepthFitDataset(Dataset):
    """The training images at the teacher's input size, decoded once and held in memory.

    ``ds[i]`` -> ``(pixel_values [3, S, S], disparity [S, S], valid [S, S] bool)``: the image through
    the teacher's processor, the true disparity ``1 / depth`` resized bilinearly to S x S and its
    valid mask (true depth finite and > 0, resized nearest).
    """

    def __init__(self, images: Sequence[ImageRecord], processor: Any, input_size: int) -> None:
        pixels, disps, masks = [], [], []
        for rec in images:
            if not rec.depth_path:
                raise ValueError(f"fit_teacher: image {rec.file_name!r} ({rec.source}) has no true depth")
            with Image.open(rec.path) as im:
                pixels.append(processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0])
            depth = np.load(rec.depth_path).astype(np.float32)
            if depth.ndim != 2:
                raise ValueError(f"fit_teacher: depth {rec.depth_path!r} is not a 2-D array ({depth.shape})")
            valid = np.isfinite(depth) & (depth > 0)
            disp = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0).astype(np.float32)
            d = torch.from_numpy(disp)[None, None]
            v = torch.from_numpy(valid.astype(np.float32))[None, None]
            d = F.interpolate(d, size=(input_size, input_size), mode="bilinear", align_corners=False)[0, 0]
            v = F.interpolate(v, size=(input_size, input_size), mode="nearest")[0, 0]
            disps.append(d)
            masks.append(v > 0.5)
        self.pixels = torch.stack(pixels)  # [N, 3, S, S]
        self.disparity = torch.stack(disps)  # [N, S, S]
        self.valid = torch.stack(masks)  # [N, S, S]

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pixels[i], self.disparity[i], self.valid[i]


def collate_depth(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{"pixel_values" [B, 3, S, S], "disparity" [B, S, S], "valid" [B, S, S]}``."""
    return {
        "pixel_values": torch.stack([x for x, _, _ in items]),
        "disparity": torch.stack([d for _, d, _ in items]),
        "valid": torch.stack([m for _, _, m in items]),
    }


def flip_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each image of the batch (and its targets) flipped horizontally with probability 1/2, drawn from
    the global torch RNG (restored with a checkpoint, so a resumed fit draws the same flips)."""
    x = batch["pixel_values"]
    flip = (torch.rand(x.shape[0]) < 0.5).to(x.device)  # [B]
    out = {}
    for k, v in batch.items():
        shape = (-1,) + (1,) * (v.ndim - 1)
        out[k] = torch.where(flip.view(shape), v.flip(-1), v)
    return out


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


def teacher_loop(fit_cfg: TeacherFitConfig, train_images: int) -> TrainLoopConfig:
    """The loop settings of the teacher fit: ``fit_cfg.steps`` AdamW steps (``fit_cfg.lr``, weight
    decay ``fit_cfg.weight_decay`` on >= 2-D tensors) on batches of ``fit_cfg.batch_size`` images
    (at most ``train_images``), the loop's 5% warm-up + cosine schedule and clipping at 1.0, fp32,
    the data in this process (it is in memory)."""
    return TrainLoopConfig(
        steps=fit_cfg.steps,
        batch_size=min(fit_cfg.batch_size, train_images),
        lr=fit_cfg.lr,
        weight_decay=fit_cfg.weight_decay,
        precision="no",
        num_workers=0,
        seed=fit_cfg.seed,
    )


class TeacherFitTask(TrainTask):
    """``fit_teacher`` as a :class:`~perceptio_core.training.trainer.TrainTask`: a seeded Depth
    Anything V2 of ``fit_cfg`` trained on ``images`` (every one with ``depth_path``) at
    ``input_size``; the final save is the model and its processor (``save_pretrained``)."""

    name = "fit_teacher"

    def __init__(self, images: Sequence[ImageRecord], fit_cfg: TeacherFitConfig, input_size: int) -> None:
        self.images = list(images)
        self.fit_cfg = fit_cfg
        self.input_size = input_size
        self.processor = build_teacher_processor(input_size, fit_cfg.patch_size)

    def build_model(self) -> nn.Module:
        model = DepthAnythingForDepthEstimation(build_teacher_config(self.fit_cfg, self.input_size))
        # The relative head ends in a ReLU: a random init can leave the whole output at 0 (dead, no
        # gradient). Starting the last bias at 1 puts every pixel in the ReLU's live range.
        with torch.no_grad():
            model.head.conv3.bias.fill_(1.0)
        return model

    def build_dataset(self) -> Dataset:
        return DepthFitDataset(self.images, self.processor, self.input_size)

    def build_collate(self) -> Any:
        return collate_depth

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b = flip_batch(batch)
        pred = model(pixel_values=b["pixel_values"]).predicted_depth  # [B, S, S], relative disparity
        ssi, residual = ssi_loss(pred, b["disparity"], b["valid"])
        grad = gradient_matching_loss(residual, b["valid"])
        return {"loss": ssi + self.fit_cfg.grad_weight * grad, "ssi": ssi, "grad": grad}

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)

    def fingerprint(self) -> dict[str, Any]:
        h = hashlib.sha256(json.dumps([(r.digest, r.depth_path) for r in self.images]).encode())
        return {"images": h.hexdigest()[:16], "fit": to_dict(self.fit_cfg), "input_size": self.input_size}


def fit_teacher(
    images: Sequence[ImageRecord],
    fit_cfg: TeacherFitConfig,
    input_size: int,
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    *,
    map_size: int | None = None,
    resume: bool = True,
    parents: dict[str, str] | None = None,
) -> dict[str, float]:
    """Fit a small Depth Anything V2 on the images' true depth (module docstring).

    images: records with ``path`` (RGB image), ``depth_path`` (.npy metric depth [H, W]) and
        ``digest``; those :func:`split_images` holds out (``fit_cfg.holdout_fraction``) are only scored.
    out_dir: a durable folder (checkpoints every 100 steps, ``history.jsonl``, loss plots,
        ``metrics.json``); a rerun with ``resume`` continues from its last checkpoint. The fitted teacher is
        ``<out_dir>/model`` (``config.json``, ``model.safetensors``, ``preprocessor_config.json``,
        the loop's ``meta.json``).
    Training: :func:`teacher_loop` on the loop of :mod:`perceptio_core.training.trainer`, loss
    :func:`ssi_loss` + ``fit_cfg.grad_weight`` x :func:`gradient_matching_loss` on the disparity at
    ``input_size`` x ``input_size``. Deterministic on the CPU for a fixed seed and thread count.
    Scoring: the saved teacher, loaded back (:func:`~perceptio_core.depth.teacher.load_teacher`), on
    the held-out images and on as many training images (at least 32), by
    :func:`~perceptio_core.depth.teacher.evaluate_teacher` at ``map_size`` (default ``input_size``).
    Returns the loop's metrics (``loss_first`` / ``loss_last``, ``ssi_*``, ``grad_*``, ``steps``,
    ``parameters``, ...) plus ``holdout_absrel`` / ``holdout_delta1`` / ``holdout_pair_order``,
    ``train_*`` alike, ``train_images``, ``holdout_images`` and ``fit_seconds``.
    """
    if not images:
        raise ValueError("fit_teacher: no images")
    train, hold = split_images(images, fit_cfg.holdout_fraction)
    if not train:
        raise ValueError("fit_teacher: every image is held out")
    t0 = time.perf_counter()
    task = TeacherFitTask(train, fit_cfg, input_size)
    metrics = run_training(
        task, teacher_loop(fit_cfg, len(train)), out_dir, device=str(device), resume=resume,
        progress=progress, parents=parents,
    )  # fmt: skip
    metrics["fit_seconds"] = time.perf_counter() - t0
    metrics["train_images"] = float(len(train))
    metrics["holdout_images"] = float(len(hold))
    model, processor = load_teacher(str(Path(out_dir) / FINAL), device)
    evals = [("train", train[: max(len(hold), 32)])] + ([("holdout", hold)] if hold else [])
    for name, recs in evals:
        ev = evaluate_teacher(model, processor, recs, map_size=map_size or input_size, device=device)
        metrics.update({f"{name}_{k}": ev[k] for k in ("absrel", "delta1", "pair_order")})
    write_json(Path(out_dir) / METRICS, metrics, indent=1)  # the loop's, with the scores
    return metrics


__all__ = [
    "DepthFitDataset",
    "TeacherFitTask",
    "align_positive",
    "collate_depth",
    "fit_teacher",
    "flip_batch",
    "gradient_matching_loss",
    "split_images",
    "ssi_loss",
    "teacher_loop",
]
