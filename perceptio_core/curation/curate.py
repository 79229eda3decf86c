"""Sources into samples (SPEC §5 data, §6 HardBLINK-style training data; ARCHITECTURE "curate").

:func:`iter_samples` turns the records the ``sources`` stage resolved into a deterministic stream of
:class:`~perceptio_core.curation.sample.Sample` (nothing is materialised: images are read, masks decoded and
samples built one at a time; teacher maps and depth tokens are looked up by image digest), and
:func:`curate` writes that stream into resumable WebDataset shards with a parquet manifest and a
quarantine table (:mod:`perceptio_core.curation.shards`).

What each source gives (the stream's order is this list's, then record order):

1. **RefCOCO / RefCOCO+ / RefCOCOg** (``task="refer_seg"``), official splits, refs of the splits in
   ``cfg.splits``: one sample per referring expression. Mask: the COCO annotation (polygon or RLE)
   through ``refer.ann_to_mask``, stored as compressed RLE. Depth tokens: the image's. Answer: a
   one-sentence attribute description (:mod:`perceptio_core.curation.describe`). Target:
   ``format_target(True, tokens, answer)``. Filters, in order: empty expression, ambiguity and
   near-duplicates (:mod:`perceptio_core.curation.filters`), optional eval-image overlap, missing depth tokens,
   degenerate masks.
2. **ADE20k** (``semantic_seg``): per image of the kept splits, the present classes by decreasing
   area (degenerate ones dropped), at most ``cfg.ade_max_classes_per_image``; mask = that class's
   pixels; answer a :func:`~perceptio_core.curation.describe.describe_region` sentence; target with [SEG]
   and the depth block.
3. **Depth chain-of-thought** (``depth_cot``; source ``"depth_cot"``): on training images (the
   COCO images of the refer training splits that no refer val/test split uses, i.e. images the
   teacher ran on; ADE20k training images if listed in ``cfg.depth_cot_sources``), ``cfg.depth_cot_per_image`` samples each of 2 to 5 points drawn as
   HardBLINK draws them (``markers.draw_markers``, the function the synthetic HardBLINK set uses),
   at least ``min_point_distance`` px apart (and never closer than a label box needs), every pair
   differing by ``depth_cot_margin`` in teacher depth; the answer is the letter of the LARGEST teacher
   value (relative inverse depth: larger is nearer). The target is the depth block **without
   [SEG]** (a depth-only task: nothing is segmented) then the answer, e.g.
   ``<d_start>...<d_end> (B)``; parse it with ``expect_seg=False``. The image is re-encoded as PNG
   (crisp markers); ``image_digest`` stays the undrawn image's (its depth tokens' key).
   Deterministic: the points of sample ``j`` of an image come from a generator seeded by
   ``(cfg.seed, image digest, j)``.
4. **LLaVA-1.5 instructions** (``instruct``; when ``llava_json`` is given): the public JSON list of
   ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
   ...}]}``; fields read: ``id``, ``image`` (relative to ``cfg.llava_image_root``, default the JSON's
   folder), the FIRST human turn (the ``<image>`` placeholder removed) as prompt and the first gpt
   turn as the answer; text-only target (no perception block). Entries without an image are dropped.
5. **GLaMM grounded conversations** (``grounded_conv``; when ``glamm_json`` is given): the GranD-f
   GCG JSON list (``GranDf_HA_GCG_train.json``, ``OpenPsgGCG_*.json``); fields read: ``file_name``
   (or ``image``), ``caption``, ``groundings`` = ``{phrase: {"token_positives": [start, end],
   "rle_masks": [COCO RLE, ...]}}``. One sample per image: a GCG prompt, target
   ``format_target(True, tokens or None, caption)`` with the mask = the union of every grounded
   phrase's masks (the regions the caption grounds); each phrase's own mask and character span are
   kept in ``meta["groundings"]`` so a multi-[SEG] format can be built later without re-reading.

Descriptions say how near an object is only when a teacher map is given (depth code indices carry
no order). Every drop is counted by reason in :class:`CurateStats` and, through its ``on_drop`` hook,
written to the quarantine table. Records outside the selected splits or over the ADE per-image cap are counted
as ``skipped`` (not bad data, not quarantined). Before any of that, :func:`curate` checks the depth
tokens against the N and K of the codebook they were made with (:func:`check_depth_tokens`):
tokens of another codebook stop the run with an error naming them; they are never dropped one by one.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio_core.config import CurateConfig
from perceptio_core.curation.describe import describe_object, describe_region, nearness, position_phrase
from perceptio_core.curation.filters import (
    REASON_EMPTY_EXPRESSION,
    REASON_NEAR_DUPLICATE,
    NearDuplicateFilter,
    ambiguous_refs,
    degenerate_mask_reason,
    normalize_expression,
)
from perceptio_core.data.masks import decode_mask, encode_mask, mask_centroid, to_compressed, union_rles
from perceptio_core.format.target import format_target
from perceptio_core.format.prompts import HARDBLINK_QUESTION, clean_expression, render_prompt
from perceptio_core.data.refer import MaskError, ann_to_mask
from perceptio_core.data.records import (
    REASON_MALFORMED,
    REASON_MALFORMED_MASK,
    REASON_MISSING_IMAGE,
    ImageRecord,
    QuarantineEntry,
    RefRecord,
    Sources,
    normalise_split,
)
from perceptio_core.data.markers import MarkerStyle, draw_markers
from perceptio_core.atomic_io import bytes_digest
from perceptio_core.curation.sample import Sample, make_key
from perceptio_core.curation.shards import QuarantineLog, ShardInfo, ShardWriter, write_manifest

REASON_NO_DEPTH_TOKENS = "no depth tokens"
REASON_BAD_DEPTH_TOKENS = "bad depth tokens"
REASON_EVAL_OVERLAP = "image in a refer val/test split"
REASON_NO_TEACHER_MAP = "no teacher map"
REASON_NO_POINT_SET = "no clear point set"
REASON_NO_IMAGE_FIELD = "text-only conversation (no image)"
REASON_NO_CONVERSATION = "no human/gpt turn"
REASON_NO_GROUNDINGS = "no groundings"
REASON_BAD_RECORD = REASON_MALFORMED

LETTERS = "ABCDEFGH"


@dataclass
class CurateStats:
    """Counts of kept samples (by source and split, by task), drops by reason (and by source), and
    skips (records not selected, not bad data). ``on_drop`` receives a QuarantineEntry per drop."""

    samples: Counter = field(default_factory=Counter)  # (source, split) -> n
    tasks: Counter = field(default_factory=Counter)  # task -> n
    dropped: Counter = field(default_factory=Counter)  # reason -> n
    dropped_by_source: Counter = field(default_factory=Counter)  # (source, reason) -> n
    skipped: Counter = field(default_factory=Counter)  # reason -> n
    on_drop: Callable[[QuarantineEntry], None] | None = None

    def kept(self, sample: Sample) -> None:
        self.samples[(sample.source, sample.split)] += 1
        self.tasks[sample.task] += 1

    def drop(self, source: str, record: str, reason: str) -> None:
        """Count a drop under its reason's label (the part before ": <detail>"); the quarantine
        entry keeps the full reason."""
        label = reason.split(": ", 1)[0]
        self.dropped[label] += 1
        self.dropped_by_source[(source, label)] += 1
        if self.on_drop is not None:
            self.on_drop(QuarantineEntry(source=source, record=record, reason=reason))

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    @property
    def n_samples(self) -> int:
        return sum(self.samples.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able, sorted."""
        by_source: dict[str, dict[str, int]] = defaultdict(dict)
        for (src, split), n in sorted(self.samples.items()):
            by_source[src][split] = n
        drop_src: dict[str, dict[str, int]] = defaultdict(dict)
        for (src, reason), n in sorted(self.dropped_by_source.items()):
            drop_src[src][reason] = n
        return {
            "samples_total": self.n_samples,
            "samples": dict(by_source),
            "tasks": dict(sorted(self.tasks.items())),
            "dropped_total": sum(self.dropped.values()),
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_by_source": dict(drop_src),
            "skipped": dict(sorted(self.skipped.items())),
        }


