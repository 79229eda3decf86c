"""RefCOCO / RefCOCO+ / RefCOCOg in REFER's on-disk format (SPEC §5, the joint perception set).

A REFER dataset folder holds ``instances.json`` (COCO instances: images, annotations, categories)
and ``refs(<split_by>).p``, a pickle of a list of dicts with the keys ``sent_ids, file_name, ann_id,
ref_id, image_id, split, sentences, category_id``; each sentence is ``{tokens, raw, sent_id, sent}``.
The images are COCO train2014 files in a separate folder. :func:`read_refer` turns one such folder
into one :class:`~perceptio_core.data.records.RefRecord` per sentence; every record it cannot use becomes
a :class:`~perceptio_core.data.records.QuarantineEntry` and the rest goes on:

- per ref (all its sentences): ``missing annotation`` (the ann_id is not in instances.json),
  ``missing image`` (not listed, or the file is absent), ``corrupt image: ...`` (also: not a regular
  file), ``too large: ...``, ``path outside the data root: ...`` (an absolute ``file_name`` such as
  ``/dev/zero``, or one whose ``..`` climbs out of the image folder), ``image size mismatch: ...``,
  ``crowd annotation``, ``zero-area mask``, ``malformed mask: ...``, ``malformed record: ...`` (a ref
  without the keys REFER has, an unknown category, a field of the wrong type: a ``ref_id`` of
  ``inf``, an ``iscrowd`` of ``"yes"``, a ``bbox`` that is not 4 numbers; the detail names the file
  and the field);
- per sentence: ``empty sentence``, ``malformed record: ...`` (not an object, a ``sent_id`` that is
  not an integer, ``sent``/``raw`` that are not text, ``tokens`` that are not a list of words),
  ``text too long: ...`` (over :data:`~perceptio_core.data.limits.MAX_SENTENCE_CHARS`), ``invalid
  text: ...`` (a lone surrogate, or a Python 2 byte string that is not UTF-8), ``duplicate record:
  ...`` (a ``(ref_id, sent_id)`` already read: the first is kept);
- per entry of instances.json (an image, annotation or category whose id is not an integer, a
  category name that is not text): ``malformed record: ...``; refs on it then miss it.

No field read from the files is recursed into or printed whole: a sentence nested 200,000 lists deep
is quarantined by its type.

Crowd annotations: REFER never refers to a crowd annotation (``iscrowd: 1``, a group of objects).
A ref that does is quarantined as ``crowd annotation``, since one expression cannot single out one
object of a group. :func:`ann_to_mask` still decodes crowd RLE (uncompressed, list counts) exactly.

The refs pickle is loaded with :func:`~perceptio_core.data.safe_pickle.safe_load`, which refuses any
global, so a tampered refs file cannot run code.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from perceptio_core.data.image_io import ImageError, ImageValidator, confined
from perceptio_core.data.limits import MAX_SENTENCE_CHARS, has_lone_surrogate, too_long
from perceptio_core.data.records import (
    REASON_BAD_TEXT,
    REASON_CROWD,
    REASON_DUPLICATE,
    REASON_EMPTY_SENTENCE,
    REASON_IMAGE_SIZE,
    REASON_MALFORMED,
    REASON_MALFORMED_MASK,
    REASON_MISSING_ANNOTATION,
    REASON_MISSING_IMAGE,
    REASON_OUTSIDE_ROOT,
    REASON_TOO_LONG,
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
        raise MaskError(f"RLE size ({describe(size)}) is not [height, width]")
    if not all(isinstance(v, (int, float, np.integer)) and not isinstance(v, bool) for v in size):
        raise MaskError("RLE size is not two numbers")
    if [size[0], size[1]] != [height, width]:
        raise MaskError(f"RLE size {[size[0], size[1]]} does not match the image ({height}x{width})")


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


class FieldError(ValueError):
    """A field read from a dataset file has the wrong type or value; the message is the quarantine
    reason (``"malformed record: ..."``, ``"invalid text: ..."``, ``"text too long: ..."``)."""


_INT_TEXT = re.compile(r"[+-]?\d{1,18}")


def describe(value: Any) -> str:
    """A short description of an untrusted value for a message: a number or the start of a text
    as it is, anything else by its type only (never a repr of a container: it could be nested
    200,000 deep or hold megabytes)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if -10**18 < value < 10**18 else "an integer of more than 18 digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        head = value[:40].encode("ascii", "backslashreplace").decode("ascii")
        return repr(head) + ("..." if len(value) > 40 else "")
    return f"a {type(value).__name__}"


