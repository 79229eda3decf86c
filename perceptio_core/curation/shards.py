"""Streaming, resumable, deterministic WebDataset shards plus a parquet manifest (SPEC §5;
ARCHITECTURE "curate" and "Caching and reruns").

Layout written into one directory (``prefix`` defaults to "samples"):

    samples-000000.tar        samples, as :func:`perceptio_core.curation.sample.to_wds` gives them
    samples-000000.idx.json   that shard's index, written after the shard is complete: size, sha256,
                              and one manifest row per sample (key, ..., byte offset)
    ...
    manifest.parquet          one row per sample (:data:`MANIFEST_SCHEMA`), assembled from the
                              indexes with a streaming ParquetWriter, written last
    quarantine.parquet        (source, record, reason) of every input set aside (:class:`QuarantineLog`)

Guarantees:

- **Atomic**: every file is written to a hidden temp name, fsynced, renamed, and the directory is
  fsynced; a shard is visible only once complete, and trusted only once its index exists (and, by
  default, its size and sha256 match the index).
- **Deterministic**: tar headers carry a fixed mtime, uid/gid 0, empty user/group names and mode
  0444, members are written in sample order (json then image), and shards roll over by a rule that
  depends only on the sample stream; the same stream gives byte-identical shards.
- **Resumable**: a :class:`ShardWriter` opened on a directory of a killed run keeps its complete
  shards, skips that many samples of the (deterministic) stream, checking each skipped key against
  the indexes, and goes on with the next shard number: the result is byte-identical to an
  uninterrupted run. Half-written temp files and shards without an index are deleted, never read.
- **Bounded memory**: only the open shard's manifest rows are held; the manifest is streamed from
  the per-shard indexes, one shard at a time.

Reading: :func:`read_shards` (``webdataset.WebDataset``, in order, json decoded) and
:func:`verify_read_back` (the quality check: shards read back sample for sample equal to the
manifest).

Rollover: a shard is closed before a sample that would take its tar stream (headers, data and the
end-of-archive blocks) past ``max_bytes``, or once it holds ``max_samples`` samples; a single sample
larger than ``max_bytes`` gets a shard of its own. The tar's final record padding (at most 10 KiB)
comes on top.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from perceptio_core.atomic_io import fsync_dir, hidden_tmp, file_digest, write_bytes
from perceptio_core.data.records import QuarantineEntry
from perceptio_core.curation.sample import Sample, from_wds, to_wds

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed so tar bytes never depend on the clock
TAR_FORMAT = tarfile.GNU_FORMAT
INDEX_VERSION = 1

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("task", pa.string()),
        ("image_digest", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("has_mask", pa.bool_()),
        ("has_depth", pa.bool_()),
    ]
)
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("record", pa.string()), ("reason", pa.string())])
# index rows hold every manifest column but "shard" (the index names its shard once)
_ROW_FIELDS = [f.name for f in MANIFEST_SCHEMA if f.name != "shard"]


class ResumeMismatchError(RuntimeError):
    """The sample stream given to a resumed writer differs from the one that wrote the shards."""


@dataclass(frozen=True)
class ShardInfo:
    """A complete shard: ``name`` (file name), sample count, size in bytes and sha256 of the tar."""

    index: int
    name: str
    n_samples: int
    n_bytes: int
    sha256: str


# ------------------------------------------------------------------------------------------
# small file helpers
# ------------------------------------------------------------------------------------------


class _HashingFile(io.RawIOBase):
    """Write-only file wrapper that hashes and counts what passes through (tarfile needs tell)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self._n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self._f.write(mv)
        self._h.update(mv)
        self._n += mv.nbytes
        return mv.nbytes

    def tell(self) -> int:
        return self._n

    def flush(self) -> None:
        self._f.flush()

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


def shard_name(prefix: str, index: int) -> str:
    """``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


def index_name(prefix: str, index: int) -> str:
    """``{prefix}-{index:06d}.idx.json``: the shard's index, present only once the shard is complete."""
    return f"{prefix}-{index:06d}.idx.json"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = TAR_MTIME
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _members(sample: Sample) -> list[tuple[tarfile.TarInfo, bytes]]:
    item = to_wds(sample)
    key = item.pop("__key__")
    return [(_tarinfo(f"{key}.{ext}", len(data)), data) for ext, data in item.items()]


