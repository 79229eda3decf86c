"""Binary masks as COCO compressed RLE, the one mask encoding of the sample schema (SPEC §5).

Every sample that carries a mask stores it as a COCO compressed RLE dict
``{"size": [h, w], "counts": "<str>"}`` (``counts`` as text so it survives JSON). These helpers wrap
pycocotools so that no other module touches its Fortran-order and bytes-vs-str details.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]  # {"size": [h, w], "counts": str}


def encode_mask(mask: np.ndarray) -> RLE:
    """``mask`` [H, W] (bool or 0/1) -> compressed RLE with ``counts`` as str and ``size`` [h, w]."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"encode_mask expects a 2-D mask, got shape {m.shape}")
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts),
    }


def to_compressed(rle: RLE) -> RLE:
    """Any COCO RLE (compressed with str/bytes counts, or uncompressed with a list of run lengths,
    as COCO stores crowd annotations) -> compressed RLE with str counts."""
    h, w = int(rle["size"][0]), int(rle["size"][1])
    counts = rle["counts"]
    if isinstance(counts, list):
        comp = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        counts = comp["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [h, w], "counts": str(counts)}


def _for_pycocotools(rle: RLE) -> dict[str, Any]:
    c = to_compressed(rle)
    return {"size": c["size"], "counts": c["counts"].encode("ascii")}


def decode_mask(rle: RLE) -> np.ndarray:
    """RLE (compressed or uncompressed) -> bool mask [H, W]."""
    return mask_utils.decode(_for_pycocotools(rle)).astype(bool)


def rle_area(rle: RLE) -> int:
    """Foreground pixel count of an RLE, without decoding it."""
    return int(mask_utils.area(_for_pycocotools(rle)))


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygon list (each a flat ``[x0, y0, x1, y1, ...]``) -> bool mask [H, W] (their union)."""
    polys = [p for p in polygons if len(p) >= 6]
    if not polys:
        return np.zeros((height, width), dtype=bool)
    rles = mask_utils.frPyObjects(polys, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` as stored (polygon list, uncompressed or compressed RLE) -> bool
    mask [H, W]. Used for sources whose reader gives no decoder of its own (GLaMM)."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        return decode_mask(segmentation)
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def union_rles(rles: list[RLE]) -> RLE:
    """Union of RLEs of the same size (compressed, str counts)."""
    if not rles:
        raise ValueError("union_rles needs at least one RLE")
    merged = mask_utils.merge([_for_pycocotools(r) for r in rles], intersect=False)
    return to_compressed(merged)


def mask_centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """Centre of mass ``(x, y)`` in pixels of a bool mask [H, W]; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return float(xs.mean()), float(ys.mean())


def resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to [height, width] (pixel-centre sampling), so a mask
    and a teacher map of another resolution can be compared cell by cell."""
    h, w = arr.shape[:2]
    if (h, w) == (height, width):
        return arr
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]
