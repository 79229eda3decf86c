"""MME (Fu et al., "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language
Models"; SPEC §6) in the folder layout of its release, ``MME_Benchmark_release_version/``: one
folder per subtask, each image asked two yes/no questions (one answered "Yes", one "No")::

    <mme_dir>/<subtask>/<stem>.jpg|.png  and  <mme_dir>/<subtask>/<stem>.txt
        (existence, count, position, color, OCR, commonsense_reasoning, numerical_calculation,
        text_translation, code_reasoning)
    <mme_dir>/<subtask>/images/<stem>.jpg  and  <mme_dir>/<subtask>/questions_answers_YN/<stem>.txt
        (artwork, celebrity, landmark, posters, scene)

A ``.txt`` holds one question a line, ``question<TAB>answer`` with the answer ``Yes`` or ``No``
(blank lines ignored). Which layout a subtask uses is read off its folder (both
``images/`` and ``questions_answers_YN/`` present: the second), so a subtask of either kind reads.
Copies of the release that nest it one level deeper (``MME_Benchmark_release_version/MME_Benchmark/``)
read too: when ``mme_dir`` holds no subtask folder but one sub-folder does, that one is read. Subtask
folders with other names are read as well (their group is "other"); the MME score groups the known
ones: :data:`PERCEPTION` (10 subtasks, 2000 points at most) and :data:`COGNITION` (4, 800 points).

:func:`read_mme` returns one :class:`~perceptio_core.data.records.MmeRecord` per question (``qid``
``"<subtask>/<stem>/<line>"``; ``image_key`` ``"<subtask>/<stem>"`` pairs the questions of one image
for acc+) and quarantines, source ``"mme"``, record ``"<subtask>/<file>:<line>"`` or
``"<subtask>/<stem>"``: ``missing image`` (a question file without its image), ``corrupt image:
...``, ``malformed record: ...`` (a line without a tab, an empty question, an answer that is not
Yes/No, a file that is not UTF-8 or over
:data:`~perceptio_core.data.limits.MAX_QUESTION_FILE_BYTES`), ``text too long: ...`` (a question over
:data:`~perceptio_core.data.limits.MAX_QUESTION_CHARS`). Only regular files are read: a FIFO named
``<stem>.txt`` is never opened (it would hang). A missing folder raises
:class:`~perceptio_core.data.records.DatasetNotFoundError` naming it, and so does a folder without a
single subtask.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from perceptio_core.data.image_io import ImageError, ImageValidator, read_regular
from perceptio_core.data.limits import MAX_QUESTION_CHARS, MAX_QUESTION_FILE_BYTES, too_long
from perceptio_core.data.records import (
    REASON_MALFORMED,
    REASON_MISSING_IMAGE,
    REASON_TOO_LONG,
    DatasetNotFoundError,
    MmeRecord,
    QuarantineEntry,
)

SOURCE = "mme"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SPLIT_IMAGES, SPLIT_QA = "images", "questions_answers_YN"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp")
ANSWERS = {"yes": "Yes", "no": "No"}


def _question_files(qa: Path) -> list[Path]:
    """The regular ``.txt`` files of a question folder, sorted (a FIFO or a device is left out)."""
    return sorted(p for p in qa.iterdir() if p.suffix == ".txt" and p.is_file())


class MmeResult(NamedTuple):
    """What :func:`read_mme` returns."""

    records: list[MmeRecord]
    quarantine: list[QuarantineEntry]


def group_of(subtask: str) -> str:
    """``"perception"``, ``"cognition"`` or ``"other"``: where a subtask's score counts."""
    if subtask in PERCEPTION:
        return "perception"
    return "cognition" if subtask in COGNITION else "other"


def _qa_folders(folder: Path) -> tuple[Path, Path]:
    """(question files folder, images folder) of one subtask folder."""
    if (folder / SPLIT_IMAGES).is_dir() and (folder / SPLIT_QA).is_dir():
        return folder / SPLIT_QA, folder / SPLIT_IMAGES
    return folder, folder


