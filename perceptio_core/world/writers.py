"""The writers of the world's datasets, each in its public on-disk layout (the list of files is in
:mod:`perceptio_core.world.synth`), and the helpers they write with.

- :func:`coco_part`: COCO train2014 images, instances and captions, and the REFER trees.
  Segmentations are polygons for most objects, compressed RLE where a polygon cannot represent the
  visible part (holes left by an occluder, IoU of the polygon with the mask below 0.9) and,
  deterministically, for every annotation whose id is a multiple of 13; a crowd is one
  ``iscrowd: 1`` annotation with uncompressed RLE, as in COCO. Each annotation also carries an
  ``attributes`` dict (colour, shape, size class, centre depth in metres, visible centroid, visible
  fraction), an extra key that COCO and REFER readers ignore. The REFER pickles (protocol 2) are
  lists of dicts with exactly REFER's keys. Splits are by image: unc train/val/testA/testB (one
  split assignment shared by RefCOCO and RefCOCO+, as in the real data; testA/testB are a random
  half each of the test images, the world having no people/objects distinction), umd
  train/val/test. One partition of the images serves all three (10 % val, 20 % test; umd's test =
  unc's testA + testB), so no image is used for training by one dataset and held out by another.
  Crowd objects and objects less than 30 % visible get no refs.
- :func:`ade_part`: ADE20k SceneParsing images, class-index PNGs and ``objectInfo150.csv`` listing
  the world's 7 classes (:data:`ADE_CLASSES`).
- :func:`hardblink_part`: 3, 4 and 5 points per image drawn as the public set draws them (by
  :mod:`perceptio_core.data.markers`), in AURORA's public layout (:mod:`perceptio_core.data.hardblink`):
  ``HardBLINK/questions/blink_{N}pointscenter_questions.jsonl`` (``question_id`` 0, 1, ...,
  ``image`` the PNG's file name, ``text`` SPEC §6's question then ``Select from the following
  choices.`` and one ``(A) A`` line per option, ``category`` ``"Relative_Depth"``),
  ``HardBLINK/answers/blink_{N}pointscenter_answers.jsonl`` (``"(B)"``) and the images in
  ``HardBLINK/images/blink{N}pointscenter/hardblink_{N}pt_{i:04d}.png`` (file stems unique over the
  world, the key of ``depth/``, where the public set names them ``<i>.png``). The points, which the
  public release does not publish, go to the world's own
  ``HardBLINK/points/blink_{N}pointscenter_points.jsonl`` (``question_id``, ``points`` [[x, y], ...]
  in label order, ``labels``, ``point_depths`` in metres). The closest point has the smallest true
  depth. Points are
  at least :func:`hardblink_min_separation` apart: ``max(20 * min(W, H) / 336, 2 * circle radius +
  2 * gap + label box width)`` pixels, the public 20 px at 336 px, scaled, but never so close that
  a label box covers another point's circle. Images are PNG so the 1-pixel markers stay crisp.
- :func:`vqa_part`: MMBench-format multiple-choice VQA (base64 JPEG inline) on scenes of its own,
  split by scene into "train" (even scenes) and "dev" (odd scenes), and the train questions again
  as LLaVA-1.5 instruction data: ``{"id", "image", "conversations": [{"from": "human", "value":
  "<image>\\n" + the MMBench prompt}, {"from": "gpt", "value": the letter}]}``, the multiple-choice
  form LLaVA-1.5's mix uses (its A-OKVQA part). Dev questions are never in it.
- :func:`write_gcg` (run by :func:`~perceptio_core.world.synth.generate_world` after the other
  parts, into ``glamm/``): GLaMM GranD-f-style grounded captions (GCG) of the world's REFER
  training images, one phrase per object, each grounded by its own mask.

Each part writes under ``root``, advances ``bar`` (a tqdm bar) once per scene and returns its counts
for ``WORLD.json``; it also writes the true depth of its images (``depth/<image file stem>.npy``).
Each item draws from its own ``numpy.random.Generator`` seeded by ``(seed, kind, index...)``; JPEGs
are written with fixed quality and no metadata; JSON and pickles have no timestamps.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio_core.config import SynthConfig
from perceptio_core.data import hardblink as hardblink_layout
from perceptio_core.data.markers import MarkerStyle, draw_markers
from perceptio_core.data.masks import encode_mask, mask_to_polygons, mask_to_uncompressed_rle
from perceptio_core.data.refer import decode_rle
from perceptio_core.format.prompts import format_mc_prompt, hardblink_text
from perceptio_core.world.expressions import (
    MME_SUBTASKS,
    candidates,
    captions,
    dress,
    mme_questions,
    sentence,
    vqa_questions,
)
from perceptio_core.world.render import (
    LABEL_GROUND,
    LABEL_OBJECT0,
    LABEL_SKY,
    LABEL_WALL,
    SHAPES,
    Render,
    Scene,
    render,
)
from perceptio_core.world.scenes import COLOURS, Entity, entities, min_ann_pixels, sample_scene

JPEG_QUALITY = 90

CATEGORIES: list[dict[str, Any]] = [
    {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)
]
CATEGORY_ID: dict[str, int] = {c["name"]: c["id"] for c in CATEGORIES}

REFER_TREES = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))
_REF_MIN_VISIBLE = 0.3  # a ref target shows at least 30 % of its silhouette

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

HARDBLINK_COUNTS = (3, 4, 5)
HARDBLINK_CATEGORY = "Relative_Depth"  # BLINK's task the set extends

# seeds of the per-item generators: (cfg.seed, kind, index...)
_K_COCO, _K_ADE, _K_HB, _K_VQA, _K_SPLIT, _K_REFS, _K_CAPTION, _K_MME, _K_LLAVA = 1, 2, 3, 4, 5, 6, 7, 8, 9


class WorldError(RuntimeError):
    """A world cannot be made: the output directory exists and is not one, or the scenes keep
    failing a part's checks (HardBLINK points, VQA questions)."""


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
# COCO instances, captions and the REFER trees
# --------------------------------------------------------------------------------------------


