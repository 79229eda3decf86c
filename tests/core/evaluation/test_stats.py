"""Honest statistics (SPEC §6): Wilson intervals, bootstrap cIoU/gIoU, paired differences, baselines."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from perceptio_core.evaluation.metrics import IoUAccumulator
from perceptio_core.evaluation.stats import (
    Z95,
    Estimate,
    bootstrap_iou,
    chance_baseline,
    majority_baseline,
    paired_difference,
    paired_iou_difference,
    proportion,
    wilson_interval,
    within_noise,
)

N_BOOT = 200  # enough for the invariants below, and keeps the file fast


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# --- Wilson -------------------------------------------------------------------------------------


def test_z95_is_the_normal_97_5th_percentile():
    # Phi(z) = (1 + erf(z / sqrt 2)) / 2 = 0.975
    assert (1 + math.erf(Z95 / math.sqrt(2))) / 2 == pytest.approx(0.975, abs=1e-12)


def test_wilson_27_of_72_by_hand():
    # p = 0.375, z^2 = 3.841459, z^2/n = 0.0533536, denom = 1.0533536
    # centre = (0.375 + 0.0266768) / 1.0533536 = 0.381331
    # half = 1.959964 * sqrt(0.375 * 0.625 / 72 + 3.841459 / (4 * 72^2)) / 1.0533536
    #      = 1.959964 * sqrt(0.00325521 + 0.00018525) / 1.0533536 = 0.109139
    # -> (0.272192, 0.490470): the HardBLINK "0.27-0.49" of docs/experiments.md
    lo, hi = wilson_interval(27, 72)
    assert lo == pytest.approx(0.272192, abs=1e-5)
    assert hi == pytest.approx(0.490470, abs=1e-5)


def test_wilson_at_the_edges_by_hand():
    # k = 0: lo = 0 exactly, hi = (z^2/n) / (1 + z^2/n) = 0.3841459 / 1.3841459 = 0.277533
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    # k = n mirrors it: (1 - 0.277533, 1)
    assert wilson_interval(10, 10) == (pytest.approx(0.722467, abs=1e-6), 1.0)
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


def test_wilson_is_symmetric_and_inside_unit_interval():
    for n in (1, 2, 7, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            mlo, mhi = wilson_interval(n - k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            assert lo == pytest.approx(1 - mhi, abs=1e-12) and hi == pytest.approx(1 - mlo, abs=1e-12)


def test_wilson_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(27, 72), (0, 10), (10, 10), (1, 1), (0, 1), (3, 7), (13, 60), (500, 1000), (1, 999)]:
        ci = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (0, -1)])
def test_wilson_rejects_k_outside_0_n(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


# --- Estimate and proportion ----------------------------------------------------------------------


def test_proportion_and_text():
    e = proportion(27, 72)
    assert e.value == 0.375 and e.n == 72
    assert e.text() == "0.375 (0.27-0.49, n=72)"
    assert e.text(digits=1) == "0.4 (0.27-0.49, n=72)"
    assert e.to_dict() == {"value": 0.375, "lo": pytest.approx(0.272192, abs=1e-5),
                           "hi": pytest.approx(0.490470, abs=1e-5), "n": 72}


def test_proportion_of_nothing_is_nan():
    e = proportion(0, 0)
    assert math.isnan(e.value) and math.isnan(e.lo) and math.isnan(e.hi) and e.n == 0
    assert e.text() == "nan (nan-nan, n=0)"
    assert within_noise(e)


def test_estimate_is_frozen_and_text_of_a_negative_difference():
    e = Estimate(-0.05, -0.12, -0.01, 72)
    assert e.text() == "-0.050 (-0.12 to -0.01, n=72)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.value = 0.0  # type: ignore[misc]


# --- bootstrap cIoU / gIoU ----------------------------------------------------------------------


def test_bootstrap_iou_point_values_by_hand():
    # IoUs: 10/30, 0/8, 3600/3600, and an empty union (empty prediction, empty gt) = 1.0
    inter, union = [10, 0, 3600, 0], [30, 8, 3600, 0]
    out = bootstrap_iou(inter, union, n_boot=N_BOOT)
    # cIoU = (10 + 0 + 3600 + 0) / (30 + 8 + 3600 + 0) = 3610 / 3638
    assert out["ciou"].value == pytest.approx(3610 / 3638)
    # gIoU = (1/3 + 0 + 1 + 1) / 4 = 0.583333
    assert out["giou"].value == pytest.approx(7 / 12)
    for e in out.values():
        assert e.n == 4 and 0.0 <= e.lo <= e.hi <= 1.0


def test_bootstrap_iou_point_values_equal_the_accumulator():
    gt_big = _box(40, 40, 5, 35, 5, 35)
    gt_small = _box(40, 40, 0, 3, 0, 3)
    empty = np.zeros((40, 40), dtype=bool)
    samples = [
        (gt_big, gt_big),  # perfect
        (_box(40, 40, 0, 2, 30, 32), gt_small),  # a miss
        (None, gt_small),  # no [SEG]: counted as an empty prediction
        (empty, empty),  # empty vs empty: IoU 1.0
        (_box(40, 40, 10, 30, 5, 35), gt_big),  # a partial hit
    ]
    acc = IoUAccumulator()
    inter, union = [], []
    for pred, gt in samples:
        acc.add(pred, gt)
        p = np.zeros_like(gt) if pred is None else pred
        inter.append(int(np.logical_and(p, gt).sum()))
        union.append(int(np.logical_or(p, gt).sum()))
    out = bootstrap_iou(inter, union, n_boot=N_BOOT)
    assert out["ciou"].value == pytest.approx(acc.ciou)
    assert out["giou"].value == pytest.approx(acc.giou)


def test_bootstrap_iou_every_union_empty_is_one():
    # as IoUAccumulator.ciou: every union empty -> cIoU 1.0; so is every resample
    out = bootstrap_iou([0, 0, 0], [0, 0, 0], n_boot=N_BOOT)
    for e in out.values():
        assert (e.value, e.lo, e.hi, e.n) == (1.0, 1.0, 1.0, 3)


def test_bootstrap_iou_degenerate_when_every_expression_is_the_same():
    # every IoU is 0.5 (exact in binary): any resample gives 0.5, so lo == hi == value
    out = bootstrap_iou([5] * 30, [10] * 30, n_boot=N_BOOT)
    for e in out.values():
        assert e.value == e.lo == e.hi == 0.5


def test_bootstrap_iou_is_deterministic_given_the_seed():
    rng = np.random.default_rng(123)
    union = rng.integers(50, 500, size=80)
    inter = (union * rng.uniform(0, 1, size=80)).astype(int)
    a = bootstrap_iou(inter, union, n_boot=N_BOOT, seed=7)
    b = bootstrap_iou(inter.tolist(), union.tolist(), n_boot=N_BOOT, seed=7)
    c = bootstrap_iou(inter, union, n_boot=N_BOOT, seed=8)
    assert a == b
    assert (c["giou"].lo, c["giou"].hi) != (a["giou"].lo, a["giou"].hi)
    assert c["giou"].value == a["giou"].value  # the point value does not depend on the seed
    for e in a.values():
        assert e.lo < e.value < e.hi


def test_bootstrap_iou_of_nothing_is_nan():
    out = bootstrap_iou([], [])
    for e in out.values():
        assert math.isnan(e.value) and math.isnan(e.lo) and math.isnan(e.hi) and e.n == 0


@pytest.mark.parametrize(
    "inter, union",
    [([1, 2], [3]), ([4], [3]), ([-1], [3]), ([1], [-1]), ([[1]], [[2]]), ([math.nan], [1])],
)
def test_bootstrap_iou_rejects_bad_counts(inter, union):
    with pytest.raises(ValueError):
        bootstrap_iou(inter, union, n_boot=N_BOOT)


def test_bootstrap_rejects_no_resample():
    with pytest.raises(ValueError):
        bootstrap_iou([1], [2], n_boot=0)
    with pytest.raises(ValueError):
        paired_difference([1.0], [0.0], n_boot=0)


# --- paired differences ---------------------------------------------------------------------------


def test_paired_difference_of_identical_inputs_is_zero():
    a = np.random.default_rng(0).uniform(0, 1, size=40)
    d = paired_difference(a, a.copy(), n_boot=N_BOOT)
    assert (d.value, d.lo, d.hi, d.n) == (0.0, 0.0, 0.0, 40)
    assert within_noise(d)


def test_paired_difference_big_gap_excludes_zero():
    rng = np.random.default_rng(1)
    a = (rng.uniform(size=100) < 0.9).astype(float)
    b = (rng.uniform(size=100) < 0.1).astype(float)
    d = paired_difference(a, b, n_boot=N_BOOT)
    assert d.value == pytest.approx(a.mean() - b.mean())
    assert 0.0 < d.lo < d.value < d.hi
    assert not within_noise(d)


def test_paired_difference_one_flip_is_within_noise():
    # the models agree but on one of 50 samples: the difference 0.02 cannot be told from 0
    a = np.zeros(50)
    b = np.zeros(50)
    a[7] = 1.0
    d = paired_difference(a, b, n_boot=N_BOOT)
    assert d.value == pytest.approx(0.02)
    assert d.lo == 0.0 and within_noise(d)


def test_paired_difference_cancels_shared_difficulty():
    # b is a shifted by a constant on wildly varying samples: every pair differs by 0.01, so the
    # paired interval is a point, where the two separate intervals would overlap widely
    a = np.random.default_rng(2).uniform(0.2, 1.0, size=60)
    d = paired_difference(a, a - 0.01, n_boot=N_BOOT)
    assert d.value == pytest.approx(0.01)
    assert d.lo == pytest.approx(0.01) and d.hi == pytest.approx(0.01)
    assert not within_noise(d)


def test_paired_difference_against_zero_agrees_with_wilson():
    # a 0/1 score against a model that is always wrong: the bootstrap interval of the accuracy is
    # close to the Wilson interval at this n (a loose check of the percentile interval)
    a = np.zeros(200)
    a[:80] = 1.0
    d = paired_difference(a, np.zeros(200), n_boot=2000, seed=3)
    w = proportion(80, 200)
    assert d.value == w.value
    assert d.lo == pytest.approx(w.lo, abs=0.02) and d.hi == pytest.approx(w.hi, abs=0.02)


def test_paired_difference_is_deterministic_and_validates():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(size=30), rng.uniform(size=30)
    first = paired_difference(a, b, n_boot=N_BOOT, seed=5)
    assert paired_difference(list(a), list(b), n_boot=N_BOOT, seed=5) == first
    with pytest.raises(ValueError):
        paired_difference([1.0, 0.0], [1.0])
    e = paired_difference([], [])
    assert math.isnan(e.value) and e.n == 0 and within_noise(e)


def test_paired_iou_difference():
    inter_a, union_a = [10, 0, 3600, 0], [30, 8, 3600, 0]
    inter_b, union_b = [20, 4, 1800, 0], [30, 8, 3600, 5]
    same = paired_iou_difference(inter_a, union_a, inter_a, union_a, n_boot=N_BOOT)
    for e in same.values():
        assert (e.value, e.lo, e.hi, e.n) == (0.0, 0.0, 0.0, 4)
    d = paired_iou_difference(inter_a, union_a, inter_b, union_b, n_boot=N_BOOT)
    a = bootstrap_iou(inter_a, union_a, n_boot=N_BOOT)
    b = bootstrap_iou(inter_b, union_b, n_boot=N_BOOT)
    for key in ("ciou", "giou"):
        assert d[key].value == pytest.approx(a[key].value - b[key].value)
        assert d[key].lo <= d[key].value <= d[key].hi
    # b: cIoU (20 + 4 + 1800) / (30 + 8 + 3600 + 5) = 1824 / 3643; gIoU (2/3 + 1/2 + 1/2 + 0) / 4
    assert d["ciou"].value == pytest.approx(3610 / 3638 - 1824 / 3643)
    assert d["giou"].value == pytest.approx(7 / 12 - 5 / 12)


def test_paired_iou_difference_perfect_against_empty_excludes_zero():
    union = np.random.default_rng(6).integers(10, 100, size=25)
    d = paired_iou_difference(union, union, np.zeros(25), union, n_boot=N_BOOT)
    for e in d.values():
        assert e.value == e.lo == e.hi == 1.0 and not within_noise(e)


def test_paired_iou_difference_validates():
    with pytest.raises(ValueError):
        paired_iou_difference([1, 2], [2, 2], [1], [2])
    with pytest.raises(ValueError):
        paired_iou_difference([3], [2], [1], [2])
    out = paired_iou_difference([], [], [], [])
    assert all(math.isnan(e.value) and e.n == 0 for e in out.values())


# --- baselines ------------------------------------------------------------------------------------


def test_baselines():
    assert majority_baseline(["A", "B", "A", "C"]) == 0.5
    assert majority_baseline(["yes"]) == 1.0
    assert math.isnan(majority_baseline([]))
    # (1/2 + 1/4) / 2 = 0.375; HardBLINK's 3/4/5 points: (1/3 + 1/4 + 1/5) / 3 = 0.261
    assert chance_baseline([2, 4]) == pytest.approx(0.375)
    assert chance_baseline([3, 4, 5]) == pytest.approx(0.261, abs=1e-3)
    assert math.isnan(chance_baseline([]))
    with pytest.raises(ValueError):
        chance_baseline([4, 0])