# ------------------------------------------------------------------------------------------
# lookups
# ------------------------------------------------------------------------------------------


def _lookup(store: Any, digest: str) -> Any:
    """``store[digest]`` for a dict, a ``DepthMaps`` (``in`` + ``get``) or any Mapping; None if absent."""
    if store is None or not digest:
        return None
    if digest not in store:
        return None
    return store.get(digest) if hasattr(store, "get") else store[digest]


def _tokens(store: Any, digest: str) -> tuple[list[int] | None, str | None]:
    """The image's depth tokens as a list of ints, or (None, drop reason)."""
    arr = _lookup(store, digest)
    if arr is None:
        return None, REASON_NO_DEPTH_TOKENS
    a = np.asarray(arr)
    if a.size == 0 or not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
        return None, REASON_BAD_DEPTH_TOKENS
    return a.reshape(-1).tolist(), None  # a [g, g] grid is read row-major, as SPEC §1 orders it


class DepthTokensMismatch(ValueError):
    """Depth tokens that do not fit the depth codebook: not N codes per image, or codes outside
    [0, K) (tokens of another codebook). The message names where the tokens came from."""


def check_depth_tokens(depth_tokens: Mapping[str, np.ndarray], num_tokens: int, codebook_size: int,
                       source: str) -> None:
    """Every image's depth tokens are ``num_tokens`` (N) integer codes in [0, ``codebook_size``)
    (K), as a [N] or [g, g] array; N and K are the codebook artifact's. Raises
    :class:`DepthTokensMismatch` naming ``source``, how many images fail and the first of them."""
    bad: list[tuple[str, str]] = []
    for digest, arr in depth_tokens.items():
        a = np.asarray(arr)
        if not np.issubdtype(a.dtype, np.integer):
            bad.append((digest, f"dtype {a.dtype}"))
        elif a.size != num_tokens:
            bad.append((digest, f"{a.size} codes"))
        elif a.size and (int(a.min()) < 0 or int(a.max()) >= codebook_size):
            bad.append((digest, f"codes in [{int(a.min())}, {int(a.max())}]"))
    if bad:
        digest, what = bad[0]
        raise DepthTokensMismatch(
            f"{source}: the depth tokens of {len(bad)} of {len(depth_tokens)} images do not fit the codebook "
            f"(N = {num_tokens} codes in [0, {codebook_size}) each); image {digest} has {what}"
        )


