"""The one sample schema every source becomes (SPEC §5), and its WebDataset form.

A :class:`Sample` is what curation writes, training reads and evaluation can compare against:
image bytes (empty for a text-only sample), a conversation of one or more rounds (the first
round's prompt and target in ``prompt`` / ``target``, later rounds in ``rounds``; targets with the
perception block of SPEC §1 where the round has one, written by
:mod:`perceptio_core.format.target`), the plain answer of the first round, the masks as COCO
compressed RLE (one per ``[SEG]`` of the conversation, in the order the ``[SEG]`` tokens appear),
the N depth code indices or None, the source and split, and lineage (``upstream`` artifact keys,
``meta`` with the record ids it came from).

Multi-round conversations (SPEC §5: a REFER image's expressions, a LLaVA conversation): round 1 is
``(prompt, target)``, round i > 1 is ``rounds[i - 2] = {"prompt": ..., "target": ...}``;
:attr:`Sample.turns` lists them all. The depth block appears once, in round 1's target. The image
belongs to the first user turn.

WebDataset form (:func:`to_wds` / :func:`from_wds`): one tar member group per sample,

    <key>.json   UTF-8 JSON of every field but the image (sorted keys, compact: deterministic bytes)
    <key>.<ext>  the image bytes, ``ext`` from the bytes' format: "jpg" (JPEG), "png" or "webp";
                 absent for a text-only sample

Schema version (:data:`SAMPLE_VERSION`) 2: ``masks_rle`` (a list) and ``rounds`` replace version 1's
single ``mask_rle``; :func:`from_wds` still reads version-1 JSON (``mask_rle`` -> a list of zero or
one mask, no later rounds), so shards curated before the change train unchanged.

Keys contain only ``[A-Za-z0-9_+-]`` (webdataset splits a member name at its first dot).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

SAMPLE_VERSION = 2  # 2: masks_rle (list) + rounds; 1: mask_rle (one mask or None)
TASKS = ("refer_seg", "semantic_seg", "depth_cot", "vqa_mc", "instruct", "grounded_conv")
IMAGE_EXTS = ("jpg", "png", "webp")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_+\-]+")


@dataclass
class Sample:
    """One training / evaluation example.

    key: deterministic and unique in a dataset, e.g. ``"refcoco-unc-train-r123-s456"``.
    source: "refcoco", "refcoco+", "refcocog", "ade20k", "depth_cot", "llava", "glamm", ...
    split: normalised split name ("train", "val", "testA", "testB", "test").
    task: one of :data:`TASKS`.
    image_digest: sha256 of the ORIGINAL image file's bytes: the key of its teacher map and depth
        tokens (for drawn-on samples it is still the undrawn image's digest; see ``meta``).
    image: the image file's bytes (the original file, or a re-encoded drawn-on image); ``b""`` for a
        text-only sample (LLaVA conversations without an image; ``image_digest`` is then ``""``).
    prompt: the first round's user text (no image placeholder: the model's chat template adds it).
    target: the first round's target text, perception block first (SPEC §1).
    answer: the plain answer part of ``target``.
    masks_rle: COCO compressed RLEs ``{"size": [h, w], "counts": str}`` at the image's size, one per
        ``[SEG]`` of the conversation's targets, in order; empty when nothing is segmented.
    depth_tokens: N code indices of the image's depth map, or None.
    upstream: artifact keys the sample derives from, e.g. ``{"sources": ..., "tokenize_depth": ...}``.
    meta: record ids and facts (ref_id, ann_id, sentence, category, n_points, ...); JSON-able.
    rounds: the conversation's rounds after the first, ``[{"prompt": str, "target": str}, ...]``.
    """

    key: str
    source: str
    split: str
    task: str
    image_digest: str
    image: bytes
    prompt: str
    target: str
    answer: str
    masks_rle: list[dict[str, Any]] = field(default_factory=list)
    depth_tokens: list[int] | None = None
    upstream: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r} (known: {', '.join(TASKS)})")
        if _KEY_BAD.search(self.key) or not self.key:
            raise ValueError(f"sample key {self.key!r} must match [A-Za-z0-9_+-]+ (see make_key)")
        if self.depth_tokens is not None:
            self.depth_tokens = [int(t) for t in self.depth_tokens]
        if self.masks_rle is None:
            self.masks_rle = []
        elif isinstance(self.masks_rle, dict):
            raise TypeError("masks_rle is a list of RLEs (one per [SEG]); wrap a single mask in a list")
        for r in self.rounds:
            if set(r) != {"prompt", "target"}:
                raise ValueError(f"sample {self.key}: a round is {{'prompt', 'target'}}, got {sorted(r)}")

    @property
    def mask_rle(self) -> dict[str, Any] | None:
        """The first mask (what a one-object sample has), or None."""
        return self.masks_rle[0] if self.masks_rle else None

    @property
    def turns(self) -> list[tuple[str, str]]:
        """Every round as ``(prompt, target)``, the first one first."""
        return [(self.prompt, self.target)] + [(r["prompt"], r["target"]) for r in self.rounds]

    @property
    def has_image(self) -> bool:
        return bool(self.image)

    @property
    def has_mask(self) -> bool:
        return bool(self.masks_rle)

    @property
    def has_depth(self) -> bool:
        return self.depth_tokens is not None


_JSON_FIELDS = tuple(f.name for f in fields(Sample) if f.name != "image")


def make_key(*parts: object) -> str:
    """A sample key from its parts: joined by "-", anything outside ``[A-Za-z0-9_+-]`` -> "_".

    ``make_key("refcoco", "unc", "train", "r123", "s456")`` -> ``"refcoco-unc-train-r123-s456"``.
    """
    return _KEY_BAD.sub("_", "-".join(str(p) for p in parts))


def image_ext(data: bytes) -> str:
    """The WebDataset extension of encoded image bytes, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("image bytes are neither JPEG, PNG nor WebP")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def sample_json(sample: Sample) -> bytes:
    """Every field but the image, as deterministic UTF-8 JSON bytes."""
    d = {name: getattr(sample, name) for name in _JSON_FIELDS}  # shallow: asdict deep-copies (slow)
    return json.dumps(
        d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    ).encode("utf-8")


