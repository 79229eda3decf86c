"""PNG figures for the depth stages (SPEC §2): image | true depth | teacher | reconstruction rows, and
training curves.

Matplotlib's object API on the Agg canvas (no pyplot state, no display). Every figure function takes
``out``: a path or a binary file object (the artifact writer's atomic handle).

Depth is always drawn as relative *inverse* depth, larger = nearer = brighter (``magma``), the
teacher's convention: a [0, 1] map is drawn as it is; a metric depth map (metres) is drawn as its
per-image min-max normalised inverse, so the true depth column is comparable with the teacher's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

CMAP = "magma"


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (loaded, file closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def inverse_depth_display(depth: np.ndarray) -> np.ndarray:
    """Metric depth [H, W] (metres; <= 0 or non-finite = invalid) -> [H, W] in [0, 1]: min-max
    normalised ``1 / depth``, invalid pixels 0."""
    d = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(d) & (d > 0)
    inv = np.zeros_like(d)
    inv[valid] = 1.0 / d[valid]
    if valid.any():
        lo, hi = inv[valid].min(), inv[valid].max()
        inv[valid] = (inv[valid] - lo) / (hi - lo) if hi > lo else 0.0
    return inv.astype(np.float32)


def _as_display(cell: Any, metric: bool | None) -> tuple[np.ndarray | None, bool]:
    """``(array, is_rgb)`` to draw for one cell. A 2-D cell is a [0, 1] inverse-depth map unless it is
    metric depth: ``metric=True``, or ``None`` (auto) and some value lies outside [0, 1]."""
    if cell is None:
        return None, False
    if isinstance(cell, Image.Image):
        return np.asarray(cell.convert("RGB")), True
    a = np.asarray(cell.detach().cpu() if hasattr(cell, "detach") else cell)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return a[..., :3], True
    if a.ndim != 2:
        raise ValueError(f"cannot draw an array of shape {a.shape}")
    a = a.astype(np.float32)
    finite = a[np.isfinite(a)]
    if metric is None:
        metric = finite.size > 0 and (finite.min() < 0.0 or finite.max() > 1.0)
    return (inverse_depth_display(a) if metric else np.clip(np.nan_to_num(a), 0.0, 1.0)), False


def _save(fig: Figure, out: str | os.PathLike | IO[bytes], dpi: int) -> None:
    FigureCanvasAgg(fig)
    if isinstance(out, (str, os.PathLike)):
        fig.savefig(os.fspath(out), format="png", dpi=dpi)
    else:
        fig.savefig(out, format="png", dpi=dpi)


def depth_grid(
    rows: Sequence[Sequence[Any]],
    titles: Sequence[str],
    out: str | os.PathLike | IO[bytes],
    *,
    metric_columns: Sequence[int] | None = None,
    cell_inches: float = 1.8,
    dpi: int = 100,
) -> None:
    """A grid of images and depth maps, one row per sample, one titled column per kind.

    rows: each a sequence of cells, one per title: an RGB image (PIL or [H, W, 3] uint8 / float), a
        2-D depth array ([0, 1] inverse-depth map, or metric depth: see ``metric_columns``), or
        ``None`` (drawn as an empty "n/a" cell).
    metric_columns: indices of columns holding metric depth (drawn as normalised inverse depth);
        ``None``: a 2-D cell with values outside [0, 1] is taken as metric.
    """
    if not rows:
        raise ValueError("depth_grid: no rows")
    ncols = len(titles)
    for r in rows:
        if len(r) != ncols:
            raise ValueError(f"depth_grid: a row has {len(r)} cells for {ncols} titles")
    fig = Figure(figsize=(cell_inches * ncols, cell_inches * 0.85 * len(rows) + 0.3))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for i, row in enumerate(rows):
        cells = [
            _as_display(cell, None if metric_columns is None else (j in metric_columns))
            for j, cell in enumerate(row)
        ]
        # every cell of a row is drawn at the shape of the row's first image (square maps stretched)
        ref = next((a.shape[0] / a.shape[1] for a, rgb in cells if rgb and a is not None), None)
        for j, (arr, rgb) in enumerate(cells):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if arr is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="0.5")
                continue
            aspect = 1.0 if ref is None else ref * arr.shape[1] / arr.shape[0]
            if rgb:
                ax.imshow(arr, aspect=aspect)
            else:
                ax.imshow(arr, cmap=CMAP, vmin=0.0, vmax=1.0, aspect=aspect)
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    fig.tight_layout(pad=0.3)
    _save(fig, out, dpi)


def map_grid(
    maps: Sequence[np.ndarray] | np.ndarray,
    out: str | os.PathLike | IO[bytes],
    *,
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    cell_inches: float = 1.4,
    dpi: int = 100,
) -> None:
    """A plain grid of [0, 1] depth maps (e.g. a batch of teacher maps or decoded tokens)."""
    items = list(maps)
    if not items:
        raise ValueError("map_grid: no maps")
    ncols = max(1, min(ncols, len(items)))
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(cell_inches * ncols, cell_inches * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < len(items):
            arr, _ = _as_display(items[k], None)
            ax.imshow(arr, cmap=CMAP, vmin=0.0, vmax=1.0)
            if titles is not None and k < len(titles):
                ax.set_title(titles[k], fontsize=7)
    fig.tight_layout(pad=0.2)
    _save(fig, out, dpi)


_LOSS_KEYS = ("loss", "mse", "commit", "ssi")


def loss_curves(
    history: Sequence[dict[str, float]],
    out: str | os.PathLike | IO[bytes],
    *,
    title: str = "",
    dpi: int = 100,
) -> None:
    """Training curves from a history (one dict per logged step, with ``step``): losses on a log
    scale on the left, the other numeric series (code usage, perplexity, ...) on the right; ``lr``
    and cumulative counters (``restarts``) are left out."""
    if not history:
        raise ValueError("loss_curves: empty history")
    steps = [h.get("step", i) for i, h in enumerate(history)]
    keys = [k for k in history[0] if k not in ("step", "lr", "restarts")]
    losses = [k for k in keys if any(s in k for s in _LOSS_KEYS)]
    others = [k for k in keys if k not in losses]
    fig = Figure(figsize=(9 if others else 5, 3.2))
    axes = fig.subplots(1, 2 if others else 1, squeeze=False)[0]
    for k in losses:
        vals = np.array([h.get(k, np.nan) for h in history], dtype=float)
        if np.all(vals > 0):
            axes[0].semilogy(steps, vals, label=k)
        else:
            axes[0].plot(steps, vals, label=k)
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[0].set_title(title or "training", fontsize=9)
    if others:
        for k in others:
            axes[1].plot(steps, [h.get(k, np.nan) for h in history], label=k)
        axes[1].set_xlabel("step")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out, dpi)


def mask_overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (40, 220, 60),
                 alpha: float = 0.5) -> np.ndarray:
    """[H, W, 3] uint8 image with ``mask`` [H, W] blended in ``color``."""
    out = image.astype(np.float32).copy()
    m = np.asarray(mask, dtype=bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, dtype=np.float32)
    return out.round().astype(np.uint8)