def _member_bytes(ti: tarfile.TarInfo) -> int:
    """Bytes a member takes in the tar stream: header(s) plus data padded to 512-byte blocks."""
    if len(ti.name.encode("utf-8")) <= tarfile.LENGTH_NAME:
        header = tarfile.BLOCKSIZE  # a long name adds a GNU longname member: ask tarfile for those
    else:
        header = len(ti.tobuf(TAR_FORMAT, "utf-8", "surrogateescape"))
    return header + -(-ti.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


# ------------------------------------------------------------------------------------------
# the writer
# ------------------------------------------------------------------------------------------


_W = TypeVar("_W", bound="_ClosesOrAbandons")


class _ClosesOrAbandons(ABC):
    """A writer used as a context manager: ``close()`` (publish) on a clean exit, ``abandon()``
    (nothing renamed into place) when the block raises."""

    @abstractmethod
    def close(self) -> Any:
        """Finish and publish what was written."""

    @abstractmethod
    def abandon(self) -> None:
        """Drop what was written; nothing is renamed into place."""

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


class ShardWriter(_ClosesOrAbandons):
    """Write samples into ``{out_dir}/{prefix}-%06d.tar`` shards, resuming a killed run.

    ``write(sample)`` for each sample of the stream, in order, then ``close()``; or use it as a
    context manager (on an exception the open shard is abandoned as a temp file, never renamed).
    On opening, complete shards of an earlier run are found (:meth:`resume_count` samples); the
    first that many ``write`` calls are checked against their indexes (key and image digest) and
    skipped.
    ``verify=True`` re-hashes existing shards before trusting them.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        prefix: str = "samples",
        max_bytes: int = 256 * 1024 * 1024,
        max_samples: int = 10000,
        verify: bool = True,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = int(max_bytes)
        self.max_samples = int(max_samples)
        self.shards: list[ShardInfo] = self._scan_complete(verify)
        self._resume_total = sum(s.n_samples for s in self.shards)
        self._skip_shard = 0  # which resumed shard the next skipped sample belongs to
        self._skip_keys: list[tuple[str, str]] = []  # (key, image_digest), reversed
        self._skipped = 0
        self._written = 0
        self._tar: tarfile.TarFile | None = None
        self._file: Any = None
        self._hfile: _HashingFile | None = None
        self._rows: list[list[Any]] = []
        self._closed = False

    # -- resume ------------------------------------------------------------------------------
    def _scan_complete(self, verify: bool) -> list[ShardInfo]:
        """Complete shards 0, 1, ... up to the first missing or untrusted one; every other shard,
        index or temp file of this prefix is removed."""
        done: list[ShardInfo] = []
        i = 0
        while True:
            tar_path = self.out_dir / shard_name(self.prefix, i)
            idx_path = self.out_dir / index_name(self.prefix, i)
            info = self._trusted(i, tar_path, idx_path, verify)
            if info is None:
                break
            done.append(info)
            i += 1
        for p in self.out_dir.iterdir():
            name = p.name
            stem = name.lstrip(".")
            if not stem.startswith(f"{self.prefix}-"):
                continue
            if name.startswith(".") and name.endswith(".tmp"):
                p.unlink()  # a temp file of a killed run: never trusted
                continue
            num = stem[len(self.prefix) + 1 :].split(".", 1)[0]
            if num.isdigit() and int(num) >= len(done) and (name.endswith(".tar") or name.endswith(".idx.json")):
                p.unlink()
        return done

    @staticmethod
    def _trusted(i: int, tar_path: Path, idx_path: Path, verify: bool) -> ShardInfo | None:
        if not (tar_path.is_file() and idx_path.is_file()):
            return None
        try:
            idx = json.loads(idx_path.read_text())
            info = ShardInfo(i, tar_path.name, int(idx["n_samples"]), int(idx["n_bytes"]), str(idx["sha256"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if idx.get("version") != INDEX_VERSION or tar_path.stat().st_size != info.n_bytes:
            return None
        if verify and file_digest(tar_path) != info.sha256:
            return None
        return info

    @property
    def resume_count(self) -> int:
        """Samples already in complete shards of an earlier run (skipped by :meth:`write`)."""
        return self._resume_total

    def _check_skipped(self, sample: Sample) -> None:
        if not self._skip_keys:
            shard = self.shards[self._skip_shard]
            idx = json.loads((self.out_dir / index_name(self.prefix, shard.index)).read_text())
            k, d = idx["fields"].index("key"), idx["fields"].index("image_digest")
            self._skip_keys = [(row[k], row[d]) for row in idx["rows"]][::-1]
            self._skip_shard += 1
        expected = self._skip_keys.pop()
        if (sample.key, sample.image_digest) != expected:
            raise ResumeMismatchError(
                f"resuming in {self.out_dir}: sample {self._skipped} of the stream is "
                f"{(sample.key, sample.image_digest)!r} but the existing shards hold {expected!r} there; "
                "the stream changed, use a fresh directory"
            )

    # -- writing -----------------------------------------------------------------------------
    def write(self, sample: Sample) -> None:
        """Append one sample (or skip it, if an earlier run already wrote it)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if self._skipped < self._resume_total:
            self._check_skipped(sample)
            self._skipped += 1
            return
        members = _members(sample)
        size = sum(_member_bytes(ti) for ti, _ in members)
        if self._tar is not None and (
            len(self._rows) >= self.max_samples
            or self._tar.offset + size + 2 * tarfile.BLOCKSIZE > self.max_bytes
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        offset = self._tar.offset
        for ti, data in members:
            self._tar.addfile(ti, io.BytesIO(data))
        self._rows.append(
            [sample.key, sample.source, sample.split, sample.task, sample.image_digest, offset,
             sample.has_mask, sample.has_depth]
        )  # fmt: skip
        self._written += 1

    def _open_shard(self) -> None:
        index = len(self.shards)
        final = self.out_dir / shard_name(self.prefix, index)
        self._file = open(hidden_tmp(final), "wb")
        self._hfile = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hfile, mode="w", format=TAR_FORMAT)  # type: ignore[call-overload]
        self._rows = []

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._hfile is not None
        index = len(self.shards)
        final = self.out_dir / shard_name(self.prefix, index)
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(hidden_tmp(final), final)
        fsync_dir(self.out_dir)
        info = ShardInfo(index, final.name, len(self._rows), self._hfile.tell(), self._hfile.sha256)
        idx = {
            "version": INDEX_VERSION,
            "shard": info.name,
            "n_samples": info.n_samples,
            "n_bytes": info.n_bytes,
            "sha256": info.sha256,
            "fields": _ROW_FIELDS,
            "rows": self._rows,
        }
        write_bytes(
            self.out_dir / index_name(self.prefix, index),
            json.dumps(idx, separators=(",", ":")).encode("utf-8"),
        )
        self.shards.append(info)
        self._tar = self._file = self._hfile = None
        self._rows = []

    def close(self) -> list[ShardInfo]:
        """Finish the open shard and return every complete shard (resumed ones included)."""
        if self._closed:
            return list(self.shards)
        if self._skipped < self._resume_total:
            raise ResumeMismatchError(
                f"the sample stream ended after {self._skipped} samples but the existing shards in "
                f"{self.out_dir} hold {self._resume_total}; the stream changed, use a fresh directory"
            )
        if self._tar is not None and self._rows:
            self._finish_shard()
        self._closed = True
        return list(self.shards)

    def abandon(self) -> None:
        """Stop without finishing the open shard (its temp file stays until the next open)."""
        if self._file is not None:
            self._file.close()
        self._tar = self._file = self._hfile = None
        self._closed = True

    @property
    def n_written(self) -> int:
        """Samples written by this writer (not counting the skipped ones)."""
        return self._written

    @property
    def n_skipped(self) -> int:
        """Samples skipped because an earlier run's complete shards already hold them."""
        return self._skipped


# ------------------------------------------------------------------------------------------
# manifest and quarantine
# ------------------------------------------------------------------------------------------


def write_manifest(
    out_dir: str | os.PathLike[str],
    shards: Sequence[ShardInfo],
    prefix: str = "samples",
    path: str | os.PathLike[str] | None = None,
) -> Path:
    """Assemble ``manifest.parquet`` (one row group per shard) from the shard indexes, atomically.
    Memory: one shard's rows at a time."""
    out_dir = Path(out_dir)
    final = Path(path) if path is not None else out_dir / "manifest.parquet"
    tmp = hidden_tmp(final)
    with pq.ParquetWriter(tmp, MANIFEST_SCHEMA) as writer:
        for s in shards:
            idx = json.loads((out_dir / index_name(prefix, s.index)).read_text())
            cols: dict[str, list[Any]] = {f: [] for f in idx["fields"]}
            for row in idx["rows"]:
                for f, v in zip(idx["fields"], row):
                    cols[f].append(v)
            cols["shard"] = [idx["shard"]] * len(idx["rows"])
            writer.write_table(pa.table({f.name: cols[f.name] for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA))
        if not shards:
            writer.write_table(MANIFEST_SCHEMA.empty_table())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


class QuarantineLog(_ClosesOrAbandons):
    """Streaming (source, record, reason) table written to parquet atomically on :meth:`close`.

    Rows are buffered ``batch_rows`` at a time, so memory stays bounded however many inputs are set
    aside. ``add`` takes a :class:`~perceptio_core.data.records.QuarantineEntry` or the three strings.
    """

    def __init__(self, path: str | os.PathLike[str], batch_rows: int = 4096) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = hidden_tmp(self.path)
        self._writer = pq.ParquetWriter(self._tmp, QUARANTINE_SCHEMA)
        self._buf: list[tuple[str, str, str]] = []
        self._batch = batch_rows
        self.n_rows = 0

    def add(self, entry: QuarantineEntry | str, record: str | None = None, reason: str | None = None) -> None:
        if isinstance(entry, QuarantineEntry):
            row = (entry.source, entry.record, entry.reason)
        else:
            row = (entry, str(record), str(reason))
        self._buf.append(row)
        self.n_rows += 1
        if len(self._buf) >= self._batch:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            src, rec, why = zip(*self._buf)
            self._writer.write_table(
                pa.table({"source": list(src), "record": list(rec), "reason": list(why)}, schema=QUARANTINE_SCHEMA)
            )
            self._buf = []

    def close(self) -> Path:
        """Flush, fsync and rename into place; returns the path."""
        self._flush()
        if self.n_rows == 0:
            self._writer.write_table(QUARANTINE_SCHEMA.empty_table())
        self._writer.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abandon(self) -> None:
        """Drop the table (on failure): nothing is renamed into place."""
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# whole-stream driver and reading back
# ------------------------------------------------------------------------------------------


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike[str],
    prefix: str = "samples",
    max_bytes: int = 256 * 1024 * 1024,
    max_samples: int = 10000,
    verify: bool = True,
) -> list[ShardInfo]:
    """Write (or resume writing) the whole stream, then the manifest; returns the shards.

    The manifest (``manifest.parquet`` in ``out_dir``) is written last, so its presence marks a
    complete shard set.
    """
    (Path(out_dir) / "manifest.parquet").unlink(missing_ok=True)  # only a finished run has one
    with ShardWriter(out_dir, prefix, max_bytes, max_samples, verify) as writer:
        for s in samples:
            writer.write(s)
    shards = writer.close()
    write_manifest(out_dir, shards, prefix)
    return shards


def shard_paths(out_dir: str | os.PathLike[str], shards: Sequence[ShardInfo]) -> list[str]:
    """Absolute paths of the shards, in order (what :func:`read_shards` and training take)."""
    return [str(Path(out_dir).resolve() / s.name) for s in shards]


def read_shards(paths: Sequence[str | os.PathLike[str]]) -> Iterator[Sample]:
    """Samples of the shards, in order, through ``webdataset.WebDataset`` (json decoded, image bytes
    kept as they are)."""
    import webdataset as wds

    urls = [str(p) for p in paths]
    if not urls:
        return
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    for item in ds:
        yield from_wds(item)


def verify_read_back(
    out_dir: str | os.PathLike[str],
    manifest: str | os.PathLike[str] | None = None,
    prefix: str = "samples",
) -> int:
    """Read every shard back through webdataset and check, row by row, that the samples come in the
    manifest's order with its key, source, split, task, image digest and mask/depth flags, and
    that the manifest names exactly the ``{prefix}-*.tar`` shards of ``out_dir``. Streams both
    sides (bounded memory). Returns the number of samples; raises ``ValueError`` at the first
    disagreement."""
    out_dir = Path(out_dir)
    pf = pq.ParquetFile(Path(manifest) if manifest is not None else out_dir / "manifest.parquet")
    shards: list[str] = []
    for batch in pf.iter_batches(columns=["shard"]):
        for name in batch.column(0).to_pylist():
            if not shards or shards[-1] != name:
                shards.append(name)
    on_disk = sorted(p.name for p in out_dir.glob(f"{prefix}-*.tar"))
    if on_disk != shards:
        raise ValueError(f"the manifest names shards {shards[:3]}..., {out_dir} holds {on_disk[:3]}...")
    samples = read_shards([out_dir / n for n in shards])
    n = 0
    for batch in pf.iter_batches():
        for row in batch.to_pylist():
            s = next(samples, None)
            if s is None:
                raise ValueError(f"shards end after {n} samples; the manifest has more (next {row['key']!r})")
            got = (s.key, s.source, s.split, s.task, s.image_digest, s.has_mask, s.has_depth)
            want = tuple(row[k] for k in ("key", "source", "split", "task", "image_digest", "has_mask",
                                          "has_depth"))
            if got != want:
                raise ValueError(f"sample {n}: shards hold {got}, the manifest says {want}")
            n += 1
    extra = next(samples, None)
    if extra is not None:
        raise ValueError(f"shards hold more samples than the manifest (first extra {extra.key!r})")
    return n
