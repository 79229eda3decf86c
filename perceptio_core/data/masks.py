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


# --------------------------------------------------------------------------------------------
# Masks to COCO polygons and uncompressed RLE (the forms COCO annotation files hold)
# --------------------------------------------------------------------------------------------


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a binary mask as COCO polygons ``[[x1, y1, x2, y2, ...], ...]``.

    Marching squares (contourpy) at level 0.5 puts vertices on the midpoints between inside and
    outside pixel centres, in COCO's pixel coordinates (pixel (r, c) covers [c, c+1) x [r, r+1));
    collinear vertices are dropped. Holes are not representable in COCO polygons and are left out:
    the caller checks the decoded polygon against the mask and falls back to RLE when it matters.
    """
    import contourpy

    z = np.pad(np.asarray(mask, dtype=np.float64), 1)
    gen = contourpy.contour_generator(z=z, line_type=contourpy.LineType.Separate)
    polys: list[list[float]] = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, dtype=np.float64)[:-1] - 0.5  # drop the closing repeat; unpad, +0.5
        x, y = pts[:, 0], pts[:, 1]
        area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
        if area <= 0:  # a hole (negative orientation) or degenerate
            continue
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (
            nxt[:, 0] - pts[:, 0]
        )
        pts = pts[np.abs(cross) > 1e-9]
        if len(pts) >= 3:
            polys.append([round(float(v), 2) for v in pts.reshape(-1)])
    return polys


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE ``{"size": [h, w], "counts": [...]}`` (column-major runs, zeros first)."""
    m = np.asarray(mask, dtype=np.uint8)
    flat = m.T.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).astype(int).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}
