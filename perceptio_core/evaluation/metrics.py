"""Referring-segmentation metrics (SPEC §6): cIoU, gIoU and precision at IoU 0.5, streamed.

Definitions, over one split of one dataset (what LISA, GLaMM and Sa2VA report):

- IoU of one sample = |pred ∩ gt| / |pred ∪ gt| on binary masks of the same size.
- **cIoU** (cumulative IoU) = sum over samples of |pred ∩ gt| / sum over samples of |pred ∪ gt|.
  Large objects weigh more: a big object predicted perfectly and a small one missed give a cIoU
  near 1 but a gIoU of 0.5.
- **gIoU** (generalised IoU, really the mean IoU) = mean over samples of the per-sample IoU.
- **P@0.5** = share of samples whose IoU is >= 0.5.

Conventions (documented choices):

- **Empty prediction and empty ground truth**: the sample's IoU is 1.0 (nothing to find, nothing
  found), as in LISA's ``validate`` (``acc_iou[union == 0] += 1.0  # no-object target``), which GLaMM
  reuses. The cIoU sums are unaffected (both sums get 0). RefCOCO/+/g never have an empty ground
  truth (the reader quarantines zero-area masks), so this matters only for other callers.
  When every sample of a split has an empty union, cIoU is 1.0; with no sample at all every metric
  is ``nan``.
- **Honest counting** (SPEC §6): a generation without ``[SEG]`` (no mask) is added as an empty
  prediction, never skipped: :meth:`IoUAccumulator.add` takes ``None`` for that. Its intersection is
  0 and its union is the ground-truth area, so it lowers cIoU, gIoU and P@0.5.
- Masks must have the same shape: resize the prediction to the ground truth first
  (:func:`resize_mask`, nearest neighbour), as the evaluators do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

DEFAULT_THRESHOLDS = (0.5,)


def _as_bool(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D [H, W], got shape {m.shape}")
    return m.astype(bool, copy=False) if m.dtype != bool else m


def intersection_union(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int]:
    """``(|pred ∩ gt|, |pred ∪ gt|)`` in pixels; ``pred`` None is an empty mask.

    pred, gt: [H, W] bool or 0/1 arrays of the same shape. Raises ``ValueError`` on a shape mismatch.
    """
    g = _as_bool(gt)
    if pred is None:
        return 0, int(g.sum())
    p = _as_bool(pred)
    if p.shape != g.shape:
        raise ValueError(f"pred mask {p.shape} and gt mask {g.shape} differ in shape: resize first")
    return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


def mask_iou(pred: np.ndarray | None, gt: np.ndarray) -> float:
    """IoU of two [H, W] masks; ``pred`` None is empty; empty vs empty is 1.0 (module docstring)."""
    inter, union = intersection_union(pred, gt)
    return 1.0 if union == 0 else inter / union


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a [h, w] mask to ``size = (H, W)``; returns bool [H, W]."""
    m = _as_bool(mask)
    if m.shape == tuple(size):
        return m
    im = Image.fromarray(m.astype(np.uint8) * 255)
    out = im.resize((int(size[1]), int(size[0])), resample=Image.Resampling.NEAREST)
    return np.asarray(out) > 127


def threshold_key(t: float) -> str:
    """The metric name of precision at IoU ``t``: 0.5 -> ``"p50"``, 0.75 -> ``"p75"``."""
    return f"p{int(round(t * 100))}"