def _annotate(scene: Scene, r: Render, image_id: int, next_ann: int,
              ents: list[Entity]) -> list[dict[str, Any]]:
    """COCO annotations of one rendered scene (see the module docstring for the encodings)."""
    from pycocotools import mask as mask_utils

    cam = scene.camera
    h, w = cam.height, cam.width
    min_px = min_ann_pixels(w, h)
    anns: list[dict[str, Any]] = []
    groups: dict[int, list[Entity]] = {}
    items: list[tuple[np.ndarray, list[Entity], int]] = []
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


def coco_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
    """COCO images, instances, captions, REFER trees and depth."""
    w, h = cfg.width, cfg.height
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    caption_anns: list[dict[str, Any]] = []
    scene_ents: dict[int, list[Entity]] = {}
    img_anns: dict[int, list[dict[str, Any]]] = {}
    next_ann = 1
    for i in range(cfg.images):
        image_id = i + 1
        rng = np.random.default_rng([cfg.seed, _K_COCO, i])
        scene = sample_scene(rng, w, h, 2, 6, crowd=(i % 6 == 1) or bool(rng.random() < 0.08))
        r = render(scene, rng)
        fname = f"COCO_train2014_{image_id:012d}.jpg"
        _save_jpeg(root / "images" / "train2014" / fname, r.image)
        _save_depth(root, Path(fname).stem, r.depth)
        images.append({"license": 1, "file_name": fname, "coco_url": "", "height": h, "width": w,
                       "date_captured": "2014-01-01 00:00:00", "flickr_url": "", "id": image_id})
        ents = entities(scene, r)
        these = _annotate(scene, r, image_id, next_ann, ents)
        next_ann += len(these) + 1
        anns += these
        scene_ents[image_id] = ents
        img_anns[image_id] = these
        crng = np.random.default_rng([cfg.seed, _K_CAPTION, i])
        for text in captions(scene, ents, crng)[: 1 + int(crng.random() < 0.6)]:
            caption_anns.append({"image_id": image_id, "id": len(caption_anns) + 1, "caption": text})
        bar.update(1)
    info = {"description": "Perceptio synthetic world (COCO train2014 layout)", "version": "1.0",
            "year": 2014, "contributor": "perceptio_core.world.synth", "date_created": "2014-01-01"}
    licenses = [{"id": 1, "name": "CC0 synthetic", "url": ""}]
    kept = [{k: v for k, v in a.items() if k != "_k"} for a in anns]
    instances = {"info": info, "licenses": licenses, "images": images, "annotations": kept,
                 "categories": CATEGORIES}
    _write_json(root / "annotations" / "instances_train2014.json", instances)
    _write_json(root / "annotations" / "captions_train2014.json",
                {"info": info, "licenses": licenses, "images": images, "annotations": caption_anns})

    ids = [im["id"] for im in images]
    unc = _split_ids(ids, ["train", "val", "testA", "testB"], [0.1, 0.1, 0.1],
                     np.random.default_rng([cfg.seed, _K_SPLIT, 0]))
    # one partition of the images for all three datasets: umd's test is unc's testA + testB
    umd = {i: {"testA": "test", "testB": "test"}.get(s, s) for i, s in unc.items()}
    min_ref = 2 * min_ann_pixels(w, h)
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
                cands = list(dict.fromkeys(candidates(t, ents, dataset, w, rng)))
                if not cands:
                    continue
                n = min(len(cands), int(rng.integers(1, 4)))
                chosen = [cands[j] for j in sorted(rng.choice(len(cands), n, replace=False))]
                sents = []
                for text in chosen:
                    sents.append(sentence(dress(text, dataset, rng), sent_id))
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
                   "captions": len(caption_anns)})
    return counts


