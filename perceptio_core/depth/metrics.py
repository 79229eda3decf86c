"""Depth metrics for the teacher and the depth codebook (SPEC §2).

Two comparisons live here.

Teacher vs true depth (:func:`teacher_vs_true_metrics`). The teacher (Depth Anything V2, relative)
predicts *inverse depth up to an unknown scale and shift*: larger is nearer. As MiDaS and Depth
Anything evaluate relative models on metric ground truth, the prediction is aligned to the true
disparity ``1 / depth`` by a per-image least-squares scale and shift over the valid pixels
(:func:`align_scale_shift`), the aligned disparity is floored at ``1 / depth_cap`` (``depth_cap`` =
the image's largest true depth unless given) and inverted to depth, and then AbsRel and delta1 are
taken against the true depth. Pair-order accuracy needs no alignment: the share of random pixel
pairs, among those whose true depths differ by at least ``min_rel_diff`` relatively, that the
prediction puts in the right order (teacher disparity descending = depth ascending).

:func:`teacher_scores` averages it over a set of images: the one way a teacher is scored, at the
end of its fit and over the stored maps of the ``teacher_depth`` stage.

Reconstructed vs teacher maps (:func:`map_metrics`). Stored maps are the teacher's disparity,
min-max normalised per image to [0, 1], so 0 (the farthest pixel) has no meaningful ratio. A [0, 1]
map ``m`` is read as the disparity ``m + eps`` of a scene whose far-to-near depth ratio is
``(1 + eps) / eps`` (``eps = MAP_EPS = 0.1``: a scene 11 times deeper at the back than at the front,
typical of indoor and street scenes), i.e. the depth ``1 / (m + eps)``; AbsRel and delta1 are
computed on those depths. delta1 is the same on disparity or depth (``max(a/b, b/a)`` is invariant
under inversion); AbsRel on depth is ``mean |t - r| / (r + eps)`` in map units.

All functions take numpy arrays (torch tensors are converted) and return Python floats.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

MAP_EPS = 0.1  # [0, 1] map m -> disparity m + MAP_EPS (see the module docstring)
DELTA1_THRESHOLD = 1.25


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _valid_mask(*arrays: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    m = np.ones(arrays[0].shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    for a in arrays:
        m &= np.isfinite(a)
    return m


def align_scale_shift(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, float, float]:
    """Least-squares ``s, t = argmin sum_mask (s * pred + t - target)^2``; returns
    ``(s * pred + t, s, t)``.

    pred, target, mask: arrays of one shape (e.g. [H, W]); ``mask`` (bool) marks the pixels used for
    the fit (non-finite pixels are always left out). A constant ``pred`` gets ``s = 0`` and ``t`` =
    the target's mean. Raises ``ValueError`` when no pixel is valid.
    """
    p = _np(pred).astype(np.float64)
    g = _np(target).astype(np.float64)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and target {g.shape} differ in shape")
    m = _valid_mask(p, g, mask=mask)
    if not m.any():
        raise ValueError("align_scale_shift: no valid pixel")
    pv, gv = p[m], g[m]
    pm, gm = pv.mean(), gv.mean()
    var = ((pv - pm) ** 2).sum()
    s = float(((pv - pm) * (gv - gm)).sum() / var) if var > 1e-20 else 0.0
    t = float(gm - s * pm)
    return s * p + t, s, t


def absrel(pred_depth: np.ndarray, true_depth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean ``|pred - true| / true`` over valid pixels (``true > 0``, both finite, ``mask``)."""
    p, g = _np(pred_depth).astype(np.float64), _np(true_depth).astype(np.float64)
    m = _valid_mask(p, g, mask=mask) & (g > 0)
    if not m.any():
        raise ValueError("absrel: no valid pixel")
    return float(np.mean(np.abs(p[m] - g[m]) / g[m]))


def delta1(
    pred_depth: np.ndarray,
    true_depth: np.ndarray,
    mask: np.ndarray | None = None,
    threshold: float = DELTA1_THRESHOLD,
) -> float:
    """Share of valid pixels with ``max(pred / true, true / pred) < threshold`` (1.25 by default).
    Pixels where either value is <= 0 count as wrong if ``true > 0``, and are skipped otherwise."""
    p, g = _np(pred_depth).astype(np.float64), _np(true_depth).astype(np.float64)
    m = _valid_mask(p, g, mask=mask) & (g > 0)
    if not m.any():
        raise ValueError("delta1: no valid pixel")
    pv, gv = p[m], g[m]
    ok = pv > 0
    ratio = np.full(pv.shape, np.inf)
    ratio[ok] = np.maximum(pv[ok] / gv[ok], gv[ok] / pv[ok])
    return float(np.mean(ratio < threshold))


