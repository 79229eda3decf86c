"""The synthetic world: procedurally rendered scenes written in the datasets' real on-disk formats.

The offline default of the pipeline (ARCHITECTURE "world/sources") stands in for every corpus of
SPEC §5 and §6, so the real loaders run on it unchanged:

- COCO train2014 images (``images/train2014/COCO_train2014_%012d.jpg``) with their instances JSON
  (``annotations/instances_train2014.json``, and a copy as REFER ships it in each of ``refcoco/``,
  ``refcoco+/`` and ``refcocog/`` as ``instances.json``). Segmentations are polygons for most
  objects, compressed RLE where a polygon cannot represent the visible part (holes left by an
  occluder, IoU of the polygon with the mask below 0.9) and, deterministically, for every annotation
  whose id is a multiple of 13; a *crowd* (a cluster of small same-coloured balls or cubes) is one
  ``iscrowd: 1`` annotation with uncompressed RLE, as in COCO. Each annotation also carries an
  ``attributes`` dict (colour, shape, size class, centre depth in metres, visible centroid, visible
  fraction), an extra key that COCO and REFER readers ignore.
- REFER trees (SPEC §5): ``refcoco/refs(unc).p``, ``refcoco+/refs(unc).p``, ``refcocog/refs(umd).p``,
  protocol-2 pickles of a list of dicts with exactly REFER's keys. Splits are by image: unc
  train/val/testA/testB (one split assignment shared by RefCOCO and RefCOCO+, as in the real
  data; testA/testB are a random half each of the test images, the world having no people/objects
  distinction), umd train/val/test. One partition of the images serves all three (10 % val, 20 %
  test; umd's test = unc's testA + testB), so no image is used for training by one dataset and
  held out by another. Every expression singles out one object among everything visible
  in the image, crowd members included:
  RefCOCO uses colour, shape, left/right and nearest/farthest in short phrases; RefCOCO+ uses no
  location words at all (colour, shape and physical size: "big"/"small"); RefCOCOg uses longer
  sentences that always name colour and shape, with a true relation to a landmark object or a
  location clause. Crowd objects and objects less than 30 % visible get no refs.
- ADE20k SceneParsing layout (``ADEChallengeData2016/``) with class-index PNGs and
  ``objectInfo150.csv`` listing the world's 7 classes.
- A HardBLINK-style set (SPEC §6) under ``HardBLINK/``: 3, 4 and 5 points per image drawn as the
  public set draws them, ``HardBLINK/annotations.json``; the closest point has the smallest true
  depth. Points are at least ``max(20 * min(W, H) / 336, 2 * circle radius + 2 * gap + label box
  width)`` pixels apart: the public 20 px at 336 px, scaled, but never so close that a label box
  covers another point's circle. Images are PNG so the 1-pixel markers stay crisp.
- MMBench-format multiple-choice VQA (``vqa/mmbench_world.tsv``, base64 JPEG inline) on separate
  scenes, split by scene into "train" (even scenes) and "dev" (odd scenes).
- The "train" questions again as LLaVA-1.5 instruction data (``llava/llava_world.json``, images in
  ``llava/images/``): ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\n" +
  the MMBench prompt}, {"from": "gpt", "value": the letter}]}``, the multiple-choice form LLaVA-1.5's
  mix uses (its A-OKVQA part). Dev questions are never in it.
- COCO captions (``annotations/captions_train2014.json``), one or two per COCO image.
- True depth of every COCO, ADE20k and HardBLINK image: ``depth/<image file stem>.npy``, float32
  metres, [H, W].

Determinism: every image draws from its own ``numpy.random.Generator`` seeded by
``(seed, kind, index)``; JPEGs are written with fixed quality and no metadata; JSON and pickles
have no timestamps. The same config gives byte-identical files.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio_core.config import SynthConfig
from perceptio_core.format.prompts import format_mc_prompt
from perceptio_core.data.markers import MarkerStyle, draw_markers
from perceptio_core.data.masks import encode_mask, mask_to_polygons, mask_to_uncompressed_rle
from perceptio_core.data.refer import decode_rle
from perceptio_core.world.render import (
    GROUND_COLOURS,
    LABEL_GROUND,
    LABEL_OBJECT0,
    LABEL_SKY,
    LABEL_WALL,
    PALETTE,
    SHAPES,
    SKY_DEPTH,
    WALL_COLOURS,
    Camera,
    Render,
    Scene,
    SceneObject,
    render,
)

GENERATOR_VERSION = "2"  # 2: llava/llava_world.json
WORLD_FILE = "WORLD.json"
JPEG_QUALITY = 90

COLOURS: tuple[str, ...] = tuple(PALETTE)
CATEGORIES: list[dict[str, Any]] = [
    {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)
]
CATEGORY_ID: dict[str, int] = {c["name"]: c["id"] for c in CATEGORIES}
# words an expression may use for each shape (the first is the category name)
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "ball": ("ball", "sphere"),
    "box": ("box", "cube", "block"),
    "cylinder": ("cylinder",),
    "cone": ("cone",),
}
_PLURAL = {"box": "boxes"}

# ADE20k-style classes of the world (index 0 = other / unlabelled)
ADE_CLASSES: list[tuple[int, str]] = [
    (1, "wall"),
    (2, "sky"),
    (3, "floor;ground"),
    (4, "ball;sphere"),
    (5, "box;cube"),
    (6, "cylinder"),
    (7, "cone"),
]
_ADE_SHAPE_CLASS = {"ball": 4, "box": 5, "cylinder": 6, "cone": 7}

HARDBLINK_QUESTION = (
    "Multiple points are circled on the image, labeled by letters beside each circle. "
    "Which point is the closest to the camera?"
)
HARDBLINK_COUNTS = (3, 4, 5)

REFER_TREES = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))

# seeds of the per-item generators: (cfg.seed, kind, index...)
_K_COCO, _K_ADE, _K_HB, _K_VQA, _K_SPLIT, _K_REFS, _K_CAPTION = 1, 2, 3, 4, 5, 6, 7

_NEAR_RATIO = 1.2  # "nearest"/"farthest"/"in front of"/"behind": depths differ by at least 20 %
_REF_MIN_VISIBLE = 0.3  # a ref target shows at least 30 % of its silhouette


class WorldError(RuntimeError):
    """The output directory cannot hold a world (e.g. it exists and is not one)."""


# --------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------


def _sample_scene(rng: np.random.Generator, width: int, height: int, n_min: int, n_max: int,
                  crowd: bool) -> Scene:
    """A random scene: camera, light, backdrop and ``n_min..n_max`` objects (+ a crowd cluster)."""
    focal = width * float(rng.uniform(0.95, 1.1))
    cam = Camera(width, height, focal, float(rng.uniform(1.4, 1.8)), math.radians(rng.uniform(6, 12)))
    wall_z = float(rng.uniform(16.0, 26.0))
    wall_h = float(rng.uniform(3.0, 7.0))
    lx = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.8))
    light = np.array([lx, rng.uniform(0.6, 1.0), -rng.uniform(0.2, 0.6)])
    light /= np.linalg.norm(light)
    ground = str(rng.choice(list(GROUND_COLOURS)))
    wall = str(rng.choice(list(WALL_COLOURS)))
    z_max = min(15.0, wall_z - 3.0)

    objects: list[SceneObject] = []

    def free(x: float, z: float, r: float) -> bool:
        return all(math.hypot(x - o.x, z - o.z) >= r + o.radius + 0.15 for o in objects)

    def in_view(obj: SceneObject) -> bool:
        u, v, zc = cam.project(np.array([[obj.x, 0.0, obj.z], obj.centre]))
        return bool(zc.min() > 1.0 and 0.06 * width <= u[1] <= 0.94 * width and v[0] <= height - 1)

    n = int(rng.integers(n_min, n_max + 1))
    for _ in range(n):
        for _try in range(60):
            shape = str(rng.choice(SHAPES))
            colour = str(rng.choice(COLOURS))
            large = bool(rng.random() < 0.5)
            radius = float(rng.uniform(0.5, 0.7) if large else rng.uniform(0.26, 0.36))
            z = float(math.exp(rng.uniform(math.log(3.4), math.log(z_max))))
            u = float(rng.uniform(0.08, 0.92)) * width
            x = (u - width / 2.0) / focal * z
            yaw = float(rng.uniform(0.0, math.pi / 2)) if shape == "box" else 0.0
            obj = SceneObject(shape, colour, "large" if large else "small", x, z, radius, yaw)
            if free(x, z, radius) and in_view(obj):
                objects.append(obj)
                break
    if crowd:
        shape = str(rng.choice(["ball", "box"]))
        colour = str(rng.choice(COLOURS))
        for _try in range(40):
            cz = float(rng.uniform(4.0, z_max))
            cx = (float(rng.uniform(0.15, 0.85)) * width - width / 2.0) / focal * cz
            if free(cx, cz, 0.7):
                break
        else:
            cx = cz = None  # no room for a crowd in this scene
        if cx is not None:
            members: list[SceneObject] = []
            size = int(rng.integers(4, 7))
            for _try in range(60):
                if len(members) >= size:
                    break
                r = float(rng.uniform(0.12, 0.17))
                mx, mz = cx + float(rng.uniform(-0.5, 0.5)), cz + float(rng.uniform(-0.5, 0.5))
                yaw = float(rng.uniform(0.0, math.pi / 2)) if shape == "box" else 0.0
                m = SceneObject(shape, colour, "small", mx, mz, r, yaw, group=0)
                if free(mx, mz, r) and in_view(m):
                    objects.append(m)
                    members.append(m)
    return Scene(cam, tuple(objects), (float(light[0]), float(light[1]), float(light[2])), ground,
                 wall, wall_z, wall_h)


@dataclass
class _Entity:
    """What a viewer sees of one object: the basis of expressions, captions and questions."""

    k: int  # index into scene.objects
    shape: str
    color: str
    size: str
    group: int
    visible: int  # visible pixels
    amodal: int  # unoccluded silhouette pixels
    cx: float  # visible centroid (pixels)
    cy: float
    depth: float  # z-depth of the object's centre (metres)

    @property
    def fraction(self) -> float:
        return self.visible / max(self.amodal, 1)


def _entities(scene: Scene, r: Render) -> list[_Entity]:
    """Every object with at least one visible pixel."""
    out: list[_Entity] = []
    if not scene.objects:
        return out
    _, _, depths = scene.camera.project(np.stack([o.centre for o in scene.objects]))
    for k, obj in enumerate(scene.objects):
        ys, xs = np.nonzero(r.label == LABEL_OBJECT0 + k)
        if len(xs) == 0:
            continue
        out.append(_Entity(k, obj.shape, obj.color, obj.size, obj.group, len(xs), r.amodal_pixels[k],
                           float(xs.mean() + 0.5), float(ys.mean() + 0.5), float(depths[k])))
    return out


def _min_ann_pixels(width: int, height: int) -> int:
    """Smallest visible area (pixels) that gets a COCO annotation."""
    return max(8, int(0.0015 * width * height))


# --------------------------------------------------------------------------------------------
# Referring expressions
# --------------------------------------------------------------------------------------------


def _matches(e: _Entity, color: str | None, shape: str | None) -> bool:
    return (color is None or e.color == color) and (shape is None or e.shape == shape)


def _is_extreme(t: _Entity, group: list[_Entity], rel: str, width: int) -> bool:
    """Whether ``t`` is clearly the ``rel`` one (left/right/nearest/farthest/big/small) of ``group``."""
    others = [e for e in group if e is not t]
    if not others:
        return False
    margin = max(3.0, 0.06 * width)
    if rel == "left":
        return all(t.cx + margin <= e.cx for e in others)
    if rel == "right":
        return all(t.cx >= e.cx + margin for e in others)
    if rel == "nearest":
        return all(t.depth * _NEAR_RATIO <= e.depth for e in others)
    if rel == "farthest":
        return all(t.depth >= _NEAR_RATIO * e.depth for e in others)
    if rel == "big":
        return t.size == "large" and all(e.size == "small" for e in others)
    if rel == "small":
        return t.size == "small" and all(e.size == "large" for e in others)
    raise ValueError(rel)


def _relation(t: _Entity, other: _Entity, width: int) -> str | None:
    """A clearly true spatial relation of ``t`` to ``other``, as a phrase, or None."""
    margin = max(3.0, 0.06 * width)
    if t.depth * _NEAR_RATIO <= other.depth:
        return "in front of"
    if t.depth >= _NEAR_RATIO * other.depth:
        return "behind"
    if t.cx + margin <= other.cx:
        return "to the left of"
    if t.cx >= other.cx + margin:
        return "to the right of"
    return None


def _shape_word(shape: str, rng: np.random.Generator) -> str:
    words = SHAPE_WORDS[shape]
    return words[0] if rng.random() < 0.6 else str(rng.choice(words))


def _plural(word: str) -> str:
    return _PLURAL.get(word, word + "s")


_REL_PHRASES = {
    "left": ("left {np}", "{np} on left", "{np} on the left", "leftmost {np}"),
    "right": ("right {np}", "{np} on right", "{np} on the right", "rightmost {np}"),
    "nearest": ("closest {np}", "nearest {np}", "{np} in front", "front {np}"),
    "farthest": ("farthest {np}", "{np} in back", "{np} furthest away", "back {np}"),
    "big": ("big {np}", "large {np}", "the big {np}"),
    "small": ("small {np}", "little {np}", "the small {np}"),
}


def _np_phrase(color: str | None, shape: str | None, rng: np.random.Generator) -> str:
    if color and shape:
        return f"{color} {_shape_word(shape, rng)}"
    if shape:
        return _shape_word(shape, rng)
    if color:
        return f"{color} {rng.choice(['one', 'object', 'thing'])}"
    return str(rng.choice(["object", "one"]))


def _candidates(t: _Entity, ents: list[_Entity], style: str, width: int,
                rng: np.random.Generator) -> list[str]:
    """Every phrasing (in ``style``) that singles out ``t`` among ``ents``."""
    out: list[str] = []
    if style == "refcocog":
        same = [e for e in ents if _matches(e, t.color, t.shape)]
        shape = _shape_word(t.shape, rng)
        if len(same) == 1:
            marks = [e for e in ents if e is not t and e.group < 0
                     and sum(_matches(o, e.color, e.shape) for o in ents) == 1]
            marks.sort(key=lambda e: abs(e.cx - t.cx))
            for m in marks:
                rel = _relation(t, m, width)
                if rel:
                    lw = _shape_word(m.shape, rng)
                    out += [f"a {t.color} {shape} {rel} the {m.color} {lw}",
                            f"the {t.color} {shape} that is {rel} the {m.color} {lw}"]
                    break
            out += [f"the {t.color} {shape} standing on the ground",
                    f"a {t.color} {shape} sitting on the floor of the scene"]
        else:
            pl = _plural(shape)
            for rel, phrases in (
                ("left", (f"the {t.color} {shape} that is on the left side of the picture",
                          f"a {t.color} {shape} which is further left than the other {t.color} {pl}")),
                ("right", (f"the {t.color} {shape} that is on the right side of the picture",
                           f"a {t.color} {shape} which is further right than the other {t.color} {pl}")),
                ("nearest", (f"the {t.color} {shape} that is closest to the camera",
                             f"a {t.color} {shape} nearer to the viewer than the other {t.color} {pl}")),
                ("farthest", (f"the {t.color} {shape} that is farthest from the camera",
                              f"a {t.color} {shape} further away than the other {t.color} {pl}")),
            ):
                if _is_extreme(t, same, rel, width):
                    out += list(phrases)
        return out
    descs = [(t.color, t.shape), (None, t.shape), (t.color, None), (None, None)]
    rels = ("big", "small") if style == "refcoco+" else ("left", "right", "nearest", "farthest")
    for color, shape in descs:
        group = [e for e in ents if _matches(e, color, shape)]
        if len(group) == 1 and (color or shape):
            np_ = _np_phrase(color, shape, rng)
            out += [np_, f"the {np_}"]
        elif len(group) > 1:
            for rel in rels:
                if _is_extreme(t, group, rel, width):
                    tmpl = str(rng.choice(_REL_PHRASES[rel]))
                    out.append(tmpl.format(np=_np_phrase(color, shape, rng)))
    return out


def _sentence(raw: str, sent_id: int) -> dict[str, Any]:
    """A REFER sentence dict: tokens, raw, sent_id, sent."""
    tokens = re.findall(r"[a-z0-9]+", raw.lower())
    return {"tokens": tokens, "raw": raw, "sent_id": sent_id, "sent": " ".join(tokens)}


def _dress(text: str, style: str, rng: np.random.Generator) -> str:
    """Raw text as annotators type it: sometimes capitalised; RefCOCOg sentences end with a stop."""
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    if style == "refcocog":
        text = text[0].upper() + text[1:] + "."
    return text


# --------------------------------------------------------------------------------------------
# Writing helpers
# --------------------------------------------------------------------------------------------


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False)


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def _save_depth(root: Path, stem: str, depth: np.ndarray) -> None:
    path = root / "depth" / f"{stem}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(depth, dtype=np.float32))


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")))


def _split_ids(ids: list[int], names: list[str], fractions: list[float],
               rng: np.random.Generator) -> dict[int, str]:
    """Assign each id a split: ``fractions`` (of the non-first names) rounded, at least one each
    once there are enough ids; the first name takes the rest."""
    order = [ids[i] for i in rng.permutation(len(ids))]
    out: dict[int, str] = {}
    pos = 0
    if len(ids) > 2 * len(fractions):
        for name, frac in zip(names[1:], fractions):
            n = max(1, int(round(frac * len(ids))))
            for i in order[pos : pos + n]:
                out[i] = name
            pos += n
    for i in order[pos:]:
        out[i] = names[0]
    return out


# --------------------------------------------------------------------------------------------
# The parts of the world
# --------------------------------------------------------------------------------------------


def _annotate(scene: Scene, r: Render, image_id: int, next_ann: int,
              ents: list[_Entity]) -> list[dict[str, Any]]:
    """COCO annotations of one rendered scene (see the module docstring for the encodings)."""
    from pycocotools import mask as mask_utils

    cam = scene.camera
    h, w = cam.height, cam.width
    min_px = _min_ann_pixels(w, h)
    anns: list[dict[str, Any]] = []
    groups: dict[int, list[_Entity]] = {}
    items: list[tuple[np.ndarray, list[_Entity], int]] = []
    for e in ents:
        if e.group >= 0:
            groups.setdefault(e.group, []).append(e)
        elif e.visible >= min_px:
            items.append((r.visible_mask(e.k), [e], 0))
    for members in groups.values():
        mask = np.zeros((h, w), np.uint8)
        for e in members:
            mask |= r.visible_mask(e.k)
        if int(mask.sum()) >= min_px:
            items.append((mask, members, 1))
    items.sort(key=lambda it: (it[1][0].cx, it[1][0].k))  # annotation order: left to right
    for mask, members, crowd in items:
        ann_id = next_ann + len(anns)
        if crowd:
            seg: Any = mask_to_uncompressed_rle(mask)
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            polys = mask_to_polygons(mask)
            seg = None
            if polys and ann_id % 13 != 0:
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
                dec = decode_rle(rle)
                inter = float(np.logical_and(dec, mask).sum())
                union = float(np.logical_or(dec, mask).sum())
                if union > 0 and inter / union >= 0.9:
                    seg = polys
            if seg is None:
                seg = encode_mask(mask)
                rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
        area = float(mask_utils.area(rle))
        if area <= 0:
            continue
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        lead = members[0]
        ys, xs = np.nonzero(mask)
        attrs = {
            "color": lead.color,
            "shape": lead.shape,
            "size": lead.size,
            "depth": round(float(np.mean([m.depth for m in members])), 3),
            "cx": round(float(xs.mean() + 0.5), 2),
            "cy": round(float(ys.mean() + 0.5), 2),
            "visible_fraction": round(
                float(sum(m.visible for m in members)) / max(1, sum(m.amodal for m in members)), 3),
        }
        anns.append({
            "id": ann_id,
            "image_id": image_id,
            "category_id": CATEGORY_ID[lead.shape],
            "segmentation": seg,
            "area": area,
            "bbox": bbox,
            "iscrowd": crowd,
            "attributes": attrs,
            "_k": [m.k for m in members],  # removed before writing
        })
    return anns


def _captions(scene: Scene, ents: list[_Entity], rng: np.random.Generator) -> list[str]:
    """One or two captions describing the objects and their layout."""
    singles = sorted([e for e in ents if e.group < 0], key=lambda e: e.cx)
    crowd = [e for e in ents if e.group >= 0]
    parts = [f"a {'small ' if e.size == 'small' and rng.random() < 0.4 else ''}{e.color} "
             f"{_shape_word(e.shape, rng)}" for e in singles]
    if crowd:
        parts.append(f"a group of small {crowd[0].color} {_plural(crowd[0].shape)}")
    if not parts:
        parts = ["nothing but an empty floor"]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caps = [f"{listing[0].upper() + listing[1:]} on a {scene.ground} checkered floor in front of a "
            f"{scene.wall} wall."]
    if len(singles) >= 2 and rng.random() < 0.7:
        near = min(singles, key=lambda e: e.depth)
        far = max(singles, key=lambda e: e.depth)

        def name(e: _Entity) -> str:
            unique = sum(_matches(o, e.color, e.shape) for o in ents) == 1
            return f"{'the' if unique else 'a'} {e.color} {e.shape}"

        if rng.random() < 0.5 and near is not far:
            caps.append(f"{name(near).capitalize()} is closest to the camera and {name(far)} is "
                        "farthest away.")
        else:
            caps.append(f"{name(singles[0]).capitalize()} stands on the left and "
                        f"{name(singles[-1])} on the right.")
    return caps


def _coco_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
    """COCO images, instances, captions, REFER trees and depth."""
    w, h = cfg.width, cfg.height
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    scene_ents: dict[int, list[_Entity]] = {}
    img_anns: dict[int, list[dict[str, Any]]] = {}
    next_ann = 1
    for i in range(cfg.images):
        image_id = i + 1
        rng = np.random.default_rng([cfg.seed, _K_COCO, i])
        scene = _sample_scene(rng, w, h, 2, 6, crowd=(i % 6 == 1) or bool(rng.random() < 0.08))
        r = render(scene, rng)
        fname = f"COCO_train2014_{image_id:012d}.jpg"
        _save_jpeg(root / "images" / "train2014" / fname, r.image)
        _save_depth(root, Path(fname).stem, r.depth)
        images.append({"license": 1, "file_name": fname, "coco_url": "", "height": h, "width": w,
                       "date_captured": "2014-01-01 00:00:00", "flickr_url": "", "id": image_id})
        ents = _entities(scene, r)
        these = _annotate(scene, r, image_id, next_ann, ents)
        next_ann += len(these) + 1
        anns += these
        scene_ents[image_id] = ents
        img_anns[image_id] = these
        crng = np.random.default_rng([cfg.seed, _K_CAPTION, i])
        for text in _captions(scene, ents, crng)[: 1 + int(crng.random() < 0.6)]:
            captions.append({"image_id": image_id, "id": len(captions) + 1, "caption": text})
        bar.update(1)
    info = {"description": "Perceptio synthetic world (COCO train2014 layout)", "version": "1.0",
            "year": 2014, "contributor": "perceptio_core.world.synth", "date_created": "2014-01-01"}
    licenses = [{"id": 1, "name": "CC0 synthetic", "url": ""}]
    kept = [{k: v for k, v in a.items() if k != "_k"} for a in anns]
    instances = {"info": info, "licenses": licenses, "images": images, "annotations": kept,
                 "categories": CATEGORIES}
    _write_json(root / "annotations" / "instances_train2014.json", instances)
    _write_json(root / "annotations" / "captions_train2014.json",
                {"info": info, "licenses": licenses, "images": images, "annotations": captions})

    ids = [im["id"] for im in images]
    unc = _split_ids(ids, ["train", "val", "testA", "testB"], [0.1, 0.1, 0.1],
                     np.random.default_rng([cfg.seed, _K_SPLIT, 0]))
    # one partition of the images for all three datasets: umd's test is unc's testA + testB
    umd = {i: {"testA": "test", "testB": "test"}.get(s, s) for i, s in unc.items()}
    min_ref = 2 * _min_ann_pixels(w, h)
    counts: dict[str, int] = {}
    for di, (dataset, split_by) in enumerate(REFER_TREES):
        refs: list[dict[str, Any]] = []
        sent_id = 0
        splits = unc if split_by == "unc" else umd
        for image_id in ids:
            rng = np.random.default_rng([cfg.seed, _K_REFS, di, image_id])
            ents = scene_ents[image_id]
            by_k = {e.k: e for e in ents}
            for ann in img_anns[image_id]:
                if ann["iscrowd"]:
                    continue
                t = by_k[ann["_k"][0]]
                if t.visible < min_ref or t.fraction < _REF_MIN_VISIBLE:
                    continue
                cands = list(dict.fromkeys(_candidates(t, ents, dataset, w, rng)))
                if not cands:
                    continue
                n = min(len(cands), int(rng.integers(1, 4)))
                chosen = [cands[j] for j in sorted(rng.choice(len(cands), n, replace=False))]
                sents = []
                for text in chosen:
                    sents.append(_sentence(_dress(text, dataset, rng), sent_id))
                    sent_id += 1
                refs.append({
                    "sent_ids": [s["sent_id"] for s in sents],
                    "file_name": f"COCO_train2014_{image_id:012d}_{ann['id']}.jpg",
                    "ann_id": ann["id"],
                    "ref_id": len(refs),
                    "image_id": image_id,
                    "split": splits[image_id],
                    "sentences": sents,
                    "category_id": ann["category_id"],
                })
        tree = root / dataset
        tree.mkdir(parents=True, exist_ok=True)
        with open(tree / f"refs({split_by}).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
        _write_json(tree / "instances.json", instances)
        counts[f"refs.{dataset}"] = len(refs)
        counts[f"sentences.{dataset}"] = sent_id
    counts.update({"coco_images": len(images), "annotations": len(kept),
                   "crowd_annotations": sum(a["iscrowd"] for a in kept),
                   "rle_annotations": sum(isinstance(a["segmentation"], dict) for a in kept),
                   "captions": len(captions)})
    return counts


def _ade_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
    """ADEChallengeData2016 layout: images, class-index PNGs, objectInfo150.csv, depth."""
    ade = root / "ADEChallengeData2016"
    n_val = max(1, int(round(0.2 * cfg.ade_images))) if cfg.ade_images >= 2 else 0
    n_train = cfg.ade_images - n_val
    pixel_counts = np.zeros(len(ADE_CLASSES) + 1, np.int64)
    image_counts = {"training": np.zeros(len(ADE_CLASSES) + 1, np.int64),
                    "validation": np.zeros(len(ADE_CLASSES) + 1, np.int64)}
    for i in range(cfg.ade_images):
        split, num, prefix = (("training", i + 1, "ADE_train") if i < n_train
                              else ("validation", i - n_train + 1, "ADE_val"))
        rng = np.random.default_rng([cfg.seed, _K_ADE, i])
        scene = _sample_scene(rng, cfg.width, cfg.height, 2, 6, crowd=bool(rng.random() < 0.1))
        r = render(scene, rng)
        cls = np.zeros(r.label.shape, np.uint8)
        cls[r.label == LABEL_WALL] = 1
        cls[r.label == LABEL_SKY] = 2
        cls[r.label == LABEL_GROUND] = 3
        for k, obj in enumerate(scene.objects):
            cls[r.label == LABEL_OBJECT0 + k] = _ADE_SHAPE_CLASS[obj.shape]
        stem = f"{prefix}_{num:08d}"
        _save_jpeg(ade / "images" / split / f"{stem}.jpg", r.image)
        _save_png(ade / "annotations" / split / f"{stem}.png", cls)
        _save_depth(root, stem, r.depth)
        binc = np.bincount(cls.reshape(-1), minlength=len(ADE_CLASSES) + 1)
        pixel_counts += binc
        image_counts[split] += binc > 0
        bar.update(1)
    total = max(int(pixel_counts.sum()), 1)
    with open(ade / "objectInfo150.csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["Idx", "Ratio", "Train", "Val", "Name"])
        for idx, name in ADE_CLASSES:
            wr.writerow([idx, f"{pixel_counts[idx] / total:.4f}", int(image_counts["training"][idx]),
                         int(image_counts["validation"][idx]), name])
    return {"ade_training": n_train, "ade_validation": n_val}


def _pick_points(r: Render, n: int, style: MarkerStyle, min_sep: float,
                 rng: np.random.Generator) -> list[tuple[int, int]] | None:
    """``n`` marker points (col, row) on smooth surfaces, ``min_sep`` apart, with clearly
    different true depths (the nearest >= 25 % nearer than the next, each next >= 10 % farther)."""
    h, w = r.depth.shape
    d = r.depth
    pad = np.pad(d, 1, mode="edge")
    win = np.stack([pad[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    lpad = np.pad(r.label, 1, mode="edge")
    lwin = np.stack([lpad[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    smooth = (win.max(0) <= 1.08 * win.min(0)) & (lwin == r.label[None]).all(0) & (r.label != LABEL_SKY)
    ys, xs = np.nonzero(smooth)
    ok = style.fits_many(xs, ys, w, h)
    ys, xs = ys[ok], xs[ok]
    if len(xs) < n:
        return None
    on_obj = r.label[ys, xs] >= LABEL_OBJECT0
    for _attempt in range(30):
        pts: list[tuple[int, int]] = []
        for _try in range(200):
            if len(pts) == n:
                break
            pool = np.flatnonzero(on_obj) if (on_obj.any() and rng.random() < 0.6) else np.arange(len(xs))
            j = int(pool[rng.integers(len(pool))])
            x, y = int(xs[j]), int(ys[j])
            if any(math.hypot(x - px, y - py) < min_sep for px, py in pts):
                continue
            depths = sorted([float(d[py, px]) for px, py in pts] + [float(d[y, x])])
            if len(depths) >= 2:
                if depths[1] < 1.25 * depths[0]:
                    continue
                if any(b < 1.1 * a for a, b in zip(depths[1:], depths[2:])):
                    continue
            pts.append((x, y))
        if len(pts) == n:
            return pts
    return None


def _hardblink_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
    """HardBLINK-style images (3, 4, 5 points), annotations.json, and the unmarked scenes' depth."""
    w, h = cfg.width, cfg.height
    style = MarkerStyle.for_size(w, h)
    min_sep = hardblink_min_separation(w, h)
    records: list[dict[str, Any]] = []
    for n in HARDBLINK_COUNTS:
        for i in range(cfg.hardblink_per_count):
            attempt = 0
            while True:
                rng = np.random.default_rng([cfg.seed, _K_HB, n, i, attempt])
                scene = _sample_scene(rng, w, h, 3, 6, crowd=False)
                r = render(scene, rng)
                pts = _pick_points(r, n, style, min_sep, rng)
                if pts is not None:
                    break
                attempt += 1
                if attempt > 200:
                    raise WorldError(f"could not place {n} HardBLINK points at {w}x{h} in 200 scenes")
            labels = [chr(ord("A") + j) for j in range(n)]
            depths = [float(r.depth[y, x]) for x, y in pts]
            answer = f"({labels[int(np.argmin(depths))]})"
            stem = f"hardblink_{n}pt_{i:04d}"
            marked = draw_markers(r.image, [(float(x), float(y)) for x, y in pts], labels, style)
            _save_png(root / "HardBLINK" / "images" / f"{stem}.png", marked)
            _save_depth(root, stem, r.depth)
            records.append({
                "id": f"{n}pt_{i:04d}",
                "image": f"images/{stem}.png",
                "n_points": n,
                "points": [[x, y] for x, y in pts],
                "labels": labels,
                "question": HARDBLINK_QUESTION,
                "answer": answer,
                "point_depths": [round(v, 4) for v in depths],
            })
            bar.update(1)
    _write_json(root / "HardBLINK" / "annotations.json", records)
    return {"hardblink": len(records)}


