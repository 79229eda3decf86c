"""RefCOCO / RefCOCO+ / RefCOCOg in REFER's on-disk format (SPEC §5, the joint perception set).

A REFER dataset folder holds ``instances.json`` (COCO instances: images, annotations, categories)
and ``refs(<split_by>).p``, a pickle of a list of dicts with the keys ``sent_ids, file_name, ann_id,
ref_id, image_id, split, sentences, category_id``; each sentence is ``{tokens, raw, sent_id, sent}``.
The images are COCO train2014 files in a separate folder. :func:`read_refer` turns one such folder
into one :class:`~perceptio_core.data.records.RefRecord` per sentence; every record it cannot use becomes
a :class:`~perceptio_core.data.records.QuarantineEntry` and the rest goes on:

- per ref (all its sentences): ``missing annotation`` (the ann_id is not in instances.json),
  ``missing image`` (not listed, or the file is absent), ``corrupt image: ...``,
  ``image size mismatch: ...``, ``crowd annotation``, ``zero-area mask``, ``malformed mask: ...``,
  ``malformed record: ...`` (a ref without the keys REFER has, an unknown category);
- per sentence: ``empty sentence``.

Crowd annotations: REFER never refers to a crowd annotation (``iscrowd: 1``, a group of objects).
A ref that does is quarantined as ``crowd annotation``, since one expression cannot single out one
object of a group. :func:`ann_to_mask` still decodes crowd RLE (uncompressed, list counts) exactly.

The refs pickle is loaded with :func:`~perceptio_core.data.safe_pickle.safe_load`, which refuses any
global, so a tampered refs file cannot run code.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from perceptio_core.data.image_io import ImageError, ImageValidator
from perceptio_core.data.records import (
    REASON_CROWD,
    REASON_EMPTY_SENTENCE,
    REASON_IMAGE_SIZE,
    REASON_MALFORMED,
    REASON_MALFORMED_MASK,
    REASON_MISSING_ANNOTATION,
    REASON_MISSING_IMAGE,
    REASON_ZERO_AREA,
    read_annotation_json,
    DatasetNotFoundError,
    ImageRecord,
    QuarantineEntry,
    RefRecord,
)
from perceptio_core.data.safe_pickle import safe_load

# The split of each public dataset that the pipeline reads by default.
REFER_SPLIT_BY: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
REF_KEYS = ("ann_id", "ref_id", "image_id", "sentences")


class MaskError(ValueError):
    """A segmentation cannot be decoded (malformed polygon or RLE); the message says how."""


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def rle_string_counts(counts: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths (the inverse of pycocotools'
    ``rleToString``), so a malformed string is caught before pycocotools decodes it."""
    s = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise MaskError("compressed RLE string ends inside a number")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise MaskError(f"compressed RLE string has an invalid character {chr(s[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _check_counts(counts: list[int], height: int, width: int, kind: str) -> None:
    if any((not isinstance(c, (int, np.integer))) or c < 0 for c in counts):
        raise MaskError(f"{kind} RLE has a negative or non-integer count")
    total = int(sum(int(c) for c in counts))
    if total != height * width:
        raise MaskError(f"{kind} RLE counts sum to {total}, not {height}x{width}={height * width}")


def _check_size(seg: dict[str, Any], height: int, width: int) -> None:
    size = seg.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise MaskError(f"RLE size {size!r} is not [height, width]")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise MaskError(f"RLE size {list(size)} does not match the image ({height}x{width})")


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Any COCO segmentation (polygon list, uncompressed RLE with list counts, compressed RLE)
    -> one compressed RLE ``{"size": [h, w], "counts": bytes}`` for pycocotools.

    Polygons with fewer than 3 points are dropped (pycocotools would read a 4-number polygon as a
    box); none left, an odd coordinate count, non-finite coordinates, RLE of the wrong size or
    whose counts do not cover the image raise :class:`MaskError`.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polys = []
        for poly in segmentation:
            if not isinstance(poly, (list, tuple)):
                raise MaskError(f"polygon entry is a {type(poly).__name__}, not a list of coordinates")
            if len(poly) % 2:
                raise MaskError(f"polygon has an odd number of coordinates ({len(poly)})")
            try:
                vals = [float(v) for v in poly]
            except (TypeError, ValueError) as e:
                raise MaskError(f"polygon has a non-numeric coordinate ({e})") from e
            if not all(math.isfinite(v) for v in vals):
                raise MaskError("polygon has a non-finite coordinate")
            if len(vals) >= 6:
                polys.append(vals)
        if not polys:
            raise MaskError("no polygon with at least 3 points")
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        _check_size(segmentation, height, width)
        counts = segmentation["counts"]
        if isinstance(counts, list):
            _check_counts(counts, height, width, "uncompressed")
            return mask_utils.frPyObjects(
                {"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
        if isinstance(counts, (str, bytes)):
            _check_counts(rle_string_counts(counts), height, width, "compressed")
            raw = counts.encode("ascii") if isinstance(counts, str) else counts
            return {"size": [height, width], "counts": raw}
        raise MaskError(f"RLE counts is a {type(counts).__name__}, not a list or a string")
    raise MaskError(f"unsupported segmentation of type {type(segmentation).__name__}")


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """pycocotools' decode of one compressed RLE -> uint8 [H, W] in {0, 1}, without the
    DeprecationWarning its Cython decoder emits under numpy 2 (``__array__`` without ``copy``)."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def ann_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation to a binary mask, uint8 [H, W] with values in {0, 1}.

    Accepts polygons (list of ``[x1, y1, x2, y2, ...]``, merged), uncompressed RLE (dict with list
    counts, as COCO stores crowd annotations) and compressed RLE (dict with string counts).
    Raises :class:`MaskError` for a malformed segmentation (see :func:`segmentation_to_rle`).
    """
    if height <= 0 or width <= 0:
        raise MaskError(f"image size {height}x{width} is not positive")
    return decode_rle(segmentation_to_rle(segmentation, height, width))


# --------------------------------------------------------------------------------------------
# Reading a REFER folder
# --------------------------------------------------------------------------------------------


class ReferResult(NamedTuple):
    """What :func:`read_refer` returns: the sentence records, the images they use, the quarantine."""

    refs: list[RefRecord]
    images: dict[int, ImageRecord]
    quarantine: list[QuarantineEntry]


def refs_path(dataset_dir: str | os.PathLike[str], split_by: str) -> Path:
    """``<dataset_dir>/refs(<split_by>).p``."""
    return Path(dataset_dir) / f"refs({split_by}).p"


def load_refs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A REFER refs pickle as a list of dicts (restricted unpickling). Raises
    :class:`DatasetNotFoundError` for a missing file, ``ValueError`` when it is not a list."""
    p = Path(path)
    if not p.is_file():
        present = sorted(x.name for x in p.parent.glob("refs(*).p")) if p.parent.is_dir() else []
        raise DatasetNotFoundError(
            f"REFER refs pickle not found: {p}" + (f" (present: {', '.join(present)})" if present else ""))
    refs = safe_load(p)
    if not isinstance(refs, list):
        raise ValueError(f"{p}: expected a list of refs, got {type(refs).__name__}")
    return refs


def load_instances(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A COCO instances JSON as a dict with ``images``, ``annotations``, ``categories``.
    Raises :class:`DatasetNotFoundError` for a missing file, ``ValueError`` for a bad one."""
    p = Path(path)
    data = read_annotation_json(p, "COCO instances file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{p}: no '{key}' list (not a COCO instances file)")
    return data


def _sentence_text(sent: Any) -> str:
    if not isinstance(sent, dict):
        return ""
    text = sent.get("sent") or sent.get("raw") or " ".join(sent.get("tokens") or [])
    return str(text).strip()


def read_refer(
    dataset_dir: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    dataset: str | None = None,
    split_by: str | None = None,
    validator: ImageValidator | None = None,
    depth_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> ReferResult:
    """Read one REFER dataset folder into sentence records (module docstring for the checks).

    ``dataset`` defaults to the folder's name, ``split_by`` to :data:`REFER_SPLIT_BY` of it.
    ``images_dir`` holds the COCO images named by instances.json; ``validator`` (shared between
    datasets so each image is checked once) opens, verifies and digests them; ``depth_dir``, when
    given, is searched for ``<image stem>.npy`` true-depth files. Returns a :class:`ReferResult`.
    Raises :class:`DatasetNotFoundError` when the folder, its instances.json or refs pickle is absent.
    """
    from tqdm.auto import tqdm

    ddir = Path(dataset_dir)
    if not ddir.is_dir():
        raise DatasetNotFoundError(f"REFER dataset folder not found: {ddir}")
    name = dataset or ddir.name
    sb = split_by or REFER_SPLIT_BY.get(name)
    if not sb:
        raise ValueError(f"no split_by given for REFER dataset {name!r} (known: {REFER_SPLIT_BY})")
    instances = load_instances(ddir / "instances.json")
    refs = load_refs(refs_path(ddir, sb))
    validator = validator or ImageValidator()
    imgs = {int(im["id"]): im for im in instances["images"] if isinstance(im, dict) and "id" in im}
    anns = {int(a["id"]): a for a in instances["annotations"] if isinstance(a, dict) and "id" in a}
    cats = {int(c["id"]): str(c.get("name", "")) for c in instances["categories"]}
    images_root = Path(images_dir)

    out: list[RefRecord] = []
    used: dict[int, ImageRecord] = {}
    quarantine: list[QuarantineEntry] = []
    mask_ok: dict[int, str | None] = {}  # ann_id -> None (fine) or the reason

    def bad(record: str, reason: str) -> None:
        quarantine.append(QuarantineEntry(name, record, reason))

    for i, ref in enumerate(tqdm(refs, disable=not progress, desc=f"refs {name}", unit="ref")):
        if not isinstance(ref, dict) or any(k not in ref for k in REF_KEYS):
            missing = [k for k in REF_KEYS if not isinstance(ref, dict) or k not in ref]
            bad(f"ref #{i}", f"{REASON_MALFORMED}: missing key(s) {', '.join(missing)}")
            continue
        try:
            ref_id, ann_id, image_id = int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"])
        except (TypeError, ValueError):
            bad(f"ref #{i}", f"{REASON_MALFORMED}: non-integer ref_id/ann_id/image_id")
            continue
        rec = f"ref_id={ref_id} ann_id={ann_id} image_id={image_id}"
        ann = anns.get(ann_id)
        if ann is None:
            bad(rec, REASON_MISSING_ANNOTATION)
            continue
        im = imgs.get(image_id)
        if im is None:
            bad(rec, f"{REASON_MISSING_IMAGE}: image_id {image_id} not in instances.json")
            continue
        file_name = str(im.get("file_name", ""))
        rec = f"{rec} ({file_name})"
        if int(ann.get("iscrowd", 0) or 0):
            bad(rec, REASON_CROWD)
            continue
        path = images_root / file_name
        try:
            info = validator.check(path)
        except ImageError as e:
            bad(rec, e.quarantine_reason)
            continue
        h, w = int(im.get("height", info.height)), int(im.get("width", info.width))
        if (w, h) != (info.width, info.height):
            bad(rec, f"{REASON_IMAGE_SIZE}: instances.json says {w}x{h}, the file is "
                     f"{info.width}x{info.height}")
            continue
        if ann_id not in mask_ok:
            try:
                mask_ok[ann_id] = None if ann_to_mask(ann.get("segmentation"), h, w).any() \
                    else REASON_ZERO_AREA
            except MaskError as e:
                mask_ok[ann_id] = f"{REASON_MALFORMED_MASK}: {e}"
        if mask_ok[ann_id]:
            bad(rec, mask_ok[ann_id])  # type: ignore[arg-type]
            continue
        cat_id = int(ann.get("category_id", ref.get("category_id", -1)))
        if cat_id not in cats:
            bad(rec, f"{REASON_MALFORMED}: unknown category_id {cat_id}")
            continue
        sentences = ref["sentences"] if isinstance(ref["sentences"], list) else []
        if not sentences:
            bad(rec, f"{REASON_MALFORMED}: no sentences")
            continue
        bbox = ann.get("bbox") or [0.0, 0.0, 0.0, 0.0]
        kept = 0
        for j, sent in enumerate(sentences):
            sent_id = int(sent.get("sent_id", j)) if isinstance(sent, dict) else j
            text = _sentence_text(sent)
            if not text:
                bad(f"ref_id={ref_id} sent_id={sent_id} ({file_name})", REASON_EMPTY_SENTENCE)
                continue
            out.append(RefRecord(
                dataset=name,
                split_by=sb,
                ref_id=ref_id,
                sent_id=sent_id,
                ann_id=ann_id,
                image_id=image_id,
                split=str(ref.get("split", "")),
                sentence=text,
                category_id=cat_id,
                category=cats[cat_id],
                bbox=tuple(float(v) for v in bbox),  # type: ignore[arg-type]
                segmentation=ann.get("segmentation"),
                iscrowd=0,
                area=float(ann.get("area", 0.0)),
                attributes=dict(ann.get("attributes") or {}),
            ))
            kept += 1
        if kept and image_id not in used:
            depth = Path(depth_dir) / f"{Path(file_name).stem}.npy" if depth_dir else None
            used[image_id] = ImageRecord(
                image_id=image_id,
                file_name=file_name,
                path=str(path.resolve()),
                width=info.width,
                height=info.height,
                source="coco",
                depth_path=str(depth.resolve()) if depth is not None and depth.is_file() else None,
                digest=info.digest,
            )
    return ReferResult(out, used, quarantine)