def _read_bytes(path: str | os.PathLike[str]) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size  # (w, h)


# ------------------------------------------------------------------------------------------
# 1. RefCOCO / RefCOCO+ / RefCOCOg
# ------------------------------------------------------------------------------------------


def _ref_record_id(r: RefRecord) -> str:
    return f"ref_id={r.ref_id} sent_id={r.sent_id} ann_id={r.ann_id} ({r.dataset} {r.split_by})"


def _ref_samples(
    sources: Sources,
    depth_tokens: Any,
    teacher_maps: Any,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
    eval_images: set[int],
) -> Iterator[Sample]:
    groups: dict[tuple[str, str, int], list[RefRecord]] = defaultdict(list)
    order: list[str] = []
    for r in sources.refs:
        if r.dataset not in order:
            order.append(r.dataset)
        groups[(r.dataset, r.split_by, r.image_id)].append(r)
    keys = sorted(groups, key=lambda k: (order.index(k[0]), k[1], k[2]))
    splits = set(cfg.splits)
    for gkey in keys:
        refs = sorted(groups.pop(gkey), key=lambda r: (r.ref_id, r.sent_id))
        selected = [i for i, r in enumerate(refs) if normalise_split(r.split) in splits]
        stats.skip("split not selected", len(refs) - len(selected))
        if not selected:
            continue
        ambiguous = ambiguous_refs(refs) if cfg.ambiguity_filter else {}
        dedup = NearDuplicateFilter(cfg.dedup_jaccard)
        img: ImageRecord | None = sources.coco_images.get(gkey[2])
        data = _read_bytes(img.path) if img is not None else None
        digest = (img.digest or bytes_digest(data)) if (img is not None and data is not None) else ""
        tokens, token_reason = _tokens(depth_tokens, digest) if data is not None else (None, None)
        tmap = _lookup(teacher_maps, digest)
        ann_cache: dict[int, tuple[dict[str, Any] | None, str | None, np.ndarray | None]] = {}
        for i in selected:
            r = refs[i]
            rid = _ref_record_id(r)
            split = normalise_split(r.split)
            if img is None or data is None:
                stats.drop(r.dataset, rid, REASON_MISSING_IMAGE)
                continue
            if not normalize_expression(r.sentence):
                stats.drop(r.dataset, rid, REASON_EMPTY_EXPRESSION)
                continue
            if i in ambiguous:
                stats.drop(r.dataset, rid, ambiguous[i])
                continue
            if not dedup.keep(r.ann_id, r.sentence):
                stats.drop(r.dataset, rid, REASON_NEAR_DUPLICATE)
                continue
            if cfg.drop_eval_overlap and split == "train" and r.image_id in eval_images:
                stats.drop(r.dataset, rid, REASON_EVAL_OVERLAP)
                continue
            if tokens is None:
                stats.drop(r.dataset, rid, token_reason or REASON_NO_DEPTH_TOKENS)
                continue
            if r.ann_id not in ann_cache:
                try:
                    mask = np.asarray(ann_to_mask(r.segmentation, img.height, img.width), dtype=bool)
                except MaskError as e:
                    ann_cache[r.ann_id] = (None, f"{REASON_MALFORMED_MASK}: {e}", None)
                else:
                    reason = degenerate_mask_reason(
                        int(mask.sum()), img.height, img.width, cfg.min_mask_area, cfg.max_mask_frac
                    )
                    ann_cache[r.ann_id] = (None, reason, None) if reason else (encode_mask(mask), None, mask)
            rle, reason, mask = ann_cache[r.ann_id]
            if reason is not None or rle is None or mask is None:
                stats.drop(r.dataset, rid, reason or "empty mask")
                continue
            cx, cy = mask_centroid(mask) or (img.width / 2, img.height / 2)
            distance, teacher_value = None, None
            if tmap is not None:
                teacher_value, distance = nearness(mask, tmap)
            answer = describe_object(
                r.category, r.attributes, position_phrase(cx, cy, img.width, img.height), distance
            )
            key = make_key(r.dataset, r.split_by, split, f"r{r.ref_id}", f"s{r.sent_id}")
            sample = Sample(
                key=key, source=r.dataset, split=split, task="refer_seg", image_digest=digest,
                image=data, prompt=render_prompt("refer_seg", key, expr=clean_expression(r.sentence)),
                target=format_target(True, tokens, answer), answer=answer, mask_rle=rle,
                depth_tokens=tokens, upstream=dict(upstream),
                meta={
                    "ref_id": r.ref_id, "sent_id": r.sent_id, "ann_id": r.ann_id,
                    "image_id": r.image_id, "file_name": img.file_name, "split_by": r.split_by,
                    "split_original": r.split, "sentence": r.sentence, "category": r.category,
                    "category_id": r.category_id, "attributes": r.attributes,
                    "centroid": [round(cx, 2), round(cy, 2)], "distance": distance,
                    "teacher_mean": None if teacher_value is None else round(teacher_value, 4),
                },
            )  # fmt: skip
            stats.kept(sample)
            yield sample