def as_int(value: Any, what: str) -> int:
    """An integer field: an int, an integral finite float or a decimal string of at most 18 digits;
    else :class:`FieldError` ``"malformed record: <what> is <value>, not an integer"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    raise FieldError(f"{REASON_MALFORMED}: {what} is {describe(value)}, not an integer")


def as_float(value: Any, what: str) -> float:
    """A finite number (an int or a float, or a numeric string of at most 40 characters); else
    :class:`FieldError`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str) and len(value) <= 40:
        try:
            out = float(value)
        except ValueError:
            raise FieldError(f"{REASON_MALFORMED}: {what} is {describe(value)}, not a number") from None
    else:
        raise FieldError(f"{REASON_MALFORMED}: {what} is {describe(value)}, not a number")
    if not math.isfinite(out):
        raise FieldError(f"{REASON_MALFORMED}: {what} is {describe(value)}, not a finite number")
    return out


def as_text(value: Any, what: str, limit: int, limit_name: str) -> str:
    """A text field: a ``str`` of at most ``limit`` characters without lone surrogates; else
    :class:`FieldError` (``malformed record``, ``text too long`` naming the limit, ``invalid text``)."""
    if not isinstance(value, str):
        raise FieldError(f"{REASON_MALFORMED}: {what} is {describe(value)}, not text")
    long = too_long(what, value, limit, limit_name)
    if long:
        raise FieldError(f"{REASON_TOO_LONG}: {long}")
    if has_lone_surrogate(value):
        raise FieldError(f"{REASON_BAD_TEXT}: {what} holds a lone surrogate or bytes that are not UTF-8")
    return value


