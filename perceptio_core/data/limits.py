"""The size limits every reader checks before it does the work (SPEC §5: bad input is quarantined,
never let through to a later stage that fails on it).

One place for all of them, so a reader and its test name the same number. A record over a limit is
quarantined with the limit named (``"text too long: sentence of 5000000 characters, at most 1024
(MAX_SENTENCE_CHARS)"``); a file over a limit is not opened at all.
"""

from __future__ import annotations

MAX_IMAGE_BYTES = 256 << 20
"""Bytes of one image or annotation image file: a larger file is not read (a bomb, ``/dev/zero``
behind a link, or not an image at all)."""

MAX_IMAGE_PIXELS = 1 << 26
"""Declared pixels (width x height) of one image or annotation PNG, read from its header before
decoding: 67,108,864, e.g. 8192 x 8192. A decompression bomb declares far more; real COCO, ADE20k,
GLaMM and benchmark images have well under 10 million."""

MAX_SENTENCE_CHARS = 1024
"""Characters of one referring expression (a REFER sentence). RefCOCOg's longest are a few hundred."""

MAX_CAPTION_CHARS = 4096
"""Characters of one caption: a COCO caption, a GLaMM grounded caption."""

MAX_TURN_CHARS = 16384
"""Characters of one conversation turn (a LLaVA human or gpt ``value``): several times the longest
turn of the LLaVA-1.5 mix, far under what fine-tuning's context can take."""

MAX_QUESTION_CHARS = 16384
"""Characters of one benchmark question with its hint and options (HardBLINK, multiple-choice, MME)."""

MAX_QUESTION_FILE_BYTES = 1 << 20
"""Bytes of one MME question file (two lines in the release): a larger one is not read."""


def too_long(what: str, text: str, limit: int, name: str) -> str | None:
    """``None`` when ``len(text) <= limit``, else the detail of a "text too long" quarantine entry
    naming the limit: ``"sentence of 5000000 characters, at most 1024 (MAX_SENTENCE_CHARS)"``."""
    if len(text) <= limit:
        return None
    return f"{what} of {len(text)} characters, at most {limit} ({name})"


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (U+D800 to U+DFFF): a ``"\\ud800"`` escape in JSON,
    a pickle's unicode, or a byte that was not UTF-8 (kept as U+DC80 to U+DCFF). Such text cannot
    be written as UTF-8 by any later stage."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