# ------------------------------------------------------------------------------------------
# 2. ADE20k
# ------------------------------------------------------------------------------------------


def _ade_samples(
    sources: Sources,
    class_names: Mapping[int, str],
    depth_tokens: Any,
    teacher_maps: Any,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
) -> Iterator[Sample]:
    splits = set(cfg.splits)
    for rec in sorted(sources.ade, key=lambda a: (a.split, a.image_id)):
        split = normalise_split(rec.split)
        if split not in splits:
            stats.skip("split not selected")
            continue
        rid = f"image_id={rec.image_id} ({Path(rec.image_path).name})"
        data = _read_bytes(rec.image_path)
        if data is None:
            stats.drop("ade20k", rid, REASON_MISSING_IMAGE)
            continue
        digest = rec.digest or bytes_digest(data)
        tokens, reason = _tokens(depth_tokens, digest)
        if tokens is None:
            stats.drop("ade20k", rid, reason or REASON_NO_DEPTH_TOKENS)
            continue
        try:
            with Image.open(rec.annotation_path) as im:
                label = np.asarray(im)
        except OSError as e:
            stats.drop("ade20k", rid, f"unreadable annotation: {type(e).__name__}")
            continue
        h, w = label.shape[:2]
        tmap = _lookup(teacher_maps, digest)
        classes, counts = np.unique(label, return_counts=True)
        area = {int(c): int(n) for c, n in zip(classes, counts) if int(c) != 0}
        kept = 0
        for c in sorted(area, key=lambda c: (-area[c], c)):
            crid = f"{rid} class={c}"
            reason = degenerate_mask_reason(area[c], h, w, cfg.min_mask_area, cfg.max_mask_frac)
            if reason is not None:
                stats.drop("ade20k", crid, reason)
                continue
            if kept >= cfg.ade_max_classes_per_image:
                stats.skip("over ADE per-image class cap")
                continue
            name = class_names.get(c)
            if not name:
                stats.drop("ade20k", crid, "unknown class index")
                continue
            mask = label == c
            cx, cy = mask_centroid(mask) or (w / 2, h / 2)
            distance = nearness(mask, tmap)[1] if tmap is not None else None
            answer = describe_region(name, area[c] / (h * w), position_phrase(cx, cy, w, h), distance)
            key = make_key("ade20k", split, f"i{rec.image_id}", f"c{c}")
            sample = Sample(
                key=key, source="ade20k", split=split, task="semantic_seg", image_digest=digest,
                image=data, prompt=render_prompt("semantic_seg", key, category=name),
                target=format_target(True, tokens, answer), answer=answer, mask_rle=encode_mask(mask),
                depth_tokens=tokens, upstream=dict(upstream),
                meta={"image_id": rec.image_id, "file_name": Path(rec.image_path).name,
                      "split_original": rec.split, "class_index": c, "category": name,
                      "area_fraction": round(area[c] / (h * w), 4), "distance": distance},
            )  # fmt: skip
            kept += 1
            stats.kept(sample)
            yield sample


