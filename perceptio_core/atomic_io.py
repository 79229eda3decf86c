"""The one module for durable local writes and file digests (ARCHITECTURE "storage": write to a
temporary sibling, fsync, rename). A reader that sees a file under its final name sees all of it; a
writer killed at any point leaves at most a temporary sibling (``x.tmp-<pid>-<id>``, or the hidden
``.x.tmp`` of a streaming writer), which nothing trusts and :func:`clean_temp` removes.

Used by the library (shards, checkpoints, metrics), by ``storage`` (artifacts, manifests) and by the
flows (run summaries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

TMP_MARK = ".tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path``, then ``path`` itself (before renaming it into place)."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def hidden_tmp(final: Path) -> Path:
    """The temporary sibling ``.<name>.tmp`` a streaming writer fills before its rename."""
    return final.with_name(f".{final.name}.tmp")


def temp_sibling(path: Path) -> Path:
    """A unique temporary sibling ``<name>.tmp-<pid>-<id>`` of ``path`` (a file or a folder) for a
    writer to fill and rename into place (:func:`is_temp` recognises it)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit fsync and rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, sort_keys: bool = True, indent: int = 2) -> None:
    """``obj`` as JSON (non-JSON values by ``str``), one trailing newline."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def is_temp(name: str) -> bool:
    """A writer's temporary file: ours (``x.tmp-<pid>-<id>``) or a hidden one (``.x.tmp``)."""
    return TMP_MARK in name or name.startswith(".")


def clean_temp(folder: str | os.PathLike[str]) -> int:
    """Remove the temporary leftovers of killed writers in ``folder``; returns how many."""
    n = 0
    folder = Path(folder)
    if not folder.exists():
        return 0
    for p in folder.rglob("*"):
        if p.is_file() and is_temp(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n


def bytes_digest(data: bytes) -> str:
    """sha256 hex digest of ``data`` (the image digest convention: the key of every teacher map)."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, read in chunks (equal to :func:`bytes_digest` of them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
