"""Durable local writes: fsync a file or folder, write a file through a temporary sibling and an
atomic rename, so a reader never sees half a file and a killed writer leaves only a temporary."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


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
    """The temporary sibling ``.<name>.tmp`` a file is written to before its rename."""
    return final.with_name(f".{final.name}.tmp")


def write_bytes_atomic(final: Path, data: bytes) -> None:
    tmp = hidden_tmp(final)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_json_atomic(final: Path, obj: Any, **json_kw: Any) -> None:
    write_bytes_atomic(final, json.dumps(obj, **json_kw).encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
