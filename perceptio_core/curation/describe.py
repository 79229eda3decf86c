"""One-sentence attribute descriptions: the answers of the perception samples (SPEC §5).

The paper pairs every referring expression with "a concise, attribute-focused one-sentence
description" of the object. Ours is built deterministically from what the annotations and the
teacher know:

- category and attributes (``RefRecord.attributes``: size, colour, material, then the rest by key);
- position in the image from the mask centroid, by thirds: left / centre / right and
  top / middle / bottom ("in the top left of the image", "on the right side of the image");
- distance from the teacher map (relative inverse depth in [0, 1], larger = nearer): the object's
  mean teacher value against the image's terciles: above the upper one "close to the camera",
  below the lower one "far from the camera", else "at a middle distance from the camera". Depth
  code indices carry no order, so without a teacher map the distance clause is left out.

Example: "A small red cup in the bottom left of the image, close to the camera."
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from perceptio_core.data.masks import resize_nearest

_ATTR_ORDER = ("size", "colour", "color", "material", "shape", "texture", "pattern")


def position_phrase(cx: float, cy: float, width: int, height: int) -> str:
    """Where ``(cx, cy)`` lies in a ``width`` x ``height`` image, by thirds, as a phrase."""
    col = "left" if cx < width / 3 else ("right" if cx >= 2 * width / 3 else "centre")
    row = "top" if cy < height / 3 else ("bottom" if cy >= 2 * height / 3 else "middle")
    if row == "middle" and col == "centre":
        return "in the centre of the image"
    if row == "middle":
        return f"on the {col} side of the image"
    if col == "centre":
        return f"at the {row} of the image"
    return f"in the {row} {col} of the image"


def nearness(mask: np.ndarray, teacher_map: np.ndarray) -> tuple[float, str]:
    """Mean teacher value over ``mask`` [H, W] (bool, image size) and its label "near" / "middle" /
    "far" against the terciles of ``teacher_map`` [S, S] (relative inverse depth, larger = nearer).

    The map is compared at its own resolution: the mask is resized to it (nearest neighbour); when
    the object vanishes at that size its pixels are read at the map's nearest cells instead.
    """
    tmap = np.asarray(teacher_map, dtype=np.float64)
    small = resize_nearest(np.asarray(mask, dtype=bool), *tmap.shape)
    if small.any():
        value = float(tmap[small].mean())
    else:
        ys, xs = np.nonzero(mask)
        rows = np.minimum((ys * tmap.shape[0]) // mask.shape[0], tmap.shape[0] - 1)
        cols = np.minimum((xs * tmap.shape[1]) // mask.shape[1], tmap.shape[1] - 1)
        value = float(tmap[rows, cols].mean()) if ys.size else float(tmap.mean())
    lo, hi = np.quantile(tmap, [1 / 3, 2 / 3])
    label = "near" if value > hi else ("far" if value < lo else "middle")
    return value, label


DISTANCE_PHRASES = {
    "near": "close to the camera",
    "middle": "at a middle distance from the camera",
    "far": "far from the camera",
}


def attribute_words(attributes: Mapping[str, Any], category: str = "") -> list[str]:
    """Printable attribute values in a fixed order (size, colour, material, shape, ..., then the
    remaining keys alphabetically). Non-text values (a centroid, a depth) are skipped, and so is a
    value that merely repeats the category ("ball" for a ball)."""
    keys = [k for k in _ATTR_ORDER if k in attributes]
    keys += sorted(k for k in attributes if k not in _ATTR_ORDER)
    cat = category.strip().lower()
    words: list[str] = []
    for k in keys:
        v = attributes[k]
        if not isinstance(v, str):
            continue
        v = v.strip().lower()
        if v and v != cat and v not in words:
            words.append(v)
    return words


def _with_article(phrase: str) -> str:
    return ("An " if phrase[:1].lower() in "aeiou" else "A ") + phrase


def describe_object(
    category: str,
    attributes: Mapping[str, Any],
    position: str | None,
    distance: str | None,
) -> str:
    """"A small red cup in the bottom left of the image, close to the camera."

    ``position``: a :func:`position_phrase`; ``distance``: "near" / "middle" / "far" or None.
    """
    noun = " ".join([*attribute_words(attributes, category), category.strip().lower()])
    text = _with_article(noun)
    if position:
        text += f" {position}"
    if distance:
        text += f", {DISTANCE_PHRASES[distance]}"
    return text + "."


def describe_region(category: str, fraction: float, position: str | None, distance: str | None) -> str:
    """Semantic-segmentation answer: "The wall covers about 23% of the image, mostly at the top of
    the image, far from the camera." ``fraction`` is the class's share of the image pixels."""
    pct = max(1, int(round(100 * fraction)))
    text = f"The {category.strip().lower()} covers about {pct}% of the image"
    if position:
        text += f", mostly {position}"
    if distance:
        text += f", {DISTANCE_PHRASES[distance]}"
    return text + "."