@dataclass
class IoUAccumulator:
    """Streaming cIoU / gIoU / P@t over one split: ``add`` one sample at a time, read the metrics.

    Keeps three running sums and a counter per threshold, so memory does not grow with the split.
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    n: int = 0
    sum_intersection: int = 0
    sum_union: int = 0
    sum_iou: float = 0.0
    _hits: dict[float, int] = field(default_factory=dict)

    def add(self, pred_mask: np.ndarray | None, gt_mask: np.ndarray) -> float:
        """Add one sample; ``pred_mask`` None (no ``[SEG]``) counts as empty. Returns its IoU."""
        return self.add_counts(*intersection_union(pred_mask, gt_mask))

    def add_counts(self, inter: int, union: int) -> float:
        """Add one sample by its :func:`intersection_union` pixel counts. Returns its IoU."""
        iou = 1.0 if union == 0 else inter / union
        self.n += 1
        self.sum_intersection += inter
        self.sum_union += union
        self.sum_iou += iou
        for t in self.thresholds:
            if iou >= t:
                self._hits[t] = self._hits.get(t, 0) + 1
        return iou

    def merge(self, other: IoUAccumulator) -> IoUAccumulator:
        """Add another accumulator's samples into this one (same thresholds); returns self."""
        if tuple(other.thresholds) != tuple(self.thresholds):
            raise ValueError("cannot merge accumulators with different thresholds")
        self.n += other.n
        self.sum_intersection += other.sum_intersection
        self.sum_union += other.sum_union
        self.sum_iou += other.sum_iou
        for t, k in other._hits.items():
            self._hits[t] = self._hits.get(t, 0) + k
        return self

    @property
    def ciou(self) -> float:
        """Sum of intersections / sum of unions (1.0 when every union is empty; nan with no sample)."""
        if self.n == 0:
            return math.nan
        return 1.0 if self.sum_union == 0 else self.sum_intersection / self.sum_union

    @property
    def giou(self) -> float:
        """Mean per-sample IoU (nan with no sample)."""
        return self.sum_iou / self.n if self.n else math.nan

    def precision_at(self, threshold: float = 0.5) -> float:
        """Share of samples with IoU >= ``threshold`` (one of ``thresholds``; nan with no sample)."""
        if threshold not in self.thresholds:
            raise KeyError(f"threshold {threshold} not tracked (tracked: {self.thresholds})")
        return self._hits.get(threshold, 0) / self.n if self.n else math.nan

    def result(self) -> dict[str, float]:
        """``{"ciou", "giou", "p50" (one per threshold), "n"}``."""
        out = {"ciou": self.ciou, "giou": self.giou}
        for t in self.thresholds:
            out[threshold_key(t)] = self.precision_at(t)
        out["n"] = float(self.n)
        return out




def mme_scores(rows: Iterable[tuple[str, str, bool]], groups: Mapping[str, str]) -> dict[str, float]:
    """MME's scores (its ``eval_tool/calculation.py``) from ``(subtask, image_key, correct)`` per
    question: per subtask ``acc`` (share of questions right) and ``acc_plus`` (share of images with
    both questions right), both in [0, 1], ``score = 100 * (acc + acc_plus)`` (at most 200) and
    ``n`` (questions); per group of ``groups`` (subtask -> "perception" / "cognition" / ...) the
    sum of its subtasks' scores, ``<group>.score`` (MME's perception total is out of 2000 over its
    10 subtasks, cognition out of 800 over 4: a group with fewer subtasks present sums fewer)."""
    by_task: dict[str, dict[str, list[bool]]] = {}
    for task, image, ok in rows:
        by_task.setdefault(task, {}).setdefault(image, []).append(bool(ok))
    out: dict[str, float] = {}
    totals: dict[str, float] = {}
    for task, images in sorted(by_task.items()):
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        score = 100.0 * (acc + acc_plus)
        out[f"{task}.acc"], out[f"{task}.acc_plus"] = acc, acc_plus
        out[f"{task}.score"], out[f"{task}.n"] = score, float(len(answers))
        group = groups.get(task, "other")
        totals[group] = totals.get(group, 0.0) + score
    for group, total in sorted(totals.items()):
        out[f"{group}.score"] = total
    return out


__all__ = ["IoUAccumulator", "intersection_union", "mask_iou", "mme_scores", "resize_mask", "threshold_key"]
