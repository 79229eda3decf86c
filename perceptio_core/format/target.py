"""The target text of a sample and the parser of a generation (SPEC §1, §6 "honest counting").

Layout of a target (one function writes it, one parses it, for curation, training and inference):

    [SEG]<d_start><d_12><d_7>...<d_end> answer text

Spacing, decided here once:

- The perception tokens are written **with no separator between them**. Each is one added token, so
  the span between ``<d_start>`` and ``<d_end>`` is exactly the N code tokens (what L_token, L_count
  and constrained decoding of SPEC §1/§3 assume); a space between them would become extra tokens
  inside the span with most tokenizers.
- One space separates the block from the answer. The block precedes the answer.
- A sample without depth tokens but with a mask writes ``[SEG] answer``; a depth-only sample (the
  depth chain-of-thought of SPEC §6) writes the block without ``[SEG]``: ``<d_start>...<d_end> (A)``;
  a text-only sample is its answer alone (no block).
- Several objects, several ``[SEG]`` (SPEC §1): in a multi-round conversation each round's target is
  its own ``format_target``; round 1 carries the depth block (``[SEG]<d_start>...<d_end> answer``),
  later rounds only ``[SEG] answer``. A grounded caption (GLaMM GCG, :func:`format_grounded`) puts
  the depth block first, then the caption with ``" [SEG]"`` right after each grounded phrase:
  ``<d_start>...<d_end> A red cube [SEG] beside a ball [SEG].`` The k-th ``[SEG]`` of a sequence
  is the k-th mask of its sample.

The parser tolerates what a model may emit: whitespace anywhere between tokens, text before the
block, ``[SEG]`` missing or misplaced, missing markers, a wrong number of codes, codes out of range.
Its :class:`ParseStatus` says which; ``depth_indices`` is set only when the block is well formed, so
an evaluator can score every other case as an empty depth / wrong answer instead of dropping it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from perceptio_core.format.tokens import D_END, D_START, SEG, depth_token


class ParseStatus(str, enum.Enum):
    """How well formed a generation's perception block is (first failing check wins)."""

    OK = "ok"  # [SEG] (or a depth-only block when expect_seg is False) and a well-formed block
    NO_SEG = "no_seg"  # well-formed depth block but no [SEG]
    NO_BLOCK = "no_block"  # neither <d_start> nor <d_end> (text-only, or "[SEG] answer")
    MISSING_START = "missing_start"  # <d_end> without a <d_start> before it
    MISSING_END = "missing_end"  # <d_start> without a <d_end> after it
    BAD_CODE = "bad_code"  # something other than a code in the block, or a code >= K
    WRONG_COUNT = "wrong_count"  # well-formed codes, but not N of them

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Parsed:
    """A parsed generation.

    has_seg: a ``[SEG]`` token occurs anywhere in the text.
    depth_indices: the N code indices when the block is well formed (status ok or no_seg), else None.
    answer: the text outside the block with every perception token removed, whitespace-trimmed.
    status: see :class:`ParseStatus`.
    raw_codes: every in-range code index found inside the (possibly malformed) block, in order, for
        diagnostics and for callers that pad/truncate to N on purpose.
    n_seg: how many ``[SEG]`` tokens the text holds (one mask each).
    """

    has_seg: bool
    depth_indices: list[int] | None
    answer: str
    status: ParseStatus
    raw_codes: list[int] = field(default_factory=list)
    n_seg: int = 0


def format_block(has_seg: bool, depth_tokens: Sequence[int] | None) -> str:
    """The perception block alone: ``[SEG]`` if ``has_seg`` then ``<d_start><d_i>...<d_end>`` if
    ``depth_tokens`` is given; ``""`` when neither."""
    parts = [SEG] if has_seg else []
    if depth_tokens is not None:
        codes = [int(t) for t in depth_tokens]
        if not codes:
            raise ValueError("depth_tokens is empty: pass None for a sample without depth")
        if min(codes) < 0:
            raise ValueError("depth token indices must be >= 0")
        parts.append(D_START + "".join(depth_token(c) for c in codes) + D_END)
    return "".join(parts)


def format_target(has_seg: bool, depth_tokens: Sequence[int] | None, answer: str) -> str:
    """The training target: perception block, one space, answer (see the module docstring).

    ``format_target(True, [12, 7], "A red cup.")`` -> ``"[SEG]<d_start><d_12><d_7><d_end> A red cup."``
    """
    block = format_block(has_seg, depth_tokens)
    answer = answer.strip()
    if not block:
        return answer
    return f"{block} {answer}" if answer else block


def format_grounded(
    caption: str, spans: Sequence[tuple[int, int]], depth_tokens: Sequence[int] | None = None
) -> tuple[str, list[int]]:
    """A grounded caption's target (GLaMM GCG): the depth block when given, one space, then the
    caption with ``" [SEG]"`` inserted right after each phrase span ``(start, end)`` (character
    offsets into ``caption``, end exclusive).

    Spans are taken in order of their start; a span that overlaps an earlier kept one, or falls
    outside the caption, is skipped. Returns ``(target, kept)``: ``kept`` the indices into
    ``spans`` of the phrases that got a ``[SEG]``, in ``[SEG]`` order (the order of the masks).

    ``format_grounded("A cube near a ball.", [(0, 6), (12, 18)])`` ->
    ``("A cube [SEG] near a ball [SEG].", [0, 1])``
    """
    order = sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1]))
    kept: list[int] = []
    pieces: list[str] = []
    pos = 0
    for i in order:
        start, end = int(spans[i][0]), int(spans[i][1])
        if start < pos or end <= start or end > len(caption):
            continue
        pieces.append(caption[pos:end] + " " + SEG)
        pos = end
        kept.append(i)
    pieces.append(caption[pos:])
    text = "".join(pieces).strip()
    block = format_block(False, depth_tokens)
    return (f"{block} {text}" if block else text), kept


