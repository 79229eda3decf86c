"""Multiple-choice benchmarks in the TSV layout VLMEvalKit distributes (SPEC §6: MMBench-style
accuracy): MMBench, SEED-Bench, AI2D, MMStar, ScienceQA and any other of its MCQ TSVs.

A header row then one question per row, tab-separated, fields quoted as pandas writes them; columns
``index, question, A, B, answer, image`` at least, usually ``hint``, ``C``, ``D`` (``E`` and further
single-letter option columns where a benchmark has them), ``category`` and extra columns
(``source, l2-category, comment, split``) that are ignored apart from ``split`` (default ``test``).
``image`` is the picture as base64 inline, or, as in MMBench's circular copies, the ``index`` of
another row whose image it shares (a value of 64 characters or fewer).

Images: each distinct image is decoded once and written to ``image_dir`` as
``<sha256 of its bytes>.<ext>`` (content-addressed, so concurrent readers and repeated reads agree,
and the file is written atomically); records point at those files, so every reader downstream deals
with image paths only. Empty or ``nan`` cells are absent (an option column may be empty: SEED-Bench's and MMStar's
questions have 4 options in a 4-column file, ScienceQA's 2 to 5 in a 5-column one); at least two
options must remain. Quarantine entries have source ``mcq.<benchmark>`` and record ``index=<index>
(<file> line <n>)``. Quarantined rows: ``corrupt image: ...`` (not base64, not an image), ``missing
image`` (a reference to an index without an image), ``malformed record: ...`` (no question, fewer than
two options, no answer, an answer that is not an option letter, bytes that are not UTF-8, a number of
fields other than the header's, an unbalanced quote), ``text too long: ...`` (question, hint and
options over :data:`~perceptio_core.data.limits.MAX_QUESTION_CHARS`).

An unbalanced quote (a field that opens with ``"`` and never closes) would make a CSV reader run that
field on over every following line, silently swallowing the rows after it. The file is therefore read
row by row with its line numbers: a row whose field count is not the header's, or with a field that
spans lines and holds a tab, is the start of such a run; its first line is quarantined and reading
starts again on the next line, so only the broken row is lost.
"""

from __future__ import annotations

import base64
import binascii
import csv
import itertools
import os
import sys
from pathlib import Path
from typing import NamedTuple

from perceptio_core.atomic_io import bytes_digest
from perceptio_core.data.image_io import CorruptImageError, ImageError, decode_image_bytes
from perceptio_core.data.limits import MAX_QUESTION_CHARS, too_long
from perceptio_core.data.records import (
    REASON_CORRUPT_IMAGE,
    REASON_MALFORMED,
    REASON_MISSING_IMAGE,
    REASON_TOO_LONG,
    DatasetNotFoundError,
    QuarantineEntry,
    McqRecord,
)

_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}


class McqResult(NamedTuple):
    """What :func:`read_mcq_tsv` returns."""

    records: list[McqRecord]
    quarantine: list[QuarantineEntry]


def _cell(row: dict[str, str], key: str) -> str:
    v = (row.get(key) or "").strip()
    return "" if v.lower() == "nan" else v


def _utf8(row: dict[str, str]) -> bool:
    try:
        "".join(v for v in row.values() if isinstance(v, str)).encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8, kept as a lone surrogate
        return False
    return True


def _store_image(data: bytes, image_dir: Path) -> str:
    """Validate image bytes and write them (once) as ``<sha256>.<ext>``; returns the path."""
    _, fmt = decode_image_bytes(data, "<inline image>")
    path = image_dir / f"{bytes_digest(data)}{_EXT.get(fmt, '.img')}"
    if not path.is_file():
        image_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path.resolve())


def _first_field(line: str) -> str:
    """The index a raw TSV line starts with (for naming a row the reader could not parse)."""
    head = line.split("\t", 1)[0].strip().strip('"')[:40]
    return head.encode("utf-8", "backslashreplace").decode("utf-8") or "?"