# --------------------------------------------------------------------------------------------
# ADE20k
# --------------------------------------------------------------------------------------------


def ade_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
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
        scene = sample_scene(rng, cfg.width, cfg.height, 2, 6, crowd=bool(rng.random() < 0.1))
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


# --------------------------------------------------------------------------------------------
# HardBLINK
# --------------------------------------------------------------------------------------------


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


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def hardblink_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
    """HardBLINK in AURORA's public layout (:mod:`perceptio_core.data.hardblink`) under
    ``HardBLINK/``: per point count, the marked PNGs, the questions and answers JSONL and the
    world's own points file (not part of the public release), and the unmarked scenes' depth."""
    w, h = cfg.width, cfg.height
    style = MarkerStyle.for_size(w, h)
    min_sep = hardblink_min_separation(w, h)
    hb = root / "HardBLINK"
    total = 0
    for n in HARDBLINK_COUNTS:
        (hb / hardblink_layout.images_dir(n)).mkdir(parents=True, exist_ok=True)
        questions: list[dict[str, Any]] = []
        answers: list[dict[str, Any]] = []
        points: list[dict[str, Any]] = []
        for i in range(cfg.hardblink_per_count):
            attempt = 0
            while True:
                rng = np.random.default_rng([cfg.seed, _K_HB, n, i, attempt])
                scene = sample_scene(rng, w, h, 3, 6, crowd=False)
                r = render(scene, rng)
                pts = _pick_points(r, n, style, min_sep, rng)
                if pts is not None:
                    break
                attempt += 1
                if attempt > 200:
                    raise WorldError(f"could not place {n} HardBLINK points at {w}x{h} in 200 scenes")
            labels = [chr(ord("A") + j) for j in range(n)]
            depths = [float(r.depth[y, x]) for x, y in pts]
            stem = f"hardblink_{n}pt_{i:04d}"  # unique over the world: its depth is depth/<stem>.npy
            marked = draw_markers(r.image, [(float(x), float(y)) for x, y in pts], labels, style)
            _save_png(hb / hardblink_layout.images_dir(n) / f"{stem}.png", marked)
            _save_depth(root, stem, r.depth)
            questions.append({"question_id": i, "image": f"{stem}.png", "text": hardblink_text(labels),
                              "category": HARDBLINK_CATEGORY})
            answers.append({"question_id": i, "text": f"({labels[int(np.argmin(depths))]})"})
            points.append({"question_id": i, "points": [[x, y] for x, y in pts], "labels": labels,
                           "point_depths": [round(v, 4) for v in depths]})
            bar.update(1)
        _write_jsonl(hb / hardblink_layout.questions_file(n), questions)
        _write_jsonl(hb / hardblink_layout.answers_file(n), answers)
        _write_jsonl(hb / hardblink_layout.points_file(n), points)
        total += len(questions)
    return {"hardblink": total}