_BLOCK_RE = re.compile(re.escape(D_START) + r".*?" + re.escape(D_END), re.S)


def drop_perception(target: str, seg: bool = True, depth: bool = True) -> str:
    """A target with the perception signals that are off taken out (the paper's ablations, §4.2):
    ``seg=False`` removes every ``[SEG]`` (with the space before it), ``depth=False`` the depth
    block ``<d_start>...<d_end>``; the ends are stripped. What is left is the target
    :func:`format_target` / :func:`format_grounded` would write without that signal.

    ``drop_perception("[SEG]<d_start><d_3><d_end> A cup.", seg=False)`` -> ``"<d_start><d_3><d_end> A cup."``
    """
    if not depth:
        target = _BLOCK_RE.sub("", target)
    if not seg:
        target = _SEG_RE.sub("", target)
    return target.strip()


# one alternation: the special tokens, then anything that looks like a depth code (well formed or not)
_TOKEN_RE = re.compile(
    re.escape(SEG) + "|" + re.escape(D_START) + "|" + re.escape(D_END) + r"|<d_([^<>\s]*)>"
)


_SEG_RE = re.compile(r"[ \t]*" + re.escape(SEG))  # "a cube [SEG] near" -> "a cube near"


def _strip_tokens(*pieces: str) -> str:
    """Join text pieces with every perception token removed; each piece is trimmed and the non-empty
    ones are joined by one space (the answer's inner whitespace, newlines included, is kept)."""
    kept = [_TOKEN_RE.sub("", _SEG_RE.sub("", p)).strip() for p in pieces]
    return " ".join(k for k in kept if k)


def parse_generation(
    text: str,
    num_tokens: int,
    codebook_size: int,
    expect_seg: bool = True,
) -> Parsed:
    """Parse a generated (or target) text into its parts.

    ``num_tokens`` is N, ``codebook_size`` is K: the depth codec's (a model's ``num_depth_tokens``
    and ``codebook_size``), never assumed here. With ``expect_seg=False`` (depth-only tasks) a
    well-formed block without ``[SEG]`` is ``ok`` instead of ``no_seg``. The block is the first
    ``<d_start>`` and the first ``<d_end>`` after it; everything between them must be codes
    ``<d_k>`` with ``0 <= k < K`` (whitespace allowed), exactly N of them.
    """
    has_seg = SEG in text
    n_seg = text.count(SEG)
    start = text.find(D_START)
    end = text.find(D_END, start + len(D_START)) if start >= 0 else text.find(D_END)
    if start < 0 and end < 0:
        return Parsed(has_seg, None, _strip_tokens(text), ParseStatus.NO_BLOCK, n_seg=n_seg)
    if start < 0:
        return Parsed(has_seg, None, _strip_tokens(text), ParseStatus.MISSING_START, n_seg=n_seg)

    inner_from = start + len(D_START)
    if end < 0:
        # no <d_end>: the codes run until the first thing that is not a code; the rest is the answer
        codes, _, stop = _scan_codes(text[inner_from:], codebook_size, stop_early=True)
        answer = _strip_tokens(text[:start], text[inner_from + stop :])
        return Parsed(has_seg, None, answer, ParseStatus.MISSING_END, codes, n_seg=n_seg)
    codes, bad, _ = _scan_codes(text[inner_from:end], codebook_size, stop_early=False)
    answer = _strip_tokens(text[:start], text[end + len(D_END) :])
    if bad:
        return Parsed(has_seg, None, answer, ParseStatus.BAD_CODE, codes, n_seg=n_seg)
    if len(codes) != num_tokens:
        return Parsed(has_seg, None, answer, ParseStatus.WRONG_COUNT, codes, n_seg=n_seg)
    status = ParseStatus.OK if (has_seg or not expect_seg) else ParseStatus.NO_SEG
    return Parsed(has_seg, codes, answer, status, codes, n_seg=n_seg)


def _scan_codes(inner: str, codebook_size: int, stop_early: bool) -> tuple[list[int], bool, int]:
    """Scan the inside of a block. Returns (in-range codes, whether anything else was found, the
    offset where scanning stopped). With ``stop_early`` the scan ends at the first non-code."""
    codes: list[int] = []
    bad = False
    pos = 0
    for m in _TOKEN_RE.finditer(inner):
        if inner[pos : m.start()].strip():
            bad = True  # free text inside the block
            if stop_early:
                return codes, bad, pos
        digits = m.group(1)
        if digits is not None and digits.isdigit() and int(digits) < codebook_size:
            codes.append(int(digits))
        else:  # [SEG] or a second marker inside the block, <d_x>, or a code >= K
            bad = True
            if stop_early:
                return codes, bad, pos
        pos = m.end()
    if inner[pos:].strip():
        bad = True
    return codes, bad, pos