def hardblink_min_separation(width: int, height: int) -> float:
    """Minimum pixel distance between HardBLINK points at ``width x height`` (module docstring)."""
    style = MarkerStyle.for_size(width, height)
    return max(20.0 * min(width, height) / 336.0,
               float(2 * style.circle_radius + 2 * style.gap + style.box_w))


def _vqa_questions(ents: list[_Entity], width: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Candidate multiple-choice questions about one scene, answers from the scene truth."""
    out: list[dict[str, Any]] = []
    singles = [e for e in ents if e.group < 0]
    uniq = [e for e in singles if sum(_matches(o, e.color, e.shape) for o in ents) == 1]

    def add(question: str, truth: str, distractors: list[str], category: str, l2: str) -> None:
        opts = [truth] + [d for d in dict.fromkeys(distractors) if d != truth][:3]
        if len(opts) < 2:
            return
        order = rng.permutation(len(opts))
        opts = [opts[j] for j in order]
        out.append({"question": question, "options": opts, "answer": "ABCD"[opts.index(truth)],
                    "category": category, "l2": l2})

    n = len(singles)
    nums = sorted({k for k in range(max(1, n - 3), n + 4) if k != n}, key=lambda k: (abs(k - n), k))
    add("How many objects are there in the image?", str(n), [str(k) for k in nums],
        "object_counting", "coarse_perception")
    colours_here = [e.color for e in singles]
    for shape in SHAPES:
        same = [e for e in singles if e.shape == shape]
        if len(same) == 1:
            others = [c for c in dict.fromkeys(colours_here) if c != same[0].color]
            others += [c for c in rng.permutation(COLOURS) if c not in others]
            add(f"What colour is the {shape}?", same[0].color, others,
                "attribute_recognition", "finegrained_perception (instance-level)")
    for colour in COLOURS:
        same = [e for e in singles if e.color == colour]
        if len(same) == 1:
            add(f"What shape is the {colour} object?", same[0].shape,
                [s for s in rng.permutation(SHAPES)], "attribute_recognition",
                "finegrained_perception (instance-level)")
    if len(uniq) >= 2 and len(uniq) == len(singles):
        for rel, q in (("nearest", "Which object is closest to the camera?"),
                       ("farthest", "Which object is farthest from the camera?")):
            best = [e for e in singles if _is_extreme(e, singles, rel, width)]
            if best:
                add(q, f"the {best[0].color} {best[0].shape}",
                    [f"the {e.color} {e.shape}" for e in rng.permutation(np.array(uniq, dtype=object))
                     if e is not best[0]], "depth_perception", "finegrained_perception (cross-instance)")
    margin = max(3.0, 0.06 * width)
    for ref in uniq:
        left = sorted([e for e in singles if e.cx + margin <= ref.cx], key=lambda e: -e.cx)
        if left and (len(left) == 1 or left[0].cx >= left[1].cx + margin):
            add(f"What colour is the object immediately to the left of the {ref.color} {ref.shape}?",
                left[0].color, [c for c in rng.permutation(COLOURS)], "spatial_relationship",
                "finegrained_perception (cross-instance)")
            break
    return out


def _vqa_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
    """MMBench-format TSV of multiple-choice questions on scenes of their own, and its train
    questions as LLaVA-1.5 instruction conversations."""
    rows: list[list[Any]] = []
    llava: list[dict[str, Any]] = []
    llava_images: dict[str, bytes] = {}
    scene_i = 0
    while len(rows) < cfg.vqa_questions:
        rng = np.random.default_rng([cfg.seed, _K_VQA, scene_i])
        scene = _sample_scene(rng, cfg.width, cfg.height, 2, 5, crowd=False)
        r = render(scene, rng)
        ents = _entities(scene, r)
        min_px = _min_ann_pixels(cfg.width, cfg.height)
        clear = len(ents) == len(scene.objects) and all(
            e.visible >= min_px and e.fraction >= 0.5 for e in ents)
        if clear:
            qs = _vqa_questions(ents, cfg.width, rng)
            pick = rng.choice(len(qs), min(2, len(qs)), replace=False) if qs else []
            jpeg = _jpeg_bytes(r.image)
            b64 = base64.b64encode(jpeg).decode("ascii")
            split = "train" if scene_i % 2 == 0 else "dev"
            for j in sorted(int(p) for p in pick):
                if len(rows) >= cfg.vqa_questions:
                    break
                q = qs[j]
                opts = q["options"] + [""] * (4 - len(q["options"]))
                if split == "train":
                    name = f"images/vqa_scene_{scene_i:06d}.jpg"
                    llava_images[name] = jpeg
                    prompt = format_mc_prompt(q["question"], dict(zip("ABCD", q["options"])))
                    llava.append({"id": f"world-vqa-{len(rows)}", "image": name, "conversations": [
                        {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": q["answer"]}]})
                rows.append([len(rows), q["question"], "", *opts, q["answer"], q["category"], b64,
                             "perceptio_world", q["l2"], "", split])
            bar.update(1)
        scene_i += 1
        if scene_i > 20 * max(cfg.vqa_questions, 1) + 100:
            raise WorldError("could not generate the VQA questions (scenes keep failing the checks)")
    path = root / "vqa" / "mmbench_world.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        wr = csv.writer(f, delimiter="\t", lineterminator="\n")
        wr.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                     "source", "l2-category", "comment", "split"])
        wr.writerows(rows)
    llava_dir = root / "llava"
    (llava_dir / "images").mkdir(parents=True, exist_ok=True)
    for name, data in llava_images.items():
        (llava_dir / name).write_bytes(data)
    (llava_dir / "llava_world.json").write_text(json.dumps(llava, indent=1))
    return {"vqa": len(rows), "vqa_scenes": scene_i, "llava": len(llava)}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _world_header(cfg: SynthConfig) -> dict[str, Any]:
    return {"generator": "perceptio_core.world.synth", "version": GENERATOR_VERSION,
            "config": dataclasses.asdict(cfg)}


def read_world_info(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``WORLD.json`` of a generated world, or None when ``out_dir`` holds none."""
    p = Path(out_dir) / WORLD_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _same_world(info: dict[str, Any] | None, cfg: SynthConfig) -> bool:
    if not info:
        return False
    head = _world_header(cfg)
    return all(info.get(k) == v for k, v in head.items())


def generate_world(out_dir: str | os.PathLike[str], cfg: SynthConfig,
                   progress: bool = False) -> dict[str, Any]:
    """Generate the synthetic world into ``out_dir`` (layout: module docstring); return its
    ``WORLD.json`` content: generator, version, the config used and the counts of every part.

    The world is written into ``<out_dir>.tmp-<pid>`` with ``WORLD.json`` last, then renamed into
    place. If ``out_dir`` already holds a world made from the same config and generator version it
    is returned untouched; a world made from another config is replaced. A non-empty ``out_dir``
    without a ``WORLD.json`` is never touched (:class:`WorldError`). Same config => byte-identical
    files. ``progress`` shows a tqdm bar over the rendered scenes.
    """
    out = Path(out_dir)
    info = read_world_info(out)
    if _same_world(info, cfg):
        return info  # type: ignore[return-value]
    if out.exists() and info is None and (not out.is_dir() or any(out.iterdir())):
        raise WorldError(f"{out} exists and is not a synthetic world (no {WORLD_FILE}); "
                         "refusing to overwrite it")
    cfg.__post_init__()  # the config's own checks (sizes, counts), for configs mutated after init
    from tqdm.auto import tqdm

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    total = cfg.images + cfg.ade_images + len(HARDBLINK_COUNTS) * cfg.hardblink_per_count \
        + (cfg.vqa_questions + 1) // 2
    try:
        with tqdm(total=total, disable=not progress, desc="synth world", unit="scene") as bar:
            counts: dict[str, int] = {}
            counts.update(_coco_part(tmp, cfg, bar))
            counts.update(_ade_part(tmp, cfg, bar))
            counts.update(_hardblink_part(tmp, cfg, bar))
            counts.update(_vqa_part(tmp, cfg, bar))
        result = {**_world_header(cfg), "counts": counts,
                  "sky_depth": SKY_DEPTH, "min_annotation_pixels": _min_ann_pixels(cfg.width, cfg.height),
                  "hardblink_min_separation": hardblink_min_separation(cfg.width, cfg.height)}
        (tmp / WORLD_FILE).write_text(json.dumps(result, indent=1, sort_keys=True))
        old = None
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            # another process finished the same world first: keep theirs when it matches
            if _same_world(read_world_info(out), cfg):
                shutil.rmtree(tmp, ignore_errors=True)
                return read_world_info(out)  # type: ignore[return-value]
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
