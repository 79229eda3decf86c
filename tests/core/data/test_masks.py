"""COCO RLE helpers: round trips against pycocotools."""

import json

import numpy as np
from pycocotools import mask as mask_utils

from perceptio_core.data.masks import (
    decode_mask,
    encode_mask,
    mask_centroid,
    polygons_to_mask,
    resize_nearest,
    rle_area,
    segmentation_to_mask,
    to_compressed,
    union_rles,
)


def _random_mask(seed, h=37, w=53):
    return np.random.default_rng(seed).random((h, w)) > 0.6


def test_round_trip_and_json():
    m = _random_mask(0)
    rle = encode_mask(m)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    rle2 = json.loads(json.dumps(rle))
    assert np.array_equal(decode_mask(rle2), m)
    assert rle_area(rle2) == int(m.sum())


def test_uncompressed_rle_as_coco_stores_crowds():
    m = _random_mask(1)
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = m.astype(np.uint8).flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    unc = {"size": [37, 53], "counts": runs}
    assert np.array_equal(decode_mask(unc), m)
    assert to_compressed(unc) == encode_mask(m)


def test_polygons_union_and_centroid():
    poly = [[10, 10, 30, 10, 30, 20, 10, 20]]
    m = polygons_to_mask(poly, 40, 50)
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 40, 50))).astype(bool)
    assert np.array_equal(m, ref) and m.sum() > 0
    assert np.array_equal(segmentation_to_mask(poly, 40, 50), m)
    cx, cy = mask_centroid(m)
    assert 19 <= cx <= 21 and 14 <= cy <= 16
    assert mask_centroid(np.zeros((4, 4), bool)) is None
    a, b = _random_mask(2, 40, 50), _random_mask(3, 40, 50)
    assert np.array_equal(decode_mask(union_rles([encode_mask(a), encode_mask(b)])), a | b)


def test_resize_nearest():
    arr = np.arange(16).reshape(4, 4)
    assert np.array_equal(resize_nearest(arr, 2, 2), arr[[1, 3]][:, [1, 3]])  # pixel-centre sampling
    assert resize_nearest(arr, 8, 8).shape == (8, 8)
