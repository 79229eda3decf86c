"""HardBLINK (SPEC §6): n points marked on an image, which one is closest to the camera? Read in the
layout AURORA publishes ("Perception Tokens", Bigverdi et al.; ``Data/evals/hardblink/`` of
github.com/mahtabbigverdi/Aurora-perception), for each point count N (3, 4 and 5 in the public set)::

    <hb_dir>/questions/blink_{N}pointscenter_questions.jsonl
        one JSON object a line: {"question_id": 0, "image": "0.png", "text": "...", "category": "..."}
    <hb_dir>/answers/blink_{N}pointscenter_answers.jsonl
        {"question_id": 0, "text": "(B)"}
    <hb_dir>/images/blink{N}pointscenter/<image>
        the photos with the points drawn on them (336x336 in the public set; PNG)

``image`` is a file name relative to ``images/blink{N}pointscenter/`` (AURORA's evaluation scripts
join it to that folder, their ``--image-folder``); ``question_id`` is matched between the two files
as text (``3`` and ``"3"`` are the same question); ``category`` and any other key are ignored. The
point counts read are those whose question file exists; other files under ``questions/`` (the
``*_long.jsonl`` variants of later AURORA scripts) are not read. The public release publishes no
point coordinates: the points exist only as drawings on the images.

One extra file is **not part of the public release**; the synthetic world
(:mod:`perceptio_core.world.writers`) writes it next to the public files so that the evaluation can
read the marked points off a decoded depth map::

    <hb_dir>/points/blink_{N}pointscenter_points.jsonl
        {"question_id": 0, "points": [[x, y], ...], "labels": ["A", "B", "C"], ...}

``points`` are pixel positions (column, row) in label order. When the file exists every question
of that point count must have a row; without it records have ``points == ()``.

The options of a question are the letters its ``text`` names in parentheses (``"(A)"``, ``"(B)"``
...), in alphabetical order; a text that names none has the first N letters. They must number N.
The answer ``"(B)"`` (or a bare ``"B"``, normalised to ``"(B)"``) must be one of them.

:func:`read_hardblink` returns one :class:`~perceptio_core.data.records.HardBlinkRecord` per usable
question (``qid`` ``"<N>pt/<question_id>"``, ``question`` = ``text`` verbatim, ``labels`` = the
options, ``n_points`` = N) and quarantines the rest, source ``"hardblink"``, the record named by file
(relative to ``hb_dir``) and line: ``"questions/blink_3pointscenter_questions.jsonl:7
question_id=6 (6.png)"``. Reasons: ``missing image``/``corrupt image: ...`` and ``malformed record:
...`` (a line that is not UTF-8, not JSON or not an object, missing keys, a question_id that is not
a number or a short text, a repeated question_id, a text or image name that is not text, an empty
text, options that do not number N, no answer, an answer without a question, an answer that is not
a letter or not among the options, a bad or missing points row, a point that is not two finite
numbers or lies outside the image), ``text too long: ...`` (a text over
:data:`~perceptio_core.data.limits.MAX_QUESTION_CHARS`), ``invalid text: ...`` (a lone surrogate),
``path outside the data root: ...`` (an ``image`` that is absolute or climbs out with ``..``).
Missing dataset-level parts raise :class:`~perceptio_core.data.records.DatasetNotFoundError` naming
the path: no question file at all, an answers file or an image folder of a point count that has
questions.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from perceptio_core.data.image_io import ImageError, ImageInfo, ImageValidator, confined
from perceptio_core.data.limits import MAX_QUESTION_CHARS, has_lone_surrogate
from perceptio_core.data.records import (
    REASON_MALFORMED,
    REASON_OUTSIDE_ROOT,
    DatasetNotFoundError,
    HardBlinkRecord,
    QuarantineEntry,
)
from perceptio_core.data.refer import FieldError, as_text, describe

SOURCE = "hardblink"
QUESTIONS, ANSWERS, IMAGES, POINTS = "questions", "answers", "images", "points"
PUBLIC_COUNTS = (3, 4, 5)
_QUESTION_FILE = re.compile(r"blink_(\d+)pointscenter_questions\.jsonl")
_OPTION = re.compile(r"\(([A-Z])\)")
_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?")


def questions_file(n: int) -> str:
    """``questions/blink_{n}pointscenter_questions.jsonl`` (relative to the HardBLINK folder)."""
    return f"{QUESTIONS}/blink_{n}pointscenter_questions.jsonl"


def answers_file(n: int) -> str:
    """``answers/blink_{n}pointscenter_answers.jsonl``."""
    return f"{ANSWERS}/blink_{n}pointscenter_answers.jsonl"


def images_dir(n: int) -> str:
    """``images/blink{n}pointscenter`` (no underscore, as published)."""
    return f"{IMAGES}/blink{n}pointscenter"


def points_file(n: int) -> str:
    """``points/blink_{n}pointscenter_points.jsonl``: the synthetic world's, not in the public release."""
    return f"{POINTS}/blink_{n}pointscenter_points.jsonl"


