"""ADE20k in the SceneParsing (ADEChallengeData2016) layout (SPEC §5: ADE20k with perception tokens).

Layout, as the public release has it::

    ADEChallengeData2016/
      images/training/ADE_train_00000001.jpg      images/validation/ADE_val_00000001.jpg
      annotations/training/ADE_train_00000001.png annotations/validation/ADE_val_00000001.png
      objectInfo150.csv  (Idx,Ratio,Train,Val,Name; or objectInfo150.txt, tab-separated)

An annotation PNG is single-channel uint8, one class index per pixel, 0 = other / unlabelled.
:func:`read_ade20k` returns one :class:`~perceptio_core.data.records.AdeRecord` per image with a usable
annotation; the rest is quarantined (``missing image``/``corrupt image: ...`` for the image;
``missing annotation``, ``corrupt annotation: ...`` (also: not a regular file), ``too large: ...``
(a file over :data:`~perceptio_core.data.limits.MAX_IMAGE_BYTES`), ``image size mismatch: ...`` (its
header declares another size than the image's: read before decoding, so a decompression bomb that
declares billions of pixels is never decoded) and ``malformed record: ...`` for the annotation: not
single-channel, or class indices beyond the table). A class table row whose index is not an
integer makes the table unreadable: ``ValueError`` naming the file and the row.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from perceptio_core.data.image_io import ImageError, ImageValidator, bomb_error, read_regular
from perceptio_core.data.records import (
    REASON_CORRUPT_ANNOTATION,
    REASON_IMAGE_SIZE,
    REASON_MALFORMED,
    REASON_MISSING_ANNOTATION,
    REASON_TOO_LARGE,
    AdeRecord,
    DatasetNotFoundError,
    QuarantineEntry,
)

ADE_SPLITS = ("training", "validation")
SOURCE = "ade20k"


class AdeResult(NamedTuple):
    """What :func:`read_ade20k` returns."""

    records: list[AdeRecord]
    classes: dict[int, str]  # class index -> name (the first of the ';'-separated names)
    quarantine: list[QuarantineEntry]


def read_object_info(ade_dir: str | os.PathLike[str]) -> dict[int, str]:
    """The class table: ``objectInfo150.csv`` (comma-separated) or ``objectInfo150.txt``
    (tab-separated), columns Idx, Ratio, Train, Val, Name. Returns {index: first name}.
    Raises :class:`DatasetNotFoundError` when neither file exists."""
    d = Path(ade_dir)
    for fname, delim in (("objectInfo150.csv", ","), ("objectInfo150.txt", "\t")):
        p = d / fname
        if not p.is_file():
            continue
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=delim))
        if not rows:
            raise ValueError(f"{p}: empty class table")
        header = [h.strip().lower() for h in rows[0]]
        if "idx" not in header or "name" not in header:
            raise ValueError(f"{p}: expected columns Idx,Ratio,Train,Val,Name, got {rows[0]}")
        ii, ni = header.index("idx"), header.index("name")
        out: dict[int, str] = {}
        for n, row in enumerate(rows[1:], start=2):
            if len(row) > max(ii, ni) and row[ii].strip():
                idx = row[ii].strip()
                if not idx.isdigit() or len(idx) > 6:
                    raise ValueError(f"{p}: row {n}: class index {idx[:40]!r} is not an integer")
                out[int(idx)] = row[ni].strip().split(";")[0].strip()
        return out
    raise DatasetNotFoundError(f"ADE20k class table not found: {d / 'objectInfo150.csv'} "
                               f"(or {d / 'objectInfo150.txt'})")


def _image_id(stem: str) -> int:
    m = re.search(r"(\d+)$", stem)
    return int(m.group(1)) if m else 0


def _annotation_problem(path: Path, width: int, height: int) -> str | np.ndarray:
    """The annotation PNG's class indices, uint8 [H, W], or the quarantine reason. The file is read
    only when regular and under MAX_IMAGE_BYTES, and decoded only when its header declares the
    image's size (``width`` x ``height``, an image already checked against MAX_IMAGE_PIXELS) and a
    single channel: nothing is decoded before those checks."""
    try:
        data = read_regular(path, what="annotation")
    except ImageError as e:
        detail = e.detail or e.reason
        return f"{e.reason}: {detail}" if e.reason == REASON_TOO_LARGE else f"{REASON_CORRUPT_ANNOTATION}: {detail}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                mode, size = im.mode, im.size
                if size != (width, height):
                    return (f"{REASON_IMAGE_SIZE}: annotation {size[0]}x{size[1]}, image {width}x{height}")
                if mode not in ("L", "P"):
                    return f"{REASON_MALFORMED}: annotation is {mode}, not single-channel class indices"
                im.load()
                arr = np.asarray(im)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return bomb_error(path, e, "annotation").quarantine_reason
    except (OSError, SyntaxError, ValueError) as e:
        return f"{REASON_CORRUPT_ANNOTATION}: {type(e).__name__}: {e}"
    if arr.ndim != 2:
        return f"{REASON_MALFORMED}: annotation is {mode}, not single-channel class indices"
    return arr


def read_ade20k(
    ade_dir: str | os.PathLike[str],
    validator: ImageValidator | None = None,
    depth_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> AdeResult:
    """Read an ADEChallengeData2016 folder (module docstring). ``validator`` checks and digests
    the images (shared across sources); ``depth_dir`` is searched for ``<stem>.npy`` true depth.
    A split folder that is absent is skipped; a missing ``images/`` folder or class table raises
    :class:`DatasetNotFoundError`."""
    from tqdm.auto import tqdm

    root = Path(ade_dir)
    if not (root / "images").is_dir():
        raise DatasetNotFoundError(f"ADE20k images folder not found: {root / 'images'}")
    classes = read_object_info(root)
    max_cls = max(classes) if classes else 255
    validator = validator or ImageValidator()
    records: list[AdeRecord] = []
    quarantine: list[QuarantineEntry] = []
    files = [(split, p) for split in ADE_SPLITS if (root / "images" / split).is_dir()
             for p in sorted((root / "images" / split).iterdir())
             if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    for split, img_path in tqdm(files, disable=not progress, desc="ade20k", unit="img"):
        rec = f"{split}/{img_path.name}"
        try:
            info = validator.check(img_path)
        except ImageError as e:
            quarantine.append(QuarantineEntry(SOURCE, rec, e.quarantine_reason))
            continue
        ann_path = root / "annotations" / split / f"{img_path.stem}.png"
        if not ann_path.is_file():
            quarantine.append(QuarantineEntry(SOURCE, rec, REASON_MISSING_ANNOTATION))
            continue
        why = _annotation_problem(ann_path, info.width, info.height)
        if isinstance(why, str):
            quarantine.append(QuarantineEntry(SOURCE, rec, why))
            continue
        arr = why
        present = sorted(int(v) for v in np.unique(arr) if v != 0)
        if present and present[-1] > max_cls:
            quarantine.append(QuarantineEntry(
                SOURCE, rec, f"{REASON_MALFORMED}: class index {present[-1]} beyond the class table "
                             f"(max {max_cls})"))
            continue
        depth = Path(depth_dir) / f"{img_path.stem}.npy" if depth_dir else None
        records.append(AdeRecord(
            image_id=_image_id(img_path.stem),
            image_path=str(img_path.resolve()),
            annotation_path=str(ann_path.resolve()),
            split=split,
            present_classes=tuple(present),
            width=info.width,
            height=info.height,
            depth_path=str(depth.resolve()) if depth is not None and depth.is_file() else None,
            digest=info.digest,
        ))
    return AdeResult(records, classes, quarantine)
