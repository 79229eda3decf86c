"""Referring-segmentation metrics (SPEC §6): cIoU, gIoU, P@0.5, honest counting, pycocotools agreement."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from perceptio_core.evaluation.metrics import IoUAccumulator, intersection_union, mask_iou, resize_mask


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_hand_computed_single_sample():
    gt = _box(10, 10, 0, 4, 0, 5)  # 20 px
    pred = _box(10, 10, 2, 6, 0, 5)  # 20 px, overlap rows 2-3: 10 px
    assert intersection_union(pred, gt) == (10, 30)
    assert mask_iou(pred, gt) == pytest.approx(1 / 3)


def test_ciou_and_giou_differ_big_hit_small_miss():
    # a 60x60 object predicted perfectly and a 2x2 object missed entirely
    big = _box(100, 100, 10, 70, 10, 70)
    small = _box(100, 100, 90, 92, 90, 92)
    acc = IoUAccumulator()
    assert acc.add(big, big) == 1.0
    assert acc.add(_box(100, 100, 0, 2, 0, 2), small) == 0.0
    # cIoU = (3600 + 0) / (3600 + 8); gIoU = (1 + 0) / 2
    assert acc.ciou == pytest.approx(3600 / 3608)
    assert acc.giou == pytest.approx(0.5)
    assert acc.precision_at(0.5) == pytest.approx(0.5)
    assert acc.result() == {"ciou": pytest.approx(3600 / 3608), "giou": 0.5, "p50": 0.5, "n": 2.0}


def test_missing_prediction_counts_as_empty_never_skipped():
    gt = _box(8, 8, 0, 4, 0, 4)
    acc = IoUAccumulator()
    acc.add(gt, gt)
    assert acc.add(None, gt) == 0.0
    assert acc.n == 2
    assert acc.sum_union == 32 and acc.sum_intersection == 16
    assert acc.ciou == pytest.approx(0.5) and acc.giou == pytest.approx(0.5)


def test_empty_vs_empty_is_one_and_no_sample_is_nan():
    empty = np.zeros((5, 5), dtype=bool)
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(None, empty) == 1.0
    acc = IoUAccumulator()
    assert math.isnan(acc.ciou) and math.isnan(acc.giou) and math.isnan(acc.precision_at(0.5))
    acc.add(empty, empty)
    assert acc.ciou == 1.0 and acc.giou == 1.0


def test_precision_thresholds_and_merge():
    gt = _box(10, 10, 0, 10, 0, 10)
    half = _box(10, 10, 0, 5, 0, 10)  # IoU 0.5 exactly: counts at 0.5
    a, b = IoUAccumulator(thresholds=(0.5, 0.7)), IoUAccumulator(thresholds=(0.5, 0.7))
    a.add(half, gt)
    b.add(gt, gt)
    a.merge(b)
    assert a.precision_at(0.5) == 1.0 and a.precision_at(0.7) == 0.5
    assert a.result()["p70"] == 0.5
    with pytest.raises(KeyError):
        a.precision_at(0.9)


def test_shape_mismatch_raises_and_resize_is_nearest():
    with pytest.raises(ValueError, match="resize first"):
        mask_iou(np.zeros((4, 4), bool), np.zeros((8, 8), bool))
    m = _box(2, 2, 0, 1, 0, 1)
    r = resize_mask(m, (4, 6))
    assert r.shape == (4, 6) and r.dtype == bool
    assert r[:2, :3].all() and not r[2:, :].any() and not r[:, 3:].any()


def test_agrees_with_pycocotools_on_random_masks():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for i in range(20):
        h, w = rng.integers(5, 40, 2)
        p = rng.random((h, w)) < rng.random()
        g = rng.random((h, w)) < rng.random()
        if not g.any():
            g[0, 0] = True
        rp = mask_utils.encode(np.asfortranarray(p.astype(np.uint8)))
        rg = mask_utils.encode(np.asfortranarray(g.astype(np.uint8)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ref = float(np.asarray(mask_utils.iou([rp], [rg], [0]))[0, 0])
        assert mask_iou(p, g) == pytest.approx(ref, abs=1e-12), i


def test_mme_scores_by_hand():
    from perceptio_core.evaluation.metrics import mme_scores

    rows = [("existence", "e/1", True), ("existence", "e/1", True),  # image 1: both right
            ("existence", "e/2", True), ("existence", "e/2", False),  # image 2: one right
            ("count", "c/1", False), ("count", "c/1", True),
            ("code_reasoning", "r/1", False), ("code_reasoning", "r/1", False)]
    groups = {"existence": "perception", "count": "perception", "code_reasoning": "cognition"}
    m = mme_scores(rows, groups)
    # existence: acc 3/4, acc+ 1/2 -> 100 * 1.25 = 125; count: acc 1/2, acc+ 0 -> 50; code: 0
    assert m["existence.acc"] == 0.75 and m["existence.acc_plus"] == 0.5 and m["existence.score"] == 125.0
    assert m["existence.n"] == 4 and m["count.score"] == 50.0 and m["code_reasoning.score"] == 0.0
    assert m["perception.score"] == 175.0 and m["cognition.score"] == 0.0