def _is_subtask(folder: Path) -> bool:
    qa, _ = _qa_folders(folder)
    return folder.is_dir() and bool(_question_files(qa))


def mme_root(mme_dir: str | os.PathLike[str]) -> Path:
    """The folder whose sub-folders are the subtasks (module docstring: ``mme_dir`` itself, or its
    one nested copy); raises :class:`DatasetNotFoundError` naming ``mme_dir`` when there is none."""
    root = Path(mme_dir)
    if not root.is_dir():
        raise DatasetNotFoundError(f"MME folder not found: {root}")
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    if any(_is_subtask(p) for p in subs):
        return root
    nested = [p for p in subs if any(_is_subtask(q) for q in p.iterdir() if q.is_dir())]
    if len(nested) == 1:
        return nested[0]
    raise DatasetNotFoundError(f"MME folder {root} holds no subtask folder (<subtask>/<image>.txt or "
                               f"<subtask>/{SPLIT_QA}/<image>.txt)")


def mme_files(mme_dir: str | os.PathLike[str]) -> list[Path]:
    """Every question file of the release (sorted): what a fingerprint of the benchmark hashes
    besides the image listing."""
    root = mme_root(mme_dir)
    out: list[Path] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        qa, _ = _qa_folders(sub)
        out += _question_files(qa)
    return out


def _image_of(images: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        if (images / f"{stem}{suffix}").is_file():
            return images / f"{stem}{suffix}"
    return None


def read_mme(mme_dir: str | os.PathLike[str], validator: ImageValidator | None = None) -> MmeResult:
    """Read an MME release folder (module docstring)."""
    root = mme_root(mme_dir)
    validator = validator or ImageValidator()
    records: list[MmeRecord] = []
    quarantine: list[QuarantineEntry] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        qa, images = _qa_folders(sub)
        for txt in _question_files(qa):
            key = f"{sub.name}/{txt.stem}"
            try:
                data = read_regular(txt, MAX_QUESTION_FILE_BYTES, "question", "MAX_QUESTION_FILE_BYTES")
                lines = data.decode("utf-8").splitlines()
            except UnicodeDecodeError as e:
                quarantine.append(QuarantineEntry(SOURCE, f"{sub.name}/{txt.name}",
                                                  f"{REASON_MALFORMED}: not UTF-8 text ({e.reason})"))
                continue
            except ImageError as e:
                quarantine.append(QuarantineEntry(SOURCE, f"{sub.name}/{txt.name}",
                                                  f"{REASON_MALFORMED}: {e.detail or e.reason}"))
                continue
            image = _image_of(images, txt.stem)
            if image is None:
                quarantine.append(QuarantineEntry(SOURCE, key, REASON_MISSING_IMAGE))
                continue
            try:
                validator.check(image)
            except ImageError as e:
                quarantine.append(QuarantineEntry(SOURCE, key, e.quarantine_reason))
                continue
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                rec = f"{sub.name}/{txt.name}:{n}"
                question, tab, answer = line.rstrip("\r").rpartition("\t")
                why = None
                if not tab:
                    why = "no tab between question and answer"
                elif not question.strip():
                    why = "empty question"
                elif answer.strip().lower() not in ANSWERS:
                    why = f"answer {answer.strip()[:40]!r} is not Yes or No"
                elif long := too_long("question", question.strip(), MAX_QUESTION_CHARS, "MAX_QUESTION_CHARS"):
                    quarantine.append(QuarantineEntry(SOURCE, rec, f"{REASON_TOO_LONG}: {long}"))
                    continue
                if why:
                    quarantine.append(QuarantineEntry(SOURCE, rec, f"{REASON_MALFORMED}: {why}"))
                    continue
                records.append(MmeRecord(
                    qid=f"{key}/{n}",
                    subtask=sub.name,
                    image_key=key,
                    image_path=str(image.resolve()),
                    question=question.strip(),
                    answer=ANSWERS[answer.strip().lower()],
                ))
    return MmeResult(records, quarantine)


__all__ = ["COGNITION", "PERCEPTION", "MmeResult", "group_of", "mme_files", "mme_root", "read_mme"]
