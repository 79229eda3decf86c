"""Teacher depth maps on disk (SPEC §2): durable chunks keyed by image digest.

A folder of chunks ``maps-%06d.npy`` ([n, S, S] float16, per-image min-max normalised relative depth
in [0, 1], larger = nearer) with a sidecar ``maps-%06d.json`` (the chunk's image digests, the raw
range each normalisation removed, and the images that failed with their reason). The sidecar is
written after its array, each through an atomic rename, so a chunk whose sidecar exists is whole: a
killed run resumes at the first chunk without one (:func:`perceptio_core.depth.teacher.write_teacher_maps`
runs the teacher over a corpus that way). Reading is lazy (memory-mapped), so a corpus of any size is
never loaded whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

CHUNK_FMT = "maps-{:06d}"


def chunk_plan(digests: Sequence[str], chunk_size: int) -> list[list[str]]:
    """Split the (sorted) digests into chunks of ``chunk_size``: the same plan on every rerun."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    ds = sorted(digests)
    return [ds[i : i + chunk_size] for i in range(0, len(ds), chunk_size)]


def write_chunk(
    folder: str | os.PathLike,
    index: int,
    digests: Sequence[str],
    maps: np.ndarray,
    raw_ranges: Sequence[tuple[float, float]],
    errors: dict[str, str],
    atomic_writer: Callable[[str, str], object],
) -> None:
    """Write chunk ``index``: ``maps`` [n, S, S] for ``digests`` (in order), plus the failed ones.

    ``atomic_writer(name, mode)`` opens a file of ``folder`` that appears only once complete (the
    artifact writer's ``atomic``); the array goes first, the sidecar last.
    """
    if len(digests) != len(maps) or len(raw_ranges) != len(maps):
        raise ValueError("write_chunk: digests, maps and raw_ranges differ in length")
    name = CHUNK_FMT.format(index)
    arr = np.ascontiguousarray(np.asarray(maps, dtype=np.float16))
    with atomic_writer(name + ".npy", "wb") as f:
        np.save(f, arr)
    side = {
        "digests": list(digests),
        "raw_ranges": [[float(a), float(b)] for a, b in raw_ranges],
        "errors": dict(errors),
        "shape": list(arr.shape),
    }
    with atomic_writer(name + ".json", "w") as f:
        json.dump(side, f)


def done_chunks(folder: str | os.PathLike) -> set[int]:
    """Indices of the complete chunks in ``folder`` (those whose sidecar exists)."""
    out = set()
    for p in Path(folder).glob("maps-*.json"):
        try:
            out.add(int(p.stem.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return out


class DepthMaps:
    """Lazy read access to a folder of chunks: by digest, by position, or batch by batch."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._chunks: list[np.ndarray | None] = []
        self._pos: dict[str, tuple[int, int]] = {}
        self.raw_range: dict[str, tuple[float, float]] = {}
        self.errors: dict[str, str] = {}
        self._order: list[str] = []
        sidecars = sorted(self.folder.glob("maps-*.json"))
        if not sidecars:
            raise FileNotFoundError(f"no depth-map chunks in {self.folder}")
        for ci, side in enumerate(sidecars):
            meta = json.loads(side.read_text())
            for j, d in enumerate(meta["digests"]):
                self._pos[d] = (ci, j)
                self._order.append(d)
                self.raw_range[d] = tuple(meta["raw_ranges"][j])
            self.errors.update(meta.get("errors", {}))
            self._chunks.append(None)
        self._paths = [s.with_suffix(".npy") for s in sidecars]
        first = self._chunk(0) if self._order else None
        self.map_size = int(first.shape[-1]) if first is not None and len(first) else 0

    def _chunk(self, ci: int) -> np.ndarray:
        arr = self._chunks[ci]
        if arr is None:
            arr = np.load(self._paths[ci], mmap_mode="r")
            self._chunks[ci] = arr
        return arr

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, digest: str) -> bool:
        return digest in self._pos

    @property
    def digests(self) -> list[str]:
        return list(self._order)

    def get(self, digest: str) -> np.ndarray:
        """The map of one image, float32 [S, S]."""
        ci, j = self._pos[digest]
        return np.asarray(self._chunk(ci)[j], dtype=np.float32)

    def __getitem__(self, idx: int | np.ndarray | Sequence[int]) -> np.ndarray:
        """By position in :attr:`digests`: one map [S, S] or a stack [n, S, S] (float32)."""
        if isinstance(idx, (int, np.integer)):
            return self.get(self._order[int(idx)])
        return np.stack([self.get(self._order[int(i)]) for i in idx]) if len(idx) else np.zeros(
            (0, self.map_size, self.map_size), np.float32
        )

    def stack(self, digests: Sequence[str]) -> np.ndarray:
        """The maps of ``digests``, in that order: float32 [n, S, S]."""
        if not digests:
            return np.zeros((0, self.map_size, self.map_size), np.float32)
        return np.stack([self.get(d) for d in digests])

    def batches(self, digests: Sequence[str], batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(digests, maps [n, S, S] float32)`` of ``digests`` in order, ``batch_size`` at a time."""
        for i in range(0, len(digests), batch_size):
            ds = list(digests[i : i + batch_size])
            yield ds, np.stack([self.get(d) for d in ds])
