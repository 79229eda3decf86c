"""HardBLINK's point markers (SPEC §6): a red circle outline around each point and its letter, white
on a black box beside it, drawn from a 5x7 bitmap font so no font file (and no platform-dependent
glyph) is involved. The synthetic HardBLINK set and the depth chain-of-thought samples of curation
draw their points with the same :func:`draw_markers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# 5x7 glyphs, one string per row, '#' = ink.
_FONT = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
}
GLYPH_W, GLYPH_H = 5, 7


def glyph(letter: str) -> np.ndarray:
    """The 5x7 bitmap of ``letter`` (A-H), bool [7, 5]."""
    rows = _FONT[letter]
    return np.array([[ch == "#" for ch in row] for row in rows], dtype=bool)


@dataclass(frozen=True)
class MarkerStyle:
    """Sizes (pixels) of the HardBLINK markers for one image size."""

    circle_radius: int
    line_width: int
    glyph_scale: int
    gap: int  # between the circle and the label box

    @property
    def box_w(self) -> int:
        return GLYPH_W * self.glyph_scale + 2

    @property
    def box_h(self) -> int:
        return GLYPH_H * self.glyph_scale + 2

    @classmethod
    def for_size(cls, width: int, height: int) -> "MarkerStyle":
        """Scale the public set's look (336 px images) to ``width x height``."""
        s = min(width, height) / 336.0
        return cls(
            circle_radius=max(3, round(9 * s)),
            line_width=max(1, round(2 * s)),
            glyph_scale=max(1, round(2 * s)),
            gap=max(1, round(3 * s)),
        )

    def label_box(self, x: float, y: float, width: int, height: int) -> tuple[int, int]:
        """Top-left corner of the label box of a point at (x, y): right of the circle, else left."""
        cx, cy = int(round(x)), int(round(y))
        bx = cx + self.circle_radius + self.gap
        if bx + self.box_w > width:
            bx = cx - self.circle_radius - self.gap - self.box_w
        by = min(max(cy - self.box_h // 2, 0), height - self.box_h)
        return bx, by

    def fits_many(self, xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> np.ndarray:
        """Vectorised :meth:`fits` over point arrays (bool array)."""
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        r = self.circle_radius + self.line_width
        inside = (xs >= r) & (xs < width - r) & (ys >= r) & (ys < height - r)
        right = np.round(xs) + self.circle_radius + self.gap
        left = np.round(xs) - self.circle_radius - self.gap - self.box_w
        bx = np.where(right + self.box_w > width, left, right)
        return inside & (bx >= 0) & (bx + self.box_w <= width)

    def fits(self, x: float, y: float, width: int, height: int) -> bool:
        """Whether the circle and the label box of a point at (x, y) lie inside the image."""
        r = self.circle_radius + self.line_width
        if not (r <= x < width - r and r <= y < height - r):
            return False
        bx, _ = self.label_box(x, y, width, height)
        return 0 <= bx and bx + self.box_w <= width


def draw_markers(image: np.ndarray, points: list[tuple[float, float]], labels: list[str],
                 style: MarkerStyle) -> np.ndarray:
    """Draw each point as the public HardBLINK set does: red circle outline at the point, the
    letter in white on a small black box beside it. ``image`` uint8 [H, W, 3]; returns a copy."""
    out = image.copy()
    h, w = out.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    for (x, y), letter in zip(points, labels):
        dist = np.sqrt((xx + 0.5 - (x + 0.5)) ** 2 + (yy + 0.5 - (y + 0.5)) ** 2)
        ring = np.abs(dist - style.circle_radius) <= style.line_width / 2.0 + 0.25
        out[ring] = (255, 0, 0)
        bx, by = style.label_box(x, y, w, h)
        out[by : by + style.box_h, bx : bx + style.box_w] = 0
        g = np.kron(glyph(letter), np.ones((style.glyph_scale, style.glyph_scale), dtype=bool))
        gy, gx = by + 1, bx + 1
        region = out[gy : gy + g.shape[0], gx : gx + g.shape[1]]
        region[g[: region.shape[0], : region.shape[1]]] = 255
    return out