# ------------------------------------------------------------------------------------------
# 3. depth chain-of-thought (HardBLINK-style)
# ------------------------------------------------------------------------------------------


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


def _depth_cot_samples(
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
        data = _read_bytes(path)
        if data is None:
            stats.drop("depth_cot", rid, REASON_MISSING_IMAGE)
            continue
        digest = digest or bytes_digest(data)
        tokens, reason = _tokens(depth_tokens, digest)
        if tokens is None:
            stats.drop("depth_cot", rid, reason or REASON_NO_DEPTH_TOKENS)
            continue
        tmap = _lookup(teacher_maps, digest)
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
                image=buf.getvalue(), prompt=render_prompt("depth_cot", key, question=HARDBLINK_QUESTION),
                target=format_target(False, tokens, answer), answer=answer, mask_rle=None,
                depth_tokens=tokens, upstream=dict(upstream),
                meta={"image_id": image_id, "image_source": dataset, "file_name": Path(path).name,
                      "n_points": n, "points": [list(p) for p in pts], "labels": labels,
                      "teacher_values": [round(v, 4) for v in vals], "drawn": True},
            )  # fmt: skip
            stats.kept(sample)
            yield sample


# ------------------------------------------------------------------------------------------
# 4. LLaVA-1.5 and 5. GLaMM (optional)
# ------------------------------------------------------------------------------------------


def _load_json_list(path: str | os.PathLike[str]) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):  # some dumps wrap the list: {"annotations": [...]} or {file: entry}
        data = data.get("annotations") or data.get("data") or [
            {"file_name": k, **v} for k, v in data.items() if isinstance(v, dict)
        ]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def _llava_samples(
    path: str, image_root: str | None, upstream: dict[str, str], stats: CurateStats
) -> Iterator[Sample]:
    root = Path(image_root) if image_root else Path(path).parent
    for idx, entry in enumerate(_load_json_list(path)):
        rid = f"#{idx} id={entry.get('id') if isinstance(entry, dict) else None}"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            stats.drop("llava", rid, REASON_BAD_RECORD)
            continue
        if not entry.get("image"):
            stats.drop("llava", rid, REASON_NO_IMAGE_FIELD)
            continue
        turns = entry["conversations"]
        human = next((t.get("value", "") for t in turns if t.get("from") == "human"), None)
        gpt = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), None)
        if not human or not gpt:
            stats.drop("llava", rid, REASON_NO_CONVERSATION)
            continue
        data = _read_bytes(root / entry["image"])
        if data is None:
            stats.drop("llava", rid, REASON_MISSING_IMAGE)
            continue
        prompt = human.replace("<image>", "").strip()
        key = make_key("llava", idx, str(entry.get("id", "")))
        sample = Sample(
            key=key, source="llava", split="train", task="instruct", image_digest=bytes_digest(data),
            image=data, prompt=render_prompt("instruct", key, question=prompt),
            target=format_target(False, None, gpt), answer=gpt.strip(), upstream=dict(upstream),
            meta={"id": entry.get("id"), "image_path": entry["image"], "turns": len(turns)},
        )  # fmt: skip
        stats.kept(sample)
        yield sample