def option_labels(text: str, n: int) -> tuple[str, ...]:
    """The options a question ``text`` offers: the letters it names in parentheses, sorted and
    distinct; the first ``n`` letters when it names none."""
    found = sorted(set(_OPTION.findall(text)))
    return tuple(found) if found else tuple(chr(ord("A") + i) for i in range(n))


def answer_letter(answer: Any) -> str | None:
    """``"(A)"``, ``"A"`` or ``"( a )"`` -> ``"A"``; anything else -> None."""
    m = _LETTER.fullmatch(str(answer).strip())
    return m.group(1).upper() if m else None


def point_counts(hb_dir: str | os.PathLike[str]) -> list[int]:
    """The point counts N whose question file exists under ``hb_dir``, ascending."""
    qdir = Path(hb_dir) / QUESTIONS
    if not qdir.is_dir():
        return []
    found = (_QUESTION_FILE.fullmatch(p.name) for p in qdir.iterdir() if p.is_file())
    return sorted(int(m.group(1)) for m in found if m)


def dataset_files(hb_dir: str | os.PathLike[str]) -> list[Path]:
    """The annotation files :func:`read_hardblink` reads (question, answer and points files that
    exist), in a fixed order: what a fingerprint hashes besides the image listing."""
    root = Path(hb_dir)
    out: list[Path] = []
    for n in point_counts(root):
        out += [p for p in (root / questions_file(n), root / answers_file(n), root / points_file(n)) if p.is_file()]
    return out


class HardBlinkResult(NamedTuple):
    """What :func:`read_hardblink` returns."""

    records: list[HardBlinkRecord]
    quarantine: list[QuarantineEntry]


class _Line(NamedTuple):
    where: str  # "<file>:<line>"
    row: dict[str, Any]


def _jsonl(path: Path, rel: str, required: tuple[str, ...], quarantine: list[QuarantineEntry]) -> list[_Line]:
    """The object lines of a JSONL file that have the ``required`` keys; the others quarantined."""
    out: list[_Line] = []
    with open(path, "rb") as f:  # decoded line by line: one bad byte spoils one line
        for i, braw in enumerate(f, start=1):
            if not braw.strip():
                continue
            where = f"{rel}:{i}"
            try:
                row = json.loads(braw.decode("utf-8"))
            except UnicodeDecodeError as e:
                quarantine.append(QuarantineEntry(SOURCE, where, f"{REASON_MALFORMED}: not UTF-8 text ({e.reason})"))
                continue
            except json.JSONDecodeError as e:
                quarantine.append(QuarantineEntry(SOURCE, where, f"{REASON_MALFORMED}: not JSON ({e.msg})"))
                continue
            except RecursionError:
                quarantine.append(QuarantineEntry(SOURCE, where, f"{REASON_MALFORMED}: JSON nested too deep"))
                continue
            if not isinstance(row, dict):
                quarantine.append(QuarantineEntry(SOURCE, where, f"{REASON_MALFORMED}: not a JSON object"))
                continue
            missing = [k for k in required if k not in row]
            qid = row.get("question_id")
            if not missing and (isinstance(qid, bool) or not isinstance(qid, (int, str)) or len(str(qid)) > 64
                                or has_lone_surrogate(str(qid))):
                quarantine.append(QuarantineEntry(SOURCE, where, f"{REASON_MALFORMED}: question_id is "
                                                                 f"{describe(qid)}, not a number or a short text"))
                continue
            if missing:
                named = f" question_id={describe(qid)}" if "question_id" in row else ""
                quarantine.append(QuarantineEntry(SOURCE, where + named,
                                                  f"{REASON_MALFORMED}: missing key(s) {', '.join(missing)}"))
                continue
            out.append(_Line(where, row))
    return out


def _by_id(lines: list[_Line], what: str, quarantine: list[QuarantineEntry]) -> dict[str, _Line]:
    """``str(question_id)`` -> line; a repeated id quarantines every line after the first."""
    out: dict[str, _Line] = {}
    for ln in lines:
        key = str(ln.row["question_id"])
        if key in out:
            quarantine.append(QuarantineEntry(
                SOURCE, f"{ln.where} question_id={key}",
                f"{REASON_MALFORMED}: question_id repeated in the {what} (first at {out[key].where})"))
            continue
        out[key] = ln
    return out


def _points_problem(row: dict[str, Any], labels: tuple[str, ...], info: ImageInfo) -> str | None:
    pts, row_labels = row["points"], row["labels"]
    if not isinstance(pts, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
            for p in pts):
        return "points is not a list of [x, y] (two finite numbers each)"
    if not isinstance(row_labels, list) or not all(isinstance(v, str) and len(v) <= 8 for v in row_labels):
        return f"points row labels is {describe(row_labels)}, not a list of letters"
    if row_labels != list(labels):
        return f"points row labels {row_labels} but the question's options are {list(labels)}"
    if len(pts) != len(labels):
        return f"{len(pts)} points for {len(labels)} options"
    if not all(0 <= x < info.width and 0 <= y < info.height for x, y in pts):
        return f"a point lies outside the {info.width}x{info.height} image"
    return None