def _sentence(sent: Any, j: int, where: str) -> tuple[int, str]:
    """``(sent_id, text)`` of one REFER sentence ``{tokens, raw, sent_id, sent}``: ``sent``, else
    ``raw``, else the tokens joined, stripped (may be empty). Raises :class:`FieldError` for a field
    of the wrong type, a text over :data:`MAX_SENTENCE_CHARS` or with a lone surrogate."""
    if not isinstance(sent, dict):
        raise FieldError(f"{REASON_MALFORMED}: {where}: the sentence is {describe(sent)}, not an object")
    sent_id = as_int(sent.get("sent_id", j), f"{where}: sent_id")
    for key in ("sent", "raw"):
        v = sent.get(key)
        if v is not None and not isinstance(v, str):
            raise FieldError(f"{REASON_MALFORMED}: {where}: {key} is {describe(v)}, not text")
    tokens = sent.get("tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise FieldError(f"{REASON_MALFORMED}: {where}: tokens is {describe(tokens)}, not a list of words")
    if sent.get("sent"):
        text = sent["sent"]
    elif sent.get("raw"):
        text = sent["raw"]
    elif tokens and len(tokens) <= MAX_SENTENCE_CHARS:
        text = " ".join(tokens)
    elif tokens:
        raise FieldError(f"{REASON_TOO_LONG}: sentence of {len(tokens)} tokens, at most {MAX_SENTENCE_CHARS} "
                         "characters (MAX_SENTENCE_CHARS)")
    else:
        text = ""
    return sent_id, as_text(text, "sentence", MAX_SENTENCE_CHARS, "MAX_SENTENCE_CHARS").strip()


def _index(entries: list[Any], kind: str, where: str, bad: Any) -> dict[int, dict[str, Any]]:
    """``{id: entry}`` of the instances.json entries of one kind; an entry that is not an object
    with an integer id is quarantined (``bad(record, reason)``) and left out."""
    out: dict[int, dict[str, Any]] = {}
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or "id" not in e:
            bad(f"{where} {kind} #{k}", f"{REASON_MALFORMED}: {where}: not an object with an id")
            continue
        try:
            out.setdefault(as_int(e["id"], f"{where}: {kind} #{k} id"), e)
        except FieldError as err:
            bad(f"{where} {kind} #{k}", str(err))
    return out


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
    rpath = refs_path(ddir, sb)
    refs = load_refs(rpath)
    validator = validator or ImageValidator()
    images_root = Path(images_dir)
    inst, rname = "instances.json", rpath.name

    out: list[RefRecord] = []
    used: dict[int, ImageRecord] = {}
    quarantine: list[QuarantineEntry] = []
    mask_ok: dict[int, str | None] = {}  # ann_id -> None (fine) or the reason
    first: dict[tuple[int, int], str] = {}  # (ref_id, sent_id) of each kept sentence -> its record

    def bad(record: str, reason: str) -> None:
        quarantine.append(QuarantineEntry(name, record, reason))

    imgs = _index(instances["images"], "image", inst, bad)
    anns = _index(instances["annotations"], "annotation", inst, bad)
    cats: dict[int, str] = {}
    for cid, c in _index(instances["categories"], "category", inst, bad).items():
        try:
            cats[cid] = as_text(c.get("name", ""), f"{inst}: category {cid} name", MAX_SENTENCE_CHARS,
                                "MAX_SENTENCE_CHARS")
        except FieldError as e:
            bad(f"{inst} category {cid}", str(e))

    for i, ref in enumerate(tqdm(refs, disable=not progress, desc=f"refs {name}", unit="ref")):
        if not isinstance(ref, dict) or any(k not in ref for k in REF_KEYS):
            missing = [k for k in REF_KEYS if not isinstance(ref, dict) or k not in ref]
            bad(f"ref #{i}", f"{REASON_MALFORMED}: {rname}: missing key(s) {', '.join(missing)}")
            continue
        try:
            ref_id = as_int(ref["ref_id"], f"{rname}: ref #{i} ref_id")
            ann_id = as_int(ref["ann_id"], f"{rname}: ref #{i} ann_id")
            image_id = as_int(ref["image_id"], f"{rname}: ref #{i} image_id")
        except FieldError as e:
            bad(f"ref #{i}", str(e))
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
        try:  # every field this ref uses, checked before any file is opened
            file_name = as_text(im.get("file_name", ""), f"{inst}: image {image_id} file_name", 4096,
                                "a file name's 4096")
            iscrowd = as_int(ann.get("iscrowd", 0) or 0, f"{inst}: annotation {ann_id} iscrowd")
            split = as_text(ref.get("split", ""), f"{rname}: ref_id {ref_id} split", 64, "a split name's 64")
            h_listed = as_int(im["height"], f"{inst}: image {image_id} height") if "height" in im else None
            w_listed = as_int(im["width"], f"{inst}: image {image_id} width") if "width" in im else None
            cat_id = as_int(ann.get("category_id", ref.get("category_id", -1)),
                            f"{inst}: annotation {ann_id} category_id")
            bbox_raw = ann.get("bbox") or [0.0, 0.0, 0.0, 0.0]
            if not isinstance(bbox_raw, (list, tuple)) or len(bbox_raw) != 4:
                raise FieldError(f"{REASON_MALFORMED}: {inst}: annotation {ann_id} bbox is "
                                 f"{describe(bbox_raw)}, not [x, y, w, h]")
            bbox = tuple(as_float(v, f"{inst}: annotation {ann_id} bbox") for v in bbox_raw)
            area = as_float(ann.get("area", 0.0), f"{inst}: annotation {ann_id} area")
            attributes = ann.get("attributes") or {}
            if not isinstance(attributes, dict):
                raise FieldError(f"{REASON_MALFORMED}: {inst}: annotation {ann_id} attributes is "
                                 f"{describe(attributes)}, not an object")
        except FieldError as e:
            bad(rec, str(e))
            continue
        rec = f"{rec} ({file_name})"
        if iscrowd:
            bad(rec, REASON_CROWD)
            continue
        path = confined(images_root, file_name)
        if path is None:
            bad(rec, f"{REASON_OUTSIDE_ROOT}: file_name {describe(file_name)} is not under the image folder")
            continue
        try:
            info = validator.check(path)
        except ImageError as e:
            bad(rec, e.quarantine_reason)
            continue
        h = info.height if h_listed is None else h_listed
        w = info.width if w_listed is None else w_listed
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
        if cat_id not in cats:
            bad(rec, f"{REASON_MALFORMED}: unknown category_id {cat_id}")
            continue
        sentences = ref["sentences"] if isinstance(ref["sentences"], list) else []
        if not sentences:
            bad(rec, f"{REASON_MALFORMED}: no sentences")
            continue
        kept = 0
        for j, sent in enumerate(sentences):
            try:
                sent_id, text = _sentence(sent, j, f"{rname}: ref_id {ref_id} sentence #{j}")
            except FieldError as e:
                bad(f"ref_id={ref_id} sentence #{j} ({file_name})", str(e))
                continue
            srec = f"ref_id={ref_id} sent_id={sent_id} ({file_name})"
            if not text:
                bad(srec, REASON_EMPTY_SENTENCE)
                continue
            if (ref_id, sent_id) in first:
                bad(srec, f"{REASON_DUPLICATE}: {rname} repeats ref_id {ref_id} sent_id {sent_id} "
                          f"(the first, {first[(ref_id, sent_id)]}, is kept)")
                continue
            first[(ref_id, sent_id)] = f"ref #{i}"
            out.append(RefRecord(
                dataset=name,
                split_by=sb,
                ref_id=ref_id,
                sent_id=sent_id,
                ann_id=ann_id,
                image_id=image_id,
                split=split,
                sentence=text,
                category_id=cat_id,
                category=cats[cat_id],
                bbox=bbox,  # type: ignore[arg-type]
                segmentation=ann.get("segmentation"),
                iscrowd=0,
                area=area,
                attributes=dict(attributes),
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
