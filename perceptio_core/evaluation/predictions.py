"""Durable predictions: what evaluation generated, kept in chunks so that a cut evaluation resumes
where it stopped, several processes share the work, and a change to a metric re-scores without
generating again (SPEC §6; the teacher's depth maps are kept the same way).

A :class:`PredictionCache` is a folder of chunks. A chunk is the predictions of one batch, written
when the batch is done: ``<name>.npz`` (the decoded depth maps, float16) first, then ``<name>.json``
(one record a prediction: its key, the answer text, the raw response, the block status, the depth
codes and the first mask as COCO RLE), each atomically; the JSON is the commit, so a chunk whose
JSON exists is whole and a process killed mid-write leaves only a temporary file. Chunk names carry
the process's rank and id, so concurrent writers (data-parallel evaluation) never collide. The cache
lives outside the store, so nothing in it is believed unchecked: a chunk's JSON carries the sha256 of
its predictions and of its ``.npz``, checked when the chunk is first read; a chunk that fails (edited,
truncated, its maps swapped) is moved into ``.quarantine/`` (logged, :attr:`PredictionCache.damaged`)
and its predictions are generated again.

A prediction's key (:func:`prediction_key`) is the sha256 of the model's tag (its weights' key and
the decoding settings: whatever changes the generated text), the image path and the prompt, so a
cache may be shared by every evaluation of the same model: only what differs is generated. What is
read back is a :class:`StoredPrediction` with the fields the scorers read (``text``, ``raw_text``,
``status``, ``depth_indices``, ``mask``, ``depth_map``), equal to what was generated up to the
float16 rounding of the depth map.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perceptio_core.atomic_io import write_bytes, write_text
from perceptio_core.data.masks import decode_mask, encode_mask

FORMAT = 2  # 2: self-verifying chunks (module docstring); chunks of format 1 are ignored (generated again)
_COUNTER = itertools.count()
QUARANTINE = ".quarantine"
log = logging.getLogger(__name__)


def _records_digest(records: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, separators=(",", ":")).encode("utf-8", "surrogatepass")
                          ).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prediction_key(model_tag: str, image: Any, prompt: str) -> str:
    """The cache key of one (model, image, prompt): sha256 hex of the three, the image by its path."""
    h = hashlib.sha256()
    for part in (model_tag, os.fspath(image) if isinstance(image, (str, os.PathLike)) else repr(image), prompt):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class StoredPrediction:
    """A prediction read back from a :class:`PredictionCache` (the scorers' view of a
    :class:`~perceptio_core.model.generation.GenerationResult`)."""

    text: str
    raw_text: str | None
    status: str | None
    depth_indices: list[int] | None
    mask: np.ndarray | None
    depth_map: np.ndarray | None
    error: str | None = None  # why the sample was scored empty (an unreadable image)


def _status(pred: Any) -> str | None:
    st = getattr(pred, "status", None)
    return None if st is None else str(getattr(st, "value", st))


class PredictionCache:
    """The chunks of one folder (module docstring). ``get`` reads what is there (all chunks, loaded
    once and refreshed by :meth:`refresh`); ``put`` writes one chunk."""

    def __init__(self, folder: str | os.PathLike[str], rank: int = 0) -> None:
        self.folder = Path(folder)
        self.rank = int(rank)
        self._records: dict[str, tuple[dict[str, Any], Path]] = {}
        self._seen: set[str] = set()
        self._maps: dict[Path, Any] = {}
        self.damaged: list[tuple[str, str]] = []  # (chunk name, what was wrong): moved aside
        self.refresh()

    def refresh(self) -> int:
        """Read the chunks written since the last refresh (by any process); returns how many
        predictions the cache holds. A chunk of another format is skipped; one that fails its
        digests is moved aside (module docstring); either way its predictions are generated again."""
        if self.folder.is_dir():
            for p in sorted(self.folder.glob("chunk-*.json")):
                if p.name in self._seen:
                    continue
                try:
                    data = json.loads(p.read_text())
                except (OSError, ValueError) as e:
                    self._set_aside(p, f"unreadable JSON ({type(e).__name__})")
                    continue
                if not isinstance(data, dict) or data.get("format") != FORMAT:
                    continue
                why = self._check(p, data)
                if why:
                    self._set_aside(p, why)
                    continue
                self._seen.add(p.name)
                for rec in data["predictions"]:
                    self._records[rec["key"]] = (rec, p.with_suffix(".npz"))
        return len(self._records)

    @staticmethod
    def _check(p: Path, data: dict[str, Any]) -> str | None:
        """What is wrong with a chunk (None: it is whole and as written)."""
        recs = data.get("predictions")
        if not isinstance(recs, list) or not all(isinstance(r, dict) and isinstance(r.get("key"), str) for r in recs):
            return "no list of predictions"
        if data.get("sha256") != _records_digest(recs):
            return "its predictions fail their sha256"
        npz = p.with_suffix(".npz")
        if data.get("npz_sha256") is not None:
            if not npz.is_file():
                return f"{npz.name} is missing"
            if _file_digest(npz) != data["npz_sha256"]:
                return f"{npz.name} fails its sha256"
        return None

    def _set_aside(self, p: Path, why: str) -> None:
        q = self.folder / QUARANTINE
        q.mkdir(exist_ok=True)
        for f in (p, p.with_suffix(".npz")):
            if f.exists():
                os.replace(f, q / f.name)
        self.damaged.append((p.name, why))
        log.warning("prediction chunk %s: %s; moved to %s, its predictions will be generated again", p, why, q)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> StoredPrediction:
        rec, npz = self._records[key]
        depth = None
        if rec.get("depth") is not None:
            if npz not in self._maps:
                self._maps[npz] = np.load(npz, allow_pickle=False)
            depth = self._maps[npz][rec["depth"]].astype(np.float32)
        mask = decode_mask(rec["mask"]).astype(bool) if rec.get("mask") is not None else None
        return StoredPrediction(text=rec["text"], raw_text=rec.get("raw_text"), status=rec.get("status"),
                                depth_indices=rec.get("depth_indices"), mask=mask, depth_map=depth,
                                error=rec.get("error"))  # fmt: skip

    def put(self, items: Iterable[tuple[str, Any]]) -> None:
        """Write the predictions ``(key, prediction)`` as one chunk (module docstring)."""
        records: list[dict[str, Any]] = []
        maps: dict[str, np.ndarray] = {}
        for key, pred in items:
            mask = getattr(pred, "mask", None)
            dmap = getattr(pred, "depth_map", None)
            idx = getattr(pred, "depth_indices", None)
            rec = {"key": key, "text": str(getattr(pred, "text", "") or ""), "raw_text": getattr(pred, "raw_text", None),
                   "status": _status(pred), "depth_indices": None if idx is None else [int(i) for i in idx],
                   "mask": None if mask is None else encode_mask(np.asarray(mask, dtype=bool)),
                   "depth": None, "error": getattr(pred, "error", None)}  # fmt: skip
            if dmap is not None:
                rec["depth"] = f"m{len(maps)}"
                maps[rec["depth"]] = np.asarray(dmap, dtype=np.float16)
            records.append(rec)
        if not records:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"chunk-{self.rank:04d}-{os.getpid()}-{next(_COUNTER):06d}"
        npz_digest = None
        if maps:
            buf = io.BytesIO()
            np.savez(buf, **maps)
            npz_digest = hashlib.sha256(buf.getvalue()).hexdigest()
            write_bytes(self.folder / f"{name}.npz", buf.getvalue())
        write_text(self.folder / f"{name}.json", json.dumps({"format": FORMAT, "predictions": records,
                                                             "sha256": _records_digest(records),
                                                             "npz_sha256": npz_digest}))
        for rec in records:
            self._records[rec["key"]] = (rec, self.folder / f"{name}.npz")
        self._seen.add(f"{name}.json")


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """The items process ``rank`` of ``world`` generates: every ``world``-th, from ``rank``."""
    return list(items[rank::world])


__all__ = ["PredictionCache", "StoredPrediction", "prediction_key", "shard"]