def hardblink_min_separation(width: int, height: int) -> float:
    """Minimum pixel distance between HardBLINK points at ``width x height`` (module docstring)."""
    style = MarkerStyle.for_size(width, height)
    return max(20.0 * min(width, height) / 336.0,
               float(2 * style.circle_radius + 2 * style.gap + style.box_w))


# --------------------------------------------------------------------------------------------
# MMBench VQA and LLaVA instructions
# --------------------------------------------------------------------------------------------


def vqa_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
    """MMBench-format TSV of multiple-choice questions on scenes of their own, and its train
    scenes as LLaVA-1.5 instruction conversations (:func:`_llava_conversation`: every question of
    the scene, then a yes/no question, as the turns of one conversation), with a text-only
    conversation every :data:`TEXT_ONLY_EVERY` train scenes, as LLaVA-665K mixes in ShareGPT text."""
    rows: list[list[Any]] = []
    llava: list[dict[str, Any]] = []
    llava_images: dict[str, bytes] = {}
    scene_i = 0
    while len(rows) < cfg.vqa_questions:
        rng = np.random.default_rng([cfg.seed, _K_VQA, scene_i])
        scene = sample_scene(rng, cfg.width, cfg.height, 2, 5, crowd=False)
        r = render(scene, rng)
        ents = entities(scene, r)
        min_px = min_ann_pixels(cfg.width, cfg.height)
        clear = len(ents) == len(scene.objects) and all(
            e.visible >= min_px and e.fraction >= 0.5 for e in ents)
        if clear:
            qs = vqa_questions(ents, cfg.width, rng)
            pick = rng.choice(len(qs), min(2, len(qs)), replace=False) if qs else []
            jpeg = _jpeg_bytes(r.image)
            b64 = base64.b64encode(jpeg).decode("ascii")
            split = "train" if scene_i % 2 == 0 else "dev"
            asked = []
            for j in sorted(int(p) for p in pick):
                if len(rows) >= cfg.vqa_questions:
                    break
                q = qs[j]
                asked.append(q)
                opts = q["options"] + [""] * (4 - len(q["options"]))
                rows.append([len(rows), q["question"], "", *opts, q["answer"], q["category"], b64,
                             "perceptio_world", q["l2"], "", split])
            if split == "train" and asked:
                name = f"images/vqa_scene_{scene_i:06d}.jpg"
                llava_images[name] = jpeg
                yes_no = mme_questions(ents, cfg.width, np.random.default_rng([cfg.seed, _K_LLAVA, scene_i]))
                llava.append(_llava_conversation(f"world-vqa-{scene_i}", name, asked, yes_no, rng))
                if len(llava) % (TEXT_ONLY_EVERY + 1) == TEXT_ONLY_EVERY:
                    llava.append(_text_only_conversation(f"world-text-{scene_i}", rng))
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
    return {"vqa": len(rows), "vqa_scenes": scene_i, "llava": len(llava),
            "llava_text_only": sum("image" not in c for c in llava)}


TEXT_ONLY_EVERY = 3  # one text-only LLaVA conversation after every 3 image conversations