def read_hardblink(
    hb_dir: str | os.PathLike[str],
    validator: ImageValidator | None = None,
    depth_dir: str | os.PathLike[str] | None = None,
) -> HardBlinkResult:
    """Read the HardBLINK folder ``hb_dir`` (layout, checks and record ids: module docstring).

    ``depth_dir``, when given, is searched for ``<image stem>.npy`` (the true depth of the unmarked
    scene, which the synthetic world writes). Records come in point-count order, then file order.
    Raises :class:`DatasetNotFoundError` for a missing question file (none at all), answers file or
    image folder.
    """
    root = Path(hb_dir)
    counts = point_counts(root)
    if not counts:
        expected = root / QUESTIONS / "blink_{3,4,5}pointscenter_questions.jsonl"
        raise DatasetNotFoundError(f"HardBLINK question files not found: {expected}")
    validator = validator or ImageValidator()
    records: list[HardBlinkRecord] = []
    quarantine: list[QuarantineEntry] = []
    for n in counts:
        afile, idir = root / answers_file(n), root / images_dir(n)
        if not afile.is_file():
            raise DatasetNotFoundError(f"HardBLINK answers file not found: {afile}")
        if not idir.is_dir():
            raise DatasetNotFoundError(f"HardBLINK image folder not found: {idir}")
        questions = _by_id(_jsonl(root / questions_file(n), questions_file(n), ("question_id", "image", "text"),
                                  quarantine), "questions", quarantine)  # fmt: skip
        answers = _by_id(_jsonl(afile, answers_file(n), ("question_id", "text"), quarantine), "answers", quarantine)
        pfile = root / points_file(n)
        points = (_by_id(_jsonl(pfile, points_file(n), ("question_id", "points", "labels"), quarantine),
                         "points", quarantine) if pfile.is_file() else None)  # fmt: skip
        for key, ln in answers.items():
            if key not in questions:
                quarantine.append(QuarantineEntry(
                    SOURCE, f"{ln.where} question_id={key}",
                    f"{REASON_MALFORMED}: an answer without a question in {questions_file(n)}"))
        for key, ln in (points or {}).items():
            if key not in questions:
                quarantine.append(QuarantineEntry(
                    SOURCE, f"{ln.where} question_id={key}",
                    f"{REASON_MALFORMED}: a points row without a question in {questions_file(n)}"))
        for key, q in questions.items():
            rec = _record(n, key, q, answers.get(key), points, root, validator, depth_dir, quarantine)
            if rec is not None:
                records.append(rec)
    return HardBlinkResult(records, quarantine)


def _record(n: int, key: str, q: _Line, a: _Line | None, points: dict[str, _Line] | None, root: Path,
            validator: ImageValidator, depth_dir: str | os.PathLike[str] | None,
            quarantine: list[QuarantineEntry]) -> HardBlinkRecord | None:
    """One question's record, or None with its quarantine entry."""

    def bad(where: str, why: str) -> None:
        quarantine.append(QuarantineEntry(SOURCE, where, f"{REASON_MALFORMED}: {why}"))

    try:
        image = as_text(q.row["image"], "image", 4096, "a file name's 4096")
        name = f"{q.where} question_id={key} ({image})"
        text = as_text(q.row["text"], "text", MAX_QUESTION_CHARS, "MAX_QUESTION_CHARS")
    except FieldError as e:
        quarantine.append(QuarantineEntry(SOURCE, f"{q.where} question_id={key}", str(e)))
        return None
    if not text.strip():
        return bad(name, "empty text")
    labels = option_labels(text, n)
    if len(labels) != n:
        return bad(name, f"the text offers {len(labels)} options ({', '.join(labels)}) for {n} points")
    if a is None:
        return bad(name, f"no answer in {answers_file(n)}")
    letter = answer_letter(a.row["text"]) if isinstance(a.row["text"], (str, int)) else None
    if letter is None or letter not in labels:
        return bad(f"{a.where} question_id={key}",
                   f"answer {describe(a.row['text'])} is not one of the options {', '.join(labels)}")
    path = confined(root / images_dir(n), image)
    if path is None:
        quarantine.append(QuarantineEntry(SOURCE, name, f"{REASON_OUTSIDE_ROOT}: image {describe(image)} is not "
                                                        f"under {images_dir(n)}"))
        return None
    try:
        info = validator.check(path)
    except ImageError as e:
        quarantine.append(QuarantineEntry(SOURCE, name, e.quarantine_reason))
        return None
    pts: tuple[tuple[float, float], ...] = ()
    if points is not None:
        p = points.get(key)
        if p is None:
            return bad(name, f"no row in {points_file(n)}")
        why = _points_problem(p.row, labels, info)
        if why:
            return bad(f"{p.where} question_id={key}", why)
        pts = tuple((float(x), float(y)) for x, y in p.row["points"])
    depth = Path(depth_dir) / f"{path.stem}.npy" if depth_dir else None
    return HardBlinkRecord(
        qid=f"{n}pt/{key}",
        image_path=str(path.resolve()),
        n_points=n,
        points=pts,
        labels=labels,
        question=text,
        answer=f"({letter})",
        depth_path=str(depth.resolve()) if depth is not None and depth.is_file() else None,
    )
