"""What every sample builder of curation reads and reports (SPEC §5): the image bytes, the image's
teacher map and depth tokens looked up by digest (:func:`lookup`, :func:`image_tokens`), the check
that the depth tokens fit the codebook they were made with (:func:`check_depth_tokens`), and the
counts and quarantine of kept and dropped records (:class:`CurateStats`, the ``REASON_*`` drops).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from perceptio_core.data.image_io import ImageError, confined, read_regular  # noqa: F401 (confined: re-exported)
from perceptio_core.data.limits import MAX_IMAGE_BYTES  # noqa: F401 (re-exported)
from perceptio_core.data.records import (
    REASON_MALFORMED,
    QuarantineEntry,
)
from perceptio_core.curation.sample import Sample

REASON_NO_DEPTH_TOKENS = "no depth tokens"
REASON_BAD_DEPTH_TOKENS = "bad depth tokens"
REASON_EVAL_OVERLAP = "image in a refer val/test split"
REASON_NO_TEACHER_MAP = "no teacher map"
REASON_NO_POINT_SET = "no clear point set"
REASON_NO_IMAGE_FIELD = "text-only conversation (no image)"
REASON_NO_CONVERSATION = "no human/gpt turn"
REASON_NO_GROUNDINGS = "no groundings"
REASON_BAD_RECORD = REASON_MALFORMED

LETTERS = "ABCDEFGH"

# SPEC §5: training samples of each source in the paper's mix (REFER: images, one sample each)
PAPER_COUNTS = {"refcoco": 17_000, "refcoco+": 17_000, "refcocog": 22_000, "ade20k": 60_000,
                "llava": 665_000, "glamm": 214_000}


@dataclass
class CurateStats:
    """Counts of kept samples (by source and split, by task), drops by reason (and by source), and
    skips (records not selected, not bad data). ``on_drop`` receives a QuarantineEntry per drop."""

    samples: Counter = field(default_factory=Counter)  # (source, split) -> n
    tasks: Counter = field(default_factory=Counter)  # task -> n
    dropped: Counter = field(default_factory=Counter)  # reason -> n
    dropped_by_source: Counter = field(default_factory=Counter)  # (source, reason) -> n
    skipped: Counter = field(default_factory=Counter)  # reason -> n
    on_drop: Callable[[QuarantineEntry], None] | None = None

    def kept(self, sample: Sample) -> None:
        self.samples[(sample.source, sample.split)] += 1
        self.tasks[sample.task] += 1

    def drop(self, source: str, record: str, reason: str) -> None:
        """Count a drop under its reason's label (the part before ": <detail>"); the quarantine
        entry keeps the full reason."""
        label = reason.split(": ", 1)[0]
        self.dropped[label] += 1
        self.dropped_by_source[(source, label)] += 1
        if self.on_drop is not None:
            self.on_drop(QuarantineEntry(source=source, record=record, reason=reason))

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    @property
    def n_samples(self) -> int:
        return sum(self.samples.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able, sorted."""
        by_source: dict[str, dict[str, int]] = defaultdict(dict)
        for (src, split), n in sorted(self.samples.items()):
            by_source[src][split] = n
        drop_src: dict[str, dict[str, int]] = defaultdict(dict)
        for (src, reason), n in sorted(self.dropped_by_source.items()):
            drop_src[src][reason] = n
        return {
            "samples_total": self.n_samples,
            "samples": dict(by_source),
            "tasks": dict(sorted(self.tasks.items())),
            "dropped_total": sum(self.dropped.values()),
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_by_source": dict(drop_src),
            "skipped": dict(sorted(self.skipped.items())),
            "paper_counts": self.paper_counts(),
        }

    def paper_counts(self) -> dict[str, dict[str, int]]:
        """``{source: {"train": our train samples, "paper": the paper's count}}`` for every source
        of :data:`PAPER_COUNTS` that gave samples (on the synthetic world the numbers are tiny; on
        the real datasets they should be close to the paper's)."""
        out: dict[str, dict[str, int]] = {}
        for src, paper in PAPER_COUNTS.items():
            n = self.samples.get((src, "train"), 0)
            if any(s == src for s, _ in self.samples):
                out[src] = {"train": int(n), "paper": paper}
        return out


def lookup(store: Any, digest: str) -> Any:
    """``store[digest]`` for a dict, a ``DepthMaps`` (``in`` + ``get``) or any Mapping; None if absent."""
    if store is None or not digest:
        return None
    if digest not in store:
        return None
    return store.get(digest) if hasattr(store, "get") else store[digest]


def image_tokens(store: Any, digest: str) -> tuple[list[int] | None, str | None]:
    """The image's depth tokens as a list of ints, or (None, drop reason)."""
    arr = lookup(store, digest)
    if arr is None:
        return None, REASON_NO_DEPTH_TOKENS
    a = np.asarray(arr)
    if a.size == 0 or not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
        return None, REASON_BAD_DEPTH_TOKENS
    return a.reshape(-1).tolist(), None  # a [g, g] grid is read row-major, as SPEC §1 orders it


class DepthTokensMismatch(ValueError):
    """Depth tokens that do not fit the depth codebook: not N codes per image, or codes outside
    [0, K) (tokens of another codebook). The message names where the tokens came from."""


def check_depth_tokens(depth_tokens: Mapping[str, np.ndarray], num_tokens: int, codebook_size: int,
                       source: str) -> None:
    """Every image's depth tokens are ``num_tokens`` (N) integer codes in [0, ``codebook_size``)
    (K), as a [N] or [g, g] array; N and K are the codebook artifact's. Raises
    :class:`DepthTokensMismatch` naming ``source``, how many images fail and the first of them."""
    bad: list[tuple[str, str]] = []
    for digest, arr in depth_tokens.items():
        a = np.asarray(arr)
        if not np.issubdtype(a.dtype, np.integer):
            bad.append((digest, f"dtype {a.dtype}"))
        elif a.size != num_tokens:
            bad.append((digest, f"{a.size} codes"))
        elif a.size and (int(a.min()) < 0 or int(a.max()) >= codebook_size):
            bad.append((digest, f"codes in [{int(a.min())}, {int(a.max())}]"))
    if bad:
        digest, what = bad[0]
        raise DepthTokensMismatch(
            f"{source}: the depth tokens of {len(bad)} of {len(depth_tokens)} images do not fit the codebook "
            f"(N = {num_tokens} codes in [0, {codebook_size}) each); image {digest} has {what}"
        )


REASON_OUTSIDE_ROOT = "image path outside the image root"


def read_bytes(path: str | os.PathLike[str]) -> bytes | None:
    """A regular file's bytes, or None: missing, unreadable, not a regular file (a FIFO or a device
    such as ``/dev/zero`` is never opened), or larger than :data:`MAX_IMAGE_BYTES`
    (:func:`perceptio_core.data.image_io.read_regular`)."""
    try:
        return read_regular(path)
    except ImageError:
        return None
