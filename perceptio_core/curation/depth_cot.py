"""Depth chain-of-thought samples (SPEC §6's HardBLINK-style training data; item 3 of
:mod:`perceptio_core.curation.curate`): points drawn on training images as HardBLINK draws them,
the answer the letter of the point the teacher puts nearest, the target the depth block then the
answer (no [SEG]).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio_core.config import CurateConfig
from perceptio_core.format.target import format_target
from perceptio_core.format.prompts import hardblink_text, render_prompt
from perceptio_core.data.records import (
    REASON_MISSING_IMAGE,
    Sources,
    normalise_split,
)
from perceptio_core.data.markers import MarkerStyle, draw_markers
from perceptio_core.atomic_io import bytes_digest
from perceptio_core.curation.sample import Sample, make_key
from perceptio_core.curation.inputs import (
    LETTERS,
    REASON_NO_DEPTH_TOKENS,
    REASON_NO_POINT_SET,
    REASON_NO_TEACHER_MAP,
    CurateStats,
    image_tokens,
    lookup,
    read_bytes,
)


def pick_points(
    teacher_map: np.ndarray,
    width: int,
    height: int,
    n: int,
    min_distance: float,
    margin: float,
    style: MarkerStyle,
    rng: np.random.Generator,
    max_tries: int,
) -> tuple[list[tuple[int, int]], list[float]] | None:
    """``n`` integer pixel points ``(x, y)`` of a ``width`` x ``height`` image whose markers fit
    (``style.fits``), pairwise at least ``min_distance`` apart and whose teacher values (the map
    [S, S] cell under each point) pairwise differ by at least ``margin``; with their teacher values.
    None after ``max_tries`` candidates."""
    tmap = np.asarray(teacher_map, dtype=np.float64)
    s_h, s_w = tmap.shape
    pts: list[tuple[int, int]] = []
    vals: list[float] = []
    for _ in range(max_tries):
        if len(pts) == n:
            break
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if not style.fits(x, y, width, height):
            continue
        if any((x - px) ** 2 + (y - py) ** 2 < min_distance**2 for px, py in pts):
            continue
        v = float(tmap[min(int((y + 0.5) * s_h / height), s_h - 1), min(int((x + 0.5) * s_w / width), s_w - 1)])
        if any(abs(v - pv) < margin for pv in vals):
            continue
        pts.append((x, y))
        vals.append(v)
    return (pts, vals) if len(pts) == n else None


def _depth_cot_images(
    sources: Sources, cfg: CurateConfig, eval_images: set[int]
) -> Iterator[tuple[str, int, str, str]]:
    """(dataset, image_id, path, known digest or "") of the training images depth CoT may use: COCO
    images of refer train splits used by no refer val/test split (the images the teacher ran on,
    ``Sources.depth_images``), then ADE20k training images."""
    if "coco" in cfg.depth_cot_sources:
        for image_id in sorted({r.image_id for r in sources.refs} - eval_images):
            img = sources.coco_images.get(image_id)
            if img is not None:
                yield "coco", image_id, img.path, img.digest
    if "ade20k" in cfg.depth_cot_sources:
        for rec in sorted(sources.ade, key=lambda a: a.image_id):
            if normalise_split(rec.split) == "train":
                yield "ade20k", rec.image_id, rec.image_path, rec.digest


def depth_cot_samples(
    sources: Sources,
    depth_tokens: Any,
    teacher_maps: Any,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
    eval_images: set[int],
) -> Iterator[Sample]:
    for dataset, image_id, path, digest in _depth_cot_images(sources, cfg, eval_images):
        rid = f"{dataset} image_id={image_id} ({Path(path).name})"
        data = read_bytes(path)
        if data is None:
            stats.drop("depth_cot", rid, REASON_MISSING_IMAGE)
            continue
        digest = digest or bytes_digest(data)
        tokens, reason = image_tokens(depth_tokens, digest)
        if tokens is None:
            stats.drop("depth_cot", rid, reason or REASON_NO_DEPTH_TOKENS)
            continue
        tmap = lookup(teacher_maps, digest)
        if tmap is None:
            stats.drop("depth_cot", rid, REASON_NO_TEACHER_MAP)
            continue
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        style = MarkerStyle.for_size(w, h)
        # never so close that a label box covers another point's circle (as the synthetic set does)
        min_dist = max(cfg.min_point_distance, float(2 * style.circle_radius + 2 * style.gap + style.box_w))
        for j in range(cfg.depth_cot_per_image):
            rng = np.random.default_rng([cfg.seed, int(digest[:16], 16), j])
            n = int(rng.integers(cfg.depth_cot_min_points, cfg.depth_cot_max_points + 1))
            picked = pick_points(tmap, w, h, n, min_dist, cfg.depth_cot_margin, style, rng, cfg.depth_cot_max_tries)
            if picked is None:
                stats.drop("depth_cot", f"{rid} #{j}", REASON_NO_POINT_SET)
                continue
            pts, vals = picked
            labels = list(LETTERS[:n])
            answer = f"({labels[int(np.argmax(vals))]})"
            drawn = draw_markers(rgb, [(float(x), float(y)) for x, y in pts], labels, style)
            buf = io.BytesIO()
            Image.fromarray(drawn).save(buf, format="PNG")
            key = make_key("depth_cot", dataset, f"i{image_id}", f"n{j}")
            sample = Sample(
                key=key, source="depth_cot", split="train", task="depth_cot", image_digest=digest,
                image=buf.getvalue(), prompt=render_prompt("depth_cot", key, question=hardblink_text(labels)),
                target=format_target(False, tokens, answer), answer=answer, masks_rle=[],
                depth_tokens=tokens, upstream=dict(upstream),
                meta={"image_id": image_id, "image_source": dataset, "file_name": Path(path).name,
                      "n_points": n, "points": [list(p) for p in pts], "labels": labels,
                      "teacher_values": [round(v, 4) for v in vals], "drawn": True},
            )  # fmt: skip
            stats.kept(sample)
            yield sample