def pair_order_accuracy(
    pred: np.ndarray,
    true: np.ndarray,
    n_pairs: int = 2000,
    rng: np.random.Generator | int | None = 0,
    min_rel_diff: float = 0.05,
    mask: np.ndarray | None = None,
    pred_is_disparity: bool = False,
) -> float:
    """Share of random pixel pairs whose depth order ``pred`` gets right.

    true: depth ([H, W], larger = farther). pred: same shape; depth-like (larger = farther), or
    disparity-like (larger = nearer, as the teacher outputs) with ``pred_is_disparity=True``. Only
    monotonic order matters, so no alignment is needed. ``n_pairs`` pairs are drawn uniformly among
    the valid pixels; pairs whose true depths differ by less than ``min_rel_diff`` relatively
    (``|a - b| / min(a, b)``) are ambiguous and skipped; a tie in ``pred`` counts as wrong. Returns
    ``nan`` when no pair is left.
    """
    p, g = _np(pred).astype(np.float64), _np(true).astype(np.float64)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and true {g.shape} differ in shape")
    if pred_is_disparity:
        p = -p
    m = _valid_mask(p, g, mask=mask) & (g > 0)
    idx = np.flatnonzero(m.ravel())
    if idx.size < 2:
        return float("nan")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    a = idx[gen.integers(0, idx.size, n_pairs)]
    b = idx[gen.integers(0, idx.size, n_pairs)]
    pf, gf = p.ravel(), g.ravel()
    ga, gb = gf[a], gf[b]
    keep = np.abs(ga - gb) / np.minimum(ga, gb) >= min_rel_diff
    if not keep.any():
        return float("nan")
    true_sign = np.sign(ga[keep] - gb[keep])
    pred_sign = np.sign(pf[a][keep] - pf[b][keep])
    return float(np.mean(true_sign == pred_sign))


def resize_map(x: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres, ``F.interpolate(align_corners=False)``) of float maps
    [..., H, W] (one map [H, W] or a stack [N, H, W]) to [..., h, w] for ``size = (h, w)`` (an int:
    square). Returns float32; the input itself (as float32) when it already has that size. The one
    resize of depth maps: the teacher's maps to the VQ-VAE's input, a map to an image's size."""
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    a = np.asarray(_np(x), dtype=np.float32)
    if a.ndim < 2:
        raise ValueError(f"resize_map: maps must be [..., H, W], got {a.shape}")
    if a.shape[-2:] == hw:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a)).reshape(-1, 1, *a.shape[-2:])
    out = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)  # [n, 1, h, w]
    return out.reshape(*a.shape[:-2], *hw).numpy()


def teacher_vs_true_metrics(
    pred_norm_map: np.ndarray,
    true_depth: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    depth_cap: float | None = None,
    n_pairs: int = 2000,
    seed: int = 0,
    min_rel_diff: float = 0.05,
) -> dict[str, float]:
    """Compare one teacher map with the true depth (see the module docstring for the protocol).

    pred_norm_map: [h, w] teacher disparity, any affine normalisation (e.g. the stored [0, 1] map),
        resized bilinearly to the true depth's [H, W] when the sizes differ.
    true_depth: [H, W] metric depth (metres); pixels <= 0 or non-finite are invalid.
    Returns ``{"absrel", "delta1", "pair_order", "scale", "shift"}`` (scale/shift of the alignment of
    ``pred`` to ``1 / true_depth``).
    """
    g = _np(true_depth).astype(np.float64)
    p = resize_map(_np(pred_norm_map), g.shape).astype(np.float64)
    m = _valid_mask(p, g, mask=mask) & (g > 0)
    target_disp = np.where(m, 1.0 / np.where(g > 0, g, 1.0), 0.0)
    aligned, s, t = align_scale_shift(p, target_disp, m)
    cap = float(g[m].max()) if depth_cap is None else float(depth_cap)
    pred_depth = 1.0 / np.maximum(aligned, 1.0 / cap)
    return {
        "absrel": absrel(pred_depth, g, m),
        "delta1": delta1(pred_depth, g, m),
        "pair_order": pair_order_accuracy(
            p, g, n_pairs=n_pairs, rng=seed, min_rel_diff=min_rel_diff, mask=m, pred_is_disparity=True
        ),
        "scale": s,
        "shift": t,
    }


def digest_seed(digest: str) -> int:
    """The seed of an image's random pixel pairs: its digest's first 24 bits, so an image is scored
    on the same pairs whoever scores it."""
    return int(digest[:6], 16)


def teacher_scores(items: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """A teacher scored against true depth: :func:`teacher_vs_true_metrics` averaged over images.

    items: ``(digest, teacher map [h, w], true depth [H, W])`` per image; the pair-order sample of an
        image is seeded by :func:`digest_seed`.
    Returns ``{"absrel", "delta1", "pair_order"}`` (means over the images where each is defined;
    ``nan`` with none) and ``"images"`` (how many were scored).
    """
    rows = [teacher_vs_true_metrics(m, true, seed=digest_seed(d)) for d, m, true in items]
    out: dict[str, float] = {"images": float(len(rows))}
    for key in ("absrel", "delta1", "pair_order"):
        vals = [r[key] for r in rows if not np.isnan(r[key])]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    return out


def map_metrics(
    recon: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, eps: float = MAP_EPS
) -> dict[str, float]:
    """Reconstruction metrics of [0, 1] disparity maps against the teacher's (SPEC §2).

    recon, target: [N, H, W] (or [H, W]) maps in [0, 1]. Returns ``{"mse", "absrel", "delta1"}``:
    MSE in map units, and AbsRel / delta1 on the depths ``1 / (map + eps)`` (module docstring).
    """
    r = np.clip(_np(recon).astype(np.float64), 0.0, 1.0)
    t = np.clip(_np(target).astype(np.float64), 0.0, 1.0)
    if r.shape != t.shape:
        raise ValueError(f"recon {r.shape} and target {t.shape} differ in shape")
    rd, td = 1.0 / (r + eps), 1.0 / (t + eps)
    return {
        "mse": float(np.mean((r - t) ** 2)),
        "absrel": absrel(rd, td),
        "delta1": delta1(rd, td),
    }