def _glamm_samples(
    path: str,
    image_root: str | None,
    depth_tokens: Any,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
) -> Iterator[Sample]:
    root = Path(image_root) if image_root else Path(path).parent
    for idx, entry in enumerate(_load_json_list(path)):
        name = (entry.get("file_name") or entry.get("image") or "") if isinstance(entry, dict) else ""
        rid = f"#{idx} {name}"
        caption = entry.get("caption") if isinstance(entry, dict) else None
        groundings = entry.get("groundings") if isinstance(entry, dict) else None
        if not name or not isinstance(caption, str) or not caption.strip():
            stats.drop("glamm", rid, REASON_BAD_RECORD)
            continue
        if not isinstance(groundings, dict) or not groundings:
            stats.drop("glamm", rid, REASON_NO_GROUNDINGS)
            continue
        data = _read_bytes(root / name)
        if data is None:
            stats.drop("glamm", rid, REASON_MISSING_IMAGE)
            continue
        w, h = _image_size(data)
        caption = caption.strip().strip('"').strip()
        phrases: list[dict[str, Any]] = []
        try:
            for phrase, g in groundings.items():
                rles = [to_compressed(r) for r in g.get("rle_masks", [])]
                rles = [r for r in rles if r["size"] == [h, w]]
                if not rles:
                    continue
                phrases.append({"phrase": phrase, "span": list(g.get("token_positives") or []),
                                "mask_rle": union_rles(rles)})  # fmt: skip
        except (KeyError, TypeError, ValueError):
            stats.drop("glamm", rid, REASON_BAD_RECORD)
            continue
        if not phrases:
            stats.drop("glamm", rid, REASON_NO_GROUNDINGS)
            continue
        phrases.sort(key=lambda p: (p["span"][:1] or [0])[0])
        union = union_rles([p["mask_rle"] for p in phrases])
        area = int(decode_mask(union).sum())
        reason = degenerate_mask_reason(area, h, w, cfg.min_mask_area, cfg.max_mask_frac)
        if reason is not None:
            stats.drop("glamm", rid, reason)
            continue
        digest = bytes_digest(data)
        tokens, _ = _tokens(depth_tokens, digest)  # optional here: GLaMM images rarely have a teacher map
        key = make_key("glamm", idx, Path(name).stem)
        sample = Sample(
            key=key, source="glamm", split="train", task="grounded_conv", image_digest=digest,
            image=data, prompt=render_prompt("grounded_conv", key),
            target=format_target(True, tokens, caption), answer=caption, mask_rle=union,
            depth_tokens=tokens, upstream=dict(upstream),
            meta={"file_name": name, "groundings": phrases},
        )  # fmt: skip
        stats.kept(sample)
        yield sample


# ------------------------------------------------------------------------------------------
# the stream and the driver
# ------------------------------------------------------------------------------------------


def iter_samples(
    sources: Sources,
    depth_tokens: Mapping[str, np.ndarray],
    teacher_maps: Mapping[str, np.ndarray] | None,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
    *,
    ade_class_names: Mapping[int, str] | None = None,
    llava_json: str | None = None,
    glamm_json: str | None = None,
) -> Iterator[Sample]:
    """The deterministic sample stream of SPEC §5 (see the module docstring for each source).

    sources: what the ``sources`` stage resolved. depth_tokens: image digest -> int code indices
    [N] (or [g, g], read row-major); teacher_maps: digest -> float [S, S] relative inverse depth in
    [0, 1] (a dict or a :class:`~perceptio_core.depth.maps.DepthMaps`), or None (then descriptions
    carry no distance and no depth chain-of-thought samples are made). upstream: artifact keys
    copied into every sample. stats: filled in as the stream is consumed. ade_class_names: ADE20k
    class index -> name (``objectInfo150.csv``); unset, ``sources.ade_classes``. llava_json /
    glamm_json: optional instruction / grounded-conversation JSON files.
    """
    tasks = set(cfg.tasks)
    eval_images = sources.eval_image_ids()
    if "refer_seg" in tasks and sources.refs:
        yield from _ref_samples(sources, depth_tokens, teacher_maps, cfg, upstream, stats, eval_images)
    if "semantic_seg" in tasks and sources.ade:
        names = ade_class_names if ade_class_names is not None else sources.ade_classes
        yield from _ade_samples(sources, names, depth_tokens, teacher_maps, cfg, upstream, stats)
    if "depth_cot" in tasks:
        if teacher_maps is None:
            stats.skip("depth_cot: no teacher maps given")
        else:
            yield from _depth_cot_samples(sources, depth_tokens, teacher_maps, cfg, upstream, stats, eval_images)
    if "instruct" in tasks and llava_json:
        yield from _llava_samples(llava_json, cfg.llava_image_root, upstream, stats)
    if "grounded_conv" in tasks and glamm_json:
        yield from _glamm_samples(glamm_json, cfg.glamm_image_root, depth_tokens, cfg, upstream, stats)


