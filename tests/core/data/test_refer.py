"""ann_to_mask on every COCO segmentation form, and read_refer on the synthetic REFER trees."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from perceptio_core.data.records import DatasetNotFoundError
from perceptio_core.data.refer import (
    MaskError,
    ann_to_mask,
    read_refer,
    rle_string_counts,
    segmentation_to_rle,
)


def test_polygon_pixel_aligned_rectangle():
    # corners on pixel borders: columns 1..4 x rows 1..3 are covered, 4 * 3 = 12 pixels
    m = ann_to_mask([[1, 1, 5, 1, 5, 4, 1, 4]], 10, 10)
    assert m.dtype == np.uint8 and m.shape == (10, 10)
    expected = np.zeros((10, 10), np.uint8)
    expected[1:4, 1:5] = 1
    np.testing.assert_array_equal(m, expected)


def test_two_polygons_merge_and_degenerate_ones_are_dropped():
    segs = [[1, 1, 5, 1, 5, 4, 1, 4], [6, 6, 8, 6, 8, 8, 6, 8], [3, 3, 4, 4]]  # last: 2 points
    m = ann_to_mask(segs, 10, 10)
    assert int(m.sum()) == 12 + 4
    assert m[6:8, 6:8].all()


def test_uncompressed_rle_column_major():
    # 4 rows x 5 cols; runs in column-major order: 3 zeros, 4 ones, 6 zeros, 2 ones, 5 zeros
    m = ann_to_mask({"size": [4, 5], "counts": [3, 4, 6, 2, 5]}, 4, 5)
    assert int(m.sum()) == 6
    flat = m.T.reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(flat), [3, 4, 5, 6, 13, 14])


def test_crowd_rle_starting_with_ones():
    # a crowd annotation as COCO stores it: iscrowd 1, list counts; leading zero-run of length 0
    ann = {"iscrowd": 1, "segmentation": {"size": [3, 3], "counts": [0, 2, 4, 3]}}
    m = ann_to_mask(ann["segmentation"], 3, 3)
    assert int(m.sum()) == 5
    assert m[0, 0] == 1 and m[1, 0] == 1 and m[2, 0] == 0  # first column: 1, 1, 0
    assert m[:, 2].all()  # last column all ones


def test_compressed_rle_round_trip():
    rng = np.random.default_rng(0)
    mask = (rng.random((13, 17)) > 0.6).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))
    seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    np.testing.assert_array_equal(ann_to_mask(seg, 13, 17), mask)
    counts = rle_string_counts(seg["counts"])
    assert sum(counts) == 13 * 17
    assert sum(counts[1::2]) == int(mask.sum())


@pytest.mark.parametrize("seg, message", [
    ([[1, 1, 5, 1, 5]], "odd number"),
    ([[1, 1, 5, 1]], "at least 3 points"),
    ([[1, 1, float("nan"), 1, 5, 4]], "non-finite"),
    ({"size": [4, 4], "counts": [3, 4, 6, 2, 5]}, "does not match"),
    ({"size": [4, 5], "counts": [3, 4, 6]}, "sum to 13"),
    ({"size": [4, 5], "counts": "04"}, "sum to 4,"),
    ({"size": [4, 5], "counts": "\x01\x02"}, "invalid character"),
    ("not a segmentation", "unsupported"),
])
def test_malformed_segmentations(seg, message):
    with pytest.raises(MaskError, match=message):
        ann_to_mask(seg, 4, 5)


def test_segmentation_to_rle_area_matches_decode():
    rle = segmentation_to_rle([[1, 1, 5, 1, 5, 4, 1, 4]], 10, 10)
    assert int(mask_utils.area(rle)) == 12


def test_read_refer_on_the_world(tiny_world):
    res = read_refer(tiny_world / "refcoco", tiny_world / "images" / "train2014",
                     depth_dir=tiny_world / "depth")
    assert res.quarantine == []
    assert res.refs, "the world has RefCOCO expressions"
    for r in res.refs[:40]:
        assert r.dataset == "refcoco" and r.split_by == "unc" and r.sentence
        assert r.split in {"train", "val", "testA", "testB"}
        img = res.images[r.image_id]
        assert ann_to_mask(r.segmentation, img.height, img.width).any()
        assert r.attributes["shape"] == r.category
    for img in res.images.values():
        assert len(img.digest) == 64 and img.depth_path and img.source == "coco"


def test_read_refer_missing_pieces(tmp_path, tiny_world):
    with pytest.raises(DatasetNotFoundError, match="absent"):
        read_refer(tmp_path / "absent", tiny_world / "images" / "train2014")
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "instances.json").write_text(
        (tiny_world / "refcoco" / "instances.json").read_text())
    with pytest.raises(DatasetNotFoundError, match=r"refs\(unc\)\.p"):
        read_refer(tmp_path / "refcoco", tiny_world / "images" / "train2014")