def _llava_conversation(conv_id: str, image: str, questions: list[dict[str, Any]],
                        yes_no: dict[str, tuple[str, str]], rng: np.random.Generator) -> dict[str, Any]:
    """One LLaVA-1.5 conversation on an image: each multiple-choice question a turn (the first
    carrying ``<image>``), then one yes/no question of the scene (Yes or No at random)."""
    turns: list[dict[str, str]] = []
    for q in questions:
        prompt = format_mc_prompt(q["question"], dict(zip("ABCD", q["options"])))
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": q["answer"]}]
    if yes_no:
        sub = sorted(yes_no)[int(rng.integers(len(yes_no)))]
        k = int(rng.integers(2))
        turns += [{"from": "human", "value": yes_no[sub][k]}, {"from": "gpt", "value": ("Yes", "No")[k]}]
    turns[0] = {"from": "human", "value": f"<image>\n{turns[0]['value']}"}
    return {"id": conv_id, "image": image, "conversations": turns}


def _text_only_conversation(conv_id: str, rng: np.random.Generator) -> dict[str, Any]:
    """A conversation without an image (LLaVA-665K keeps its text-only ShareGPT samples): two turns
    about the world's vocabulary."""
    shapes = [str(s) for s in rng.permutation(list(SHAPES))]
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    return {"id": conv_id, "conversations": [
        {"from": "human", "value": "Which shapes can the objects in these scenes have?"},
        {"from": "gpt", "value": ", ".join(shapes) + "."},
        {"from": "human", "value": "And which colours?"},
        {"from": "gpt", "value": ", ".join(colours) + "."},
    ]}


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------

MME_DIR = "MME_Benchmark_release_version"


def mme_part(root: Path, cfg: SynthConfig, bar: Any) -> dict[str, int]:
    """MME in its release layout (:mod:`perceptio_core.data.mme`): ``cfg.mme_images`` images for
    each subtask of :data:`~perceptio_core.world.expressions.MME_SUBTASKS`, each on a scene of its
    own, with its pair of yes/no questions (``<subtask>/<stem>.jpg`` + ``<subtask>/<stem>.txt``)."""
    need = {s: cfg.mme_images for s in MME_SUBTASKS}
    scene_i = 0
    while any(need.values()):
        rng = np.random.default_rng([cfg.seed, _K_MME, scene_i])
        scene = sample_scene(rng, cfg.width, cfg.height, 2, 5, crowd=False)
        r = render(scene, rng)
        ents = entities(scene, r)
        min_px = min_ann_pixels(cfg.width, cfg.height)
        if len(ents) == len(scene.objects) and all(e.visible >= min_px and e.fraction >= 0.5 for e in ents):
            pairs = mme_questions(ents, cfg.width, rng)
            open_ = [s for s in MME_SUBTASKS if need[s] and s in pairs]
            if open_:
                sub = max(open_, key=lambda s: need[s])
                i = cfg.mme_images - need[sub]
                folder = root / MME_DIR / sub
                folder.mkdir(parents=True, exist_ok=True)
                stem = f"world_{sub}_{i:04d}"
                (folder / f"{stem}.jpg").write_bytes(_jpeg_bytes(r.image))
                yes, no = pairs[sub]
                (folder / f"{stem}.txt").write_text(f"{yes}\tYes\n{no}\tNo\n")
                need[sub] -= 1
                bar.update(1)
        scene_i += 1
        if scene_i > 50 * cfg.mme_images * len(MME_SUBTASKS) + 100:
            raise WorldError(f"could not generate the MME questions (still needed: {need})")
    return {"mme_images": cfg.mme_images * len(MME_SUBTASKS) if cfg.mme_images else 0}


# --------------------------------------------------------------------------------------------
# GLaMM GranD-f grounded captions (GCG), derived from a written world
# --------------------------------------------------------------------------------------------

GCG_FILE = "GranDf_world_GCG_train.json"


