"""Depth metrics (SPEC §2): hand-computed values and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perceptio_core.depth.metrics import (
    MAP_EPS,
    absrel,
    align_scale_shift,
    delta1,
    digest_seed,
    map_metrics,
    pair_order_accuracy,
    resize_map,
    teacher_scores,
    teacher_vs_true_metrics,
)


def test_align_scale_shift_recovers_affine_and_ignores_masked_pixels():
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    target = 2.0 * pred + 1.0
    target_outlier = target.copy()
    target_outlier[3] = 100.0
    aligned, s, t = align_scale_shift(pred, target_outlier, mask=np.array([1, 1, 1, 0], bool))
    assert s == pytest.approx(2.0) and t == pytest.approx(1.0)
    np.testing.assert_allclose(aligned, target)


def test_align_scale_shift_hand_computed_least_squares():
    # pred (0, 1, 2), target (0, 2, 1): cov = 1, var = 2 -> s = 0.5; t = 1 - 0.5 * 1 = 0.5
    _, s, t = align_scale_shift(np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 1.0]))
    assert (s, t) == pytest.approx((0.5, 0.5))
    # a constant prediction: scale 0, shift = the target's mean
    _, s, t = align_scale_shift(np.ones(3), np.array([1.0, 2.0, 6.0]))
    assert (s, t) == pytest.approx((0.0, 3.0))
    with pytest.raises(ValueError):
        align_scale_shift(np.ones(2), np.ones(2), mask=np.zeros(2, bool))


def test_absrel_and_delta1_by_hand():
    assert absrel(np.array([2.0, 4.0]), np.array([2.0, 5.0])) == pytest.approx(0.1)
    # ratios 1, 1.3, 2 -> only the first is under 1.25
    assert delta1(np.array([1.0, 1.3, 2.0]), np.ones(3)) == pytest.approx(1 / 3)
    # ratio symmetric: 0.5 vs 1 fails like 2 vs 1; non-positive predictions are wrong
    assert delta1(np.array([0.5, 0.0, 1.1]), np.ones(3)) == pytest.approx(1 / 3)
    # invalid ground truth is skipped
    assert absrel(np.array([1.0, 7.0]), np.array([1.0, 0.0])) == 0.0
    assert absrel(torch.tensor([2.0]), torch.tensor([4.0])) == pytest.approx(0.5)


def test_pair_order_accuracy_conventions():
    rng = np.random.default_rng(0)
    true = rng.uniform(1.0, 10.0, (16, 16))
    assert pair_order_accuracy(true, true, n_pairs=500, rng=1) == 1.0
    assert pair_order_accuracy(-true, true, n_pairs=500, rng=1) == 0.0
    # the teacher's convention: disparity, larger = nearer
    assert pair_order_accuracy(1.0 / true, true, n_pairs=500, rng=1, pred_is_disparity=True) == 1.0
    # a constant prediction ties every pair: all wrong
    assert pair_order_accuracy(np.ones_like(true), true, n_pairs=500, rng=1) == 0.0
    # all pairs ambiguous (equal depths): nothing to score
    assert math.isnan(pair_order_accuracy(true, np.full_like(true, 3.0), n_pairs=100, rng=1))


def test_pair_order_accuracy_by_hand_two_pixels():
    # two pixels, true depths 1 and 2; prediction gets the order right: every non-tie pair counts 1
    pred, true = np.array([1.0, 5.0]), np.array([1.0, 2.0])
    assert pair_order_accuracy(pred, true, n_pairs=200, rng=0) == 1.0
    # depths 1 and 1.01 differ by 1% < min_rel_diff (5%): skipped
    assert math.isnan(pair_order_accuracy(pred, np.array([1.0, 1.01]), n_pairs=200, rng=0))


def test_teacher_vs_true_metrics_perfect_and_affine_invariant():
    rng = np.random.default_rng(0)
    true = rng.uniform(2.0, 20.0, (24, 32))
    disp = 1.0 / true
    norm = (disp - disp.min()) / (disp.max() - disp.min())  # the stored [0, 1] map
    m = teacher_vs_true_metrics(norm, true)
    assert m["absrel"] == pytest.approx(0.0, abs=1e-6)  # float32 maps
    assert m["delta1"] == 1.0 and m["pair_order"] == 1.0
    assert m["scale"] > 0
    # depth instead of disparity: the order is reversed
    assert teacher_vs_true_metrics(true, true)["pair_order"] == 0.0


def test_teacher_vs_true_metrics_resizes_the_map_to_the_true_depth():
    true = np.tile(np.linspace(2.0, 10.0, 48)[:, None], (1, 64))  # depth grows downwards
    disp = resize_map(1.0 / true, (20, 20))
    m = teacher_vs_true_metrics(disp, true)
    assert m["pair_order"] > 0.99
    assert m["absrel"] < 0.02


def test_map_metrics_by_hand():
    same = np.random.default_rng(0).uniform(0, 1, (2, 8, 8))
    m = map_metrics(same, same)
    assert m == {"mse": 0.0, "absrel": 0.0, "delta1": 1.0}
    # one pixel: recon 0, target 0.1 -> depths 1/eps = 10 and 1/(0.1 + eps) = 5
    m = map_metrics(np.array([[0.0]]), np.array([[0.1]]))
    assert MAP_EPS == 0.1
    assert m["mse"] == pytest.approx(0.01)
    assert m["absrel"] == pytest.approx(1.0)
    assert m["delta1"] == 0.0


def test_resize_map_one_map_or_a_stack_alike():
    rng = np.random.default_rng(0)
    stack = rng.uniform(0, 1, (3, 20, 24)).astype(np.float32)
    out = resize_map(stack, (10, 12))
    assert out.shape == (3, 10, 12) and out.dtype == np.float32
    for a, b in zip(stack, out):
        np.testing.assert_array_equal(resize_map(a, (10, 12)), b)
    ref = torch.nn.functional.interpolate(torch.from_numpy(stack)[:, None], size=(10, 12), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()  # fmt: skip
    np.testing.assert_array_equal(out, ref)
    assert resize_map(stack[0], 16).shape == (16, 16)
    np.testing.assert_array_equal(resize_map(stack, (20, 24)), stack)  # already that size
    assert resize_map(torch.from_numpy(stack), (10, 12)).shape == (3, 10, 12)


def test_teacher_scores_average_the_per_image_metrics_seeded_by_digest():
    rng = np.random.default_rng(1)
    items = []
    for i in range(3):
        true = rng.uniform(1.0, 10.0, (12, 16))
        items.append((f"{i:02x}" * 32, 1.0 / true + rng.normal(0, 0.02, true.shape), true))
    got = teacher_scores(items)
    rows = [teacher_vs_true_metrics(m, t, seed=digest_seed(d)) for d, m, t in items]
    assert got["images"] == 3.0
    for key in ("absrel", "delta1", "pair_order"):
        assert got[key] == pytest.approx(float(np.mean([r[key] for r in rows])), abs=1e-12)
    assert digest_seed("0a1b2c" + "f" * 58) == 0x0A1B2C
    empty = teacher_scores([])
    assert empty["images"] == 0.0 and math.isnan(empty["absrel"])
