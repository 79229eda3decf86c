"""Honest statistics for the evaluation report (SPEC §6): 95% intervals, paired differences, baselines.

A number in the report comes with its uncertainty, so a reader can tell a change from noise:

- **Proportions** (accuracy on k of n): the Wilson score interval (Wilson 1927, "Probable inference,
  the law of succession, and statistical inference", JASA 22; the form of Agresti & Coull 1998,
  eq. 2). Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0/n
  or n/n.
- **cIoU / gIoU**: the percentile bootstrap over expressions (Efron & Tibshirani 1993, "An
  Introduction to the Bootstrap", §13.3): resample expressions with replacement, recompute the
  metric, take the 2.5th and 97.5th percentiles. The point value is always the full-sample value,
  never the bootstrap mean. Per-expression IoU and the cIoU of an all-empty resample follow
  :mod:`perceptio_core.evaluation.metrics` exactly: an empty union is an IoU of 1.0, and cIoU is
  1.0 when every union is empty.
- **Two models on the same samples**: a paired bootstrap (resample the samples, keep each pair
  together), so the shared difficulty of a sample cancels; a difference whose interval contains 0
  is :func:`within_noise`.
- **Baselines**: the majority answer's share and the chance level of a multiple-choice benchmark,
  to print beside an accuracy.

Pure numpy; every bootstrap is deterministic given ``seed`` (a :func:`numpy.random.default_rng`).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal
_PERCENTILES = (2.5, 97.5)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(lo, hi)`` for ``k`` successes of ``n`` trials, clipped to [0, 1].

    ``(nan, nan)`` when ``n == 0``; ``lo`` is exactly 0 at ``k == 0`` and ``hi`` exactly 1 at
    ``k == n``. Raises ``ValueError`` when ``n < 0`` or ``k`` is outside [0, n].
    """
    k, n = operator.index(k), operator.index(n)  # a float count is a caller's bug: TypeError
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n={n}], got {k}")
    if n == 0:
        return math.nan, math.nan
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class Estimate:
    """A point value with its 95% interval ``[lo, hi]`` over ``n`` samples (nan when ``n == 0``)."""

    value: float
    lo: float
    hi: float
    n: int

    def text(self, digits: int = 3) -> str:
        """``"0.375 (0.27-0.49, n=72)"``: the value with ``digits`` decimals, the bounds with 2.

        When a bound is negative (a difference) the bounds are joined by ``" to "`` instead of
        ``"-"``: ``"-0.050 (-0.12 to -0.01, n=72)"``.
        """
        sep = " to " if (self.lo < 0 or self.hi < 0) else "-"
        return f"{self.value:.{digits}f} ({self.lo:.2f}{sep}{self.hi:.2f}, n={self.n})"

    def to_dict(self) -> dict[str, float]:
        """``{"value", "lo", "hi", "n"}`` (``n`` stays an int, for JSON)."""
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n}


def _nan_estimate() -> Estimate:
    return Estimate(math.nan, math.nan, math.nan, 0)


def proportion(k: int, n: int) -> Estimate:
    """``k`` of ``n`` as an :class:`Estimate`: value ``k / n`` with the Wilson 95% bounds.

    ``n == 0`` gives nan value and bounds. Raises ``ValueError`` like :func:`wilson_interval`.
    """
    lo, hi = wilson_interval(k, n)
    value = k / n if n else math.nan
    return Estimate(value, lo, hi, int(n))