def _tsv_rows(text: str, name: str, source: str,
              quarantine: list[QuarantineEntry]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, fields), ...]) of a TSV's text; rows that cannot be parsed on their
    own (module docstring: an unbalanced quote, another field count, a csv error) are quarantined
    by their first line and reading starts again after it."""
    lines = [ln + "\n" for ln in text.split("\n")]
    if lines and lines[-1] == "\n":
        lines.pop()
    if not lines:
        return [], []
    header = next(csv.reader([lines[0]], delimiter="\t"), [])
    rows: list[tuple[int, list[str]]] = []

    def bad(i: int, why: str) -> None:
        quarantine.append(QuarantineEntry(source, f"index={_first_field(lines[i])} ({name} line {i + 1})",
                                          f"{REASON_MALFORMED}: {why}"))

    pos = 1
    while pos < len(lines):
        reader = csv.reader(itertools.islice(lines, pos, None), delimiter="\t")
        done = 0  # lines this reader has consumed
        while True:
            try:
                row = next(reader)
            except StopIteration:
                pos = len(lines)
                break
            except csv.Error as e:
                bad(pos + done, f"not a TSV row ({e})")
                pos = pos + done + 1
                break
            first, done = pos + done, reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header) or any("\t" in c and "\n" in c for c in row):
                why = (f"{len(row)} fields, the header has {len(header)}" if done - (first - pos) == 1 else
                       f"an unbalanced quote runs this row on over {done - (first - pos) - 1} following line(s)")
                bad(first, f"{why} (read again from the next line)")
                pos = first + 1
                break
            rows.append((first + 1, row))
    return header, rows


def read_mcq_tsv(
    tsv_path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    benchmark: str = "mmbench",
) -> McqResult:
    """Read one benchmark's TSV (module docstring) as ``benchmark``; images are written under
    ``image_dir``. Raises :class:`DatasetNotFoundError` for a missing file, ``ValueError`` (naming
    the file) without the columns."""
    p = Path(tsv_path)
    source = f"mcq.{benchmark}"
    if not p.is_file():
        raise DatasetNotFoundError(f"multiple-choice TSV ({benchmark}) not found: {p}")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text = p.read_bytes().decode("utf-8", errors="surrogateescape")  # bad bytes: per row
    records: list[McqRecord] = []
    quarantine: list[QuarantineEntry] = []
    header, parsed = _tsv_rows(text, p.name, source, quarantine)
    cols = set(header)
    need = {"index", "question", "A", "B", "answer", "image"}
    if header and not need <= cols:
        raise ValueError(f"{p}: not a VLMEvalKit multiple-choice TSV (missing columns {sorted(need - cols)})")
    rows = [(line, dict(zip(header, fields))) for line, fields in parsed]
    letters = sorted(c for c in cols if len(c) == 1 and c.isupper())
    images_by_index = {_cell(r, "index"): _cell(r, "image") for _, r in rows}
    out_dir = Path(image_dir)
    stored: dict[str, str] = {}  # base64 text -> path
    for line, row in rows:
        qid = _cell(row, "index") or f"line{line}"
        rec = f"index={_first_field(qid)} ({p.name} line {line})"  # printable even when not UTF-8
        question = _cell(row, "question")
        options = {k: _cell(row, k) for k in letters if _cell(row, k)}
        answer = _cell(row, "answer").upper()
        why = None
        long = too_long("question with its hint and options", question + _cell(row, "hint") + "".join(options.values()),
                        MAX_QUESTION_CHARS, "MAX_QUESTION_CHARS")
        if long:
            quarantine.append(QuarantineEntry(source, rec, f"{REASON_TOO_LONG}: {long}"))
            continue
        if not _utf8(row):
            why = "not UTF-8 text"
        elif not question:
            why = "empty question"
        elif len(options) < 2:
            why = f"{len(options)} option(s), at least 2 needed"
        elif not answer:
            why = "no answer"
        elif answer not in options:
            why = f"answer {answer!r} is not one of the options {sorted(options)}"
        if why:
            quarantine.append(QuarantineEntry(source, rec, f"{REASON_MALFORMED}: {why}"))
            continue
        b64 = _cell(row, "image")
        if len(b64) <= 64:  # a reference to another row's image
            b64 = images_by_index.get(b64, "")
            if len(b64) <= 64:
                quarantine.append(QuarantineEntry(source, rec, REASON_MISSING_IMAGE))
                continue
        if b64 not in stored:
            try:
                stored[b64] = _store_image(base64.b64decode(b64, validate=True), out_dir)
            except (binascii.Error, ValueError) as e:
                stored[b64] = f"!{REASON_CORRUPT_IMAGE}: not base64 ({e})"
            except CorruptImageError as e:
                stored[b64] = f"!{REASON_CORRUPT_IMAGE}: {e.detail}"
            except ImageError as e:  # too large: declares more than MAX_IMAGE_PIXELS
                stored[b64] = f"!{e.quarantine_reason}"
        path = stored[b64]
        if path.startswith("!"):
            quarantine.append(QuarantineEntry(source, rec, path[1:]))
            continue
        records.append(McqRecord(
            qid=qid,
            image_path=path,
            question=question,
            options=options,
            answer=answer,
            hint=_cell(row, "hint"),
            category=_cell(row, "category"),
            split=_cell(row, "split") or "test",
            benchmark=benchmark,
        ))
    return McqResult(records, quarantine)


def options_text(record: McqRecord) -> str:
    """The options as MMBench prompts list them, one ``"A. text"`` per line."""
    return "\n".join(f"{k}. {v}" for k, v in sorted(record.options.items()))