@dataclass
class CurateResult:
    """What :func:`curate` wrote into ``out_dir``: the shards (in order), the manifest and the
    quarantine parquet files, the stats (``CurateStats.to_dict()``) and how many samples were
    written now vs found in complete shards of an earlier (killed) run."""

    out_dir: str
    shards: list[ShardInfo]
    manifest: str
    quarantine: str
    stats: dict[str, Any]
    n_samples: int
    n_resumed: int
    n_quarantined: int

    def shard_paths(self) -> list[str]:
        """Shard paths in order (for ``read_shards`` / training)."""
        return [str(Path(self.out_dir) / s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for the artifact manifest (shards with sizes and sha256)."""
        return {
            "out_dir": self.out_dir,
            "shards": [{"name": s.name, "n_samples": s.n_samples, "bytes": s.n_bytes, "sha256": s.sha256}
                       for s in self.shards],
            "manifest": self.manifest,
            "quarantine": self.quarantine,
            "n_samples": self.n_samples,
            "n_resumed": self.n_resumed,
            "n_quarantined": self.n_quarantined,
            "stats": self.stats,
        }  # fmt: skip


def curate(
    sources: Sources,
    depth_tokens: Mapping[str, np.ndarray],
    teacher_maps: Mapping[str, np.ndarray] | None,
    cfg: CurateConfig,
    upstream: dict[str, str],
    out_dir: str | os.PathLike[str],
    *,
    ade_class_names: Mapping[int, str] | None = None,
    llava_json: str | None = None,
    glamm_json: str | None = None,
    num_tokens: int,
    codebook_size: int,
    tokens_source: str,
    prefix: str = "samples",
    verify_resume: bool = True,
) -> CurateResult:
    """Curate the sources into ``out_dir``: shards ``{prefix}-%06d.tar`` (+ ``.idx.json``),
    ``quarantine.parquet`` (the readers' quarantine then every curation drop) and, last,
    ``manifest.parquet``. Resumes a killed run in the same directory (see
    :class:`~perceptio_core.curation.shards.ShardWriter`); the result is byte-identical to an uninterrupted
    run. Arguments as :func:`iter_samples`; first, :func:`check_depth_tokens` refuses
    ``depth_tokens`` (named ``tokens_source`` in the error) unless each image has ``num_tokens`` (N)
    codes below ``codebook_size`` (K), the codebook artifact's."""
    check_depth_tokens(depth_tokens, num_tokens, codebook_size, tokens_source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.parquet").unlink(missing_ok=True)
    stats = CurateStats()
    with QuarantineLog(out / "quarantine.parquet") as qlog:
        for q in sources.quarantine:
            qlog.add(q)
        stats.on_drop = qlog.add
        with ShardWriter(out, prefix, cfg.shard_max_bytes, cfg.shard_max_samples, verify_resume) as writer:
            n_resumed = writer.resume_count
            for sample in iter_samples(
                sources, depth_tokens, teacher_maps, cfg, upstream, stats,
                ade_class_names=ade_class_names, llava_json=llava_json, glamm_json=glamm_json,
            ):  # fmt: skip
                writer.write(sample)
        shards = writer.close()
        n_quarantined = qlog.n_rows
    manifest = write_manifest(out, shards, prefix)
    stats.on_drop = None
    return CurateResult(
        out_dir=str(out), shards=shards, manifest=str(manifest), quarantine=str(out / "quarantine.parquet"),
        stats=stats.to_dict(), n_samples=sum(s.n_samples for s in shards), n_resumed=n_resumed,
        n_quarantined=n_quarantined,
    )  # fmt: skip