def _as_scores(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds a nan or an infinity")
    return a


def _check_n_boot(n_boot: int) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap resamples: [n_boot, n] indices drawn with replacement from ``range(n)``."""
    return np.random.default_rng(seed).integers(0, n, size=(int(n_boot), n))


def _interval(boot: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval of the bootstrap replicates ``boot`` [n_boot]."""
    lo, hi = np.percentile(boot, _PERCENTILES)
    return float(lo), float(hi)


def _iou_parts(
    intersections: Sequence[float], unions: Sequence[float], tag: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    inter = _as_scores(intersections, f"intersections{tag}")
    union = _as_scores(unions, f"unions{tag}")
    if inter.shape != union.shape:
        raise ValueError(f"intersections{tag} ({inter.size}) and unions{tag} ({union.size}) differ in length")
    if np.any(inter < 0) or np.any(inter > union):
        raise ValueError(f"need 0 <= intersection <= union for every expression{tag}")
    return inter, union


def _per_iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-expression IoU [N]; an empty union (empty prediction, empty ground truth) is 1.0."""
    safe = np.where(union > 0, union, 1.0)
    return np.where(union > 0, inter / safe, 1.0)


def _ciou(sum_inter: np.ndarray | float, sum_union: np.ndarray | float) -> np.ndarray:
    """cIoU from the sums (any shape); 1.0 where the summed union is empty, as in ``metrics``."""
    si, su = np.asarray(sum_inter, dtype=np.float64), np.asarray(sum_union, dtype=np.float64)
    return np.where(su > 0, si / np.where(su > 0, su, 1.0), 1.0)


def _iou_replicates(inter: np.ndarray, union: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cIoU and gIoU of each resample ``idx`` [n_boot, N]: two arrays [n_boot]."""
    ciou = _ciou(inter[idx].sum(axis=1), union[idx].sum(axis=1))
    giou = _per_iou(inter, union)[idx].mean(axis=1)
    return ciou, giou


def bootstrap_iou(
    intersections: Sequence[float],
    unions: Sequence[float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Estimate]:
    """cIoU and gIoU of one split with percentile-bootstrap 95% intervals over expressions.

    intersections, unions: [N] pixel counts per expression (from
    :func:`~perceptio_core.evaluation.metrics.intersection_union`). Returns ``{"ciou", "giou"}``;
    both metrics use the same resamples. No expression gives nan estimates with ``n == 0``.
    Raises ``ValueError`` on unequal lengths, a negative count, an intersection above its union or
    ``n_boot < 1``.
    """
    _check_n_boot(n_boot)
    inter, union = _iou_parts(intersections, unions)
    n = inter.size
    if n == 0:
        return {"ciou": _nan_estimate(), "giou": _nan_estimate()}
    ciou = float(_ciou(inter.sum(), union.sum()))
    giou = float(_per_iou(inter, union).mean())
    boot_c, boot_g = _iou_replicates(inter, union, _indices(n, n_boot, seed))
    return {
        "ciou": Estimate(ciou, *_interval(boot_c), n),
        "giou": Estimate(giou, *_interval(boot_g), n),
    }


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> Estimate:
    """``mean(a) - mean(b)`` with a paired percentile-bootstrap 95% interval.

    a, b: [N] per-sample scores of two models on the same samples, in the same order (0/1
    correctness or IoU). Each resample draws samples with replacement and keeps ``a[i]`` with
    ``b[i]``. No sample gives a nan estimate with ``n == 0``. Raises ``ValueError`` on unequal
    lengths, a non-finite score or ``n_boot < 1``.
    """
    _check_n_boot(n_boot)
    x, y = _as_scores(a, "a"), _as_scores(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a ({x.size}) and b ({y.size}) must score the same samples: lengths differ")
    n = x.size
    if n == 0:
        return _nan_estimate()
    d = x - y
    boot = d[_indices(n, n_boot, seed)].mean(axis=1)
    return Estimate(float(x.mean() - y.mean()), *_interval(boot), n)


def paired_iou_difference(
    ia: Sequence[float],
    ua: Sequence[float],
    ib: Sequence[float],
    ub: Sequence[float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Estimate]:
    """cIoU and gIoU of model a minus model b on the same expressions, paired-bootstrap 95% intervals.

    ia, ua / ib, ub: [N] intersection and union pixel counts per expression of each model, in the
    same expression order. Each resample draws expressions with replacement, for both models at
    once. Returns ``{"ciou", "giou"}``; no expression gives nan estimates with ``n == 0``. Raises
    ``ValueError`` as :func:`bootstrap_iou` does, and when the models' lengths differ.
    """
    _check_n_boot(n_boot)
    inter_a, union_a = _iou_parts(ia, ua, " (a)")
    inter_b, union_b = _iou_parts(ib, ub, " (b)")
    if inter_a.shape != inter_b.shape:
        raise ValueError(f"models a ({inter_a.size}) and b ({inter_b.size}) must score the same expressions")
    n = inter_a.size
    if n == 0:
        return {"ciou": _nan_estimate(), "giou": _nan_estimate()}
    ciou = float(_ciou(inter_a.sum(), union_a.sum()) - _ciou(inter_b.sum(), union_b.sum()))
    giou = float(_per_iou(inter_a, union_a).mean() - _per_iou(inter_b, union_b).mean())
    idx = _indices(n, n_boot, seed)
    ca, ga = _iou_replicates(inter_a, union_a, idx)
    cb, gb = _iou_replicates(inter_b, union_b, idx)
    return {
        "ciou": Estimate(ciou, *_interval(ca - cb), n),
        "giou": Estimate(giou, *_interval(ga - gb), n),
    }


def within_noise(d: Estimate) -> bool:
    """True when the interval of a difference ``d`` contains 0, or is nan (nothing to tell)."""
    if math.isnan(d.lo) or math.isnan(d.hi):
        return True
    return d.lo <= 0.0 <= d.hi


def majority_baseline(answers: Sequence[str]) -> float:
    """Share of the most frequent answer in ``answers`` (compared as given); nan when empty."""
    if len(answers) == 0:
        return math.nan
    return Counter(answers).most_common(1)[0][1] / len(answers)


def chance_baseline(n_options: Sequence[int]) -> float:
    """Expected accuracy of a uniform guess: mean of ``1 / n`` over the questions; nan when empty.

    n_options: [N] number of options per question. Raises ``ValueError`` when one is below 1.
    """
    if len(n_options) == 0:
        return math.nan
    if any(int(k) < 1 for k in n_options):
        raise ValueError("every question needs at least one option")
    return float(np.mean([1.0 / int(k) for k in n_options]))


__all__ = [
    "Z95",
    "Estimate",
    "bootstrap_iou",
    "chance_baseline",
    "majority_baseline",
    "paired_difference",
    "paired_iou_difference",
    "proportion",
    "within_noise",
    "wilson_interval",
]