def gcg_caption(objects: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """A grounded caption over ``objects`` = ``[(colour, shape), ...]`` (left to right) and the
    character span of each object's phrase: ``"A red cube, a blue ball and a green cone in the
    scene."`` with spans of ``"A red cube"``, ``"a blue ball"``, ``"a green cone"``."""
    text, spans = "", []
    for i, (color, shape) in enumerate(objects):
        if i:
            text += " and " if i == len(objects) - 1 else ", "
        phrase = f"{'A' if i == 0 else 'a'} {color} {shape}"
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase
    return text + " in the scene.", spans


def write_gcg(world_root: str | Path, out_dir: str | Path, max_objects: int = 4) -> dict[str, int]:
    """GLaMM GranD-f-style GCG data from a generated world's COCO part, in GranD-f's layout:
    ``out_dir/GranDf_world_GCG_train.json``, a list of ``{"file_name", "height", "width",
    "caption", "groundings": {phrase: {"token_positives": [start, end] (character span in the
    caption), "rle_masks": [compressed COCO RLE]}}}``, and the images under ``out_dir/images/``
    (``file_name`` is ``images/<name>``, relative to the JSON's folder, which is where the reader
    looks when ``curate.glamm_image_root`` is unset; GranD-f's own JSON names bare files and its
    image folder is given with ``curate.glamm_image_root``).

    One entry per COCO image of the world's REFER train split (unc) with at least two distinct
    non-crowd objects as large as REFER's (2 x ``min_ann_pixels``): its (at most ``max_objects``)
    largest ones of distinct colour and shape, left to right, each a phrase of :func:`gcg_caption` grounded by its own mask. Deterministic (no randomness); an
    addition beside the world (``WORLD.json`` and the generator's files are untouched).
    """
    from perceptio_core.data.refer import ann_to_mask

    root, out = Path(world_root), Path(out_dir)
    inst = json.loads((root / "annotations" / "instances_train2014.json").read_text())
    with open(root / "refcoco" / "refs(unc).p", "rb") as f:
        train = {r["image_id"] for r in pickle.load(f) if r["split"] == "train"}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in inst["annotations"]:
        im_w, im_h = inst["images"][0]["width"], inst["images"][0]["height"]
        if not a["iscrowd"] and a["area"] >= 2 * min_ann_pixels(im_w, im_h):  # as big as REFER objects
            by_image.setdefault(a["image_id"], []).append(a)
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    for im in sorted(inst["images"], key=lambda x: x["id"]):
        anns = by_image.get(im["id"], [])
        if im["id"] not in train or len(anns) < 2:
            continue
        seen: set[tuple[str, str]] = set()  # one phrase per (colour, shape): phrases are the keys
        distinct = []
        for a in sorted(anns, key=lambda a: (-a["area"], a["id"])):
            look = (a["attributes"]["color"], a["attributes"]["shape"])
            if look not in seen:
                seen.add(look)
                distinct.append(a)
        if len(distinct) < 2:
            continue
        anns = sorted(distinct[:max_objects], key=lambda a: (a["attributes"]["cx"], a["id"]))
        caption, spans = gcg_caption([(a["attributes"]["color"], a["attributes"]["shape"]) for a in anns])
        groundings = {}
        for a, (s, e) in zip(anns, spans):
            mask = ann_to_mask(a["segmentation"], im["height"], im["width"]) > 0
            groundings[caption[s:e]] = {"token_positives": [s, e], "rle_masks": [encode_mask(mask)]}
        (out / "images" / im["file_name"]).write_bytes((root / "images" / "train2014" / im["file_name"]).read_bytes())
        entries.append({"file_name": f"images/{im['file_name']}", "height": im["height"], "width": im["width"],
                        "caption": caption, "groundings": groundings})
    (out / GCG_FILE).write_text(json.dumps(entries, indent=1))
    return {"gcg": len(entries), "gcg_phrases": sum(len(e["groundings"]) for e in entries)}