def to_wds(sample: Sample) -> dict[str, Any]:
    """Sample -> ``{"__key__": key, "json": bytes, "<ext>": image bytes}`` (members in that order;
    no image member for a text-only sample)."""
    item: dict[str, Any] = {"__key__": sample.key, "json": sample_json(sample)}
    if sample.image:
        item[image_ext(sample.image)] = sample.image
    return item


def from_wds(item: dict[str, Any]) -> Sample:
    """Inverse of :func:`to_wds`. ``item["json"]`` may be bytes or already decoded (a dict); the
    image must be undecoded bytes under one of :data:`IMAGE_EXTS` (or "jpeg"), or absent for a
    text-only sample (``image_digest`` empty). Version-1 JSON (``mask_rle``) is read as well."""
    meta = item["json"]
    if isinstance(meta, (bytes, bytearray)):
        meta = json.loads(meta.decode("utf-8"))
    image = None
    for ext in (*IMAGE_EXTS, "jpeg"):
        if ext in item:
            image = item[ext]
            break
    fields = dict(meta)
    if image is None and not fields.get("image_digest"):
        image = b""  # text-only
    if not isinstance(image, (bytes, bytearray)):
        raise ValueError(f"sample {item.get('__key__')!r} has no undecoded image bytes")
    fields["image"] = bytes(image)
    if "mask_rle" in fields:  # version 1
        old = fields.pop("mask_rle")
        fields.setdefault("masks_rle", [old] if old is not None else [])
    return Sample(**fields)
