"""HardBLINK-style relative-depth questions (SPEC §6): n marked points, which is closest?

The set lives in a folder with ``annotations.json``: a list of records
``{id, image, n_points, points, labels, question, answer}`` where ``image`` is relative to the
folder, ``points`` are ``[x, y]`` pixel positions (column, row) in label order, ``labels`` the
letters drawn beside them and ``answer`` the closest point's letter in parentheses, ``"(A)"``.
Extra keys (the synthetic world adds ``point_depths``) are ignored. :func:`read_hardblink` returns
one :class:`~perceptio_core.data.records.HardBlinkRecord` per usable record and quarantines the rest:
``missing image``/``corrupt image: ...`` and ``malformed record: ...`` (missing keys, counts that
disagree, duplicate labels, an answer that names no label, points outside the image, no question).
An answer given as a bare letter (``"A"``) is normalised to ``"(A)"``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from perceptio_core.data.image_io import ImageError, ImageValidator
from perceptio_core.data.records import REASON_MALFORMED, HardBlinkRecord, QuarantineEntry, read_annotation_json

ANNOTATIONS = "annotations.json"
SOURCE = "hardblink"
_KEYS = ("id", "image", "points", "labels", "question", "answer")


class HardBlinkResult(NamedTuple):
    """What :func:`read_hardblink` returns."""

    records: list[HardBlinkRecord]
    quarantine: list[QuarantineEntry]


def _problem(r: dict[str, Any]) -> str | None:
    """Why a record's fields are unusable, or None."""
    missing = [k for k in _KEYS if k not in r]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    pts, labels = r["points"], r["labels"]
    if not isinstance(pts, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pts):
        return "points is not a list of [x, y]"
    if not isinstance(labels, list) or len(labels) != len(pts):
        return f"{len(pts)} points but labels {labels!r}"
    if "n_points" in r and int(r["n_points"]) != len(pts):
        return f"n_points={r['n_points']} but {len(pts)} points"
    if len(set(labels)) != len(labels):
        return f"duplicate labels {labels}"
    if len(pts) < 2:
        return "fewer than 2 points"
    if not str(r["question"]).strip():
        return "empty question"
    letter = _answer_letter(r["answer"])
    if letter is None or letter not in labels:
        return f"answer {r['answer']!r} names none of the labels {labels}"
    return None


def _answer_letter(answer: Any) -> str | None:
    """``"(A)"``, ``"A"`` or ``"( a )"`` -> ``"A"``; anything else -> None."""
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?", str(answer).strip())
    return m.group(1).upper() if m else None


def read_hardblink(
    hb_dir: str | os.PathLike[str],
    validator: ImageValidator | None = None,
    depth_dir: str | os.PathLike[str] | None = None,
) -> HardBlinkResult:
    """Read ``<hb_dir>/annotations.json`` (module docstring). ``depth_dir``, when given, is searched
    for ``<image stem>.npy`` (the unmarked scene's true depth). Raises :class:`DatasetNotFoundError`
    when the annotation file is absent, ``ValueError`` when it is not a JSON list."""
    root = Path(hb_dir)
    ann = root / ANNOTATIONS
    data = read_annotation_json(ann, "HardBLINK annotations")
    if not isinstance(data, list):
        raise ValueError(f"{ann}: expected a list of records, got {type(data).__name__}")
    validator = validator or ImageValidator()
    records: list[HardBlinkRecord] = []
    quarantine: list[QuarantineEntry] = []
    for i, r in enumerate(data):
        rid = f"id={r.get('id', '?')}" if isinstance(r, dict) else f"record #{i}"
        why = _problem(r) if isinstance(r, dict) else "not a JSON object"
        if why:
            quarantine.append(QuarantineEntry(SOURCE, rid, f"{REASON_MALFORMED}: {why}"))
            continue
        path = root / str(r["image"])
        try:
            info = validator.check(path)
        except ImageError as e:
            quarantine.append(QuarantineEntry(SOURCE, f"{rid} ({r['image']})", e.quarantine_reason))
            continue
        points = tuple((float(x), float(y)) for x, y in r["points"])
        if not all(0 <= x < info.width and 0 <= y < info.height for x, y in points):
            quarantine.append(QuarantineEntry(
                SOURCE, rid,
                f"{REASON_MALFORMED}: a point lies outside the {info.width}x{info.height} image"))
            continue
        letter = _answer_letter(r["answer"])
        depth = Path(depth_dir) / f"{path.stem}.npy" if depth_dir else None
        records.append(HardBlinkRecord(
            qid=str(r["id"]),
            image_path=str(path.resolve()),
            n_points=len(points),
            points=points,
            labels=tuple(str(x) for x in r["labels"]),
            question=str(r["question"]),
            answer=f"({letter})",
            split=str(r.get("split", "test")),
            source_image_id=r.get("source_image_id"),
            depth_path=str(depth.resolve()) if depth is not None and depth.is_file() else None,
        ))
    return HardBlinkResult(records, quarantine)
