"""Atomic file writes on local disk: write to a temporary sibling, fsync, rename.

A reader that sees a file under its final name sees all of it; a writer killed at any point leaves
at most a ``*.tmp-*`` sibling, which nothing trusts and :func:`clean_temp` removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

from perceptio_core.atomic_io import fsync_dir

TMP_MARK = ".tmp-"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit fsync and rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write (by any library) that becomes ``path`` on a clean exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} (for {path})")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def is_temp(name: str) -> bool:
    """A writer's temporary file: ours (``x.tmp-<pid>-<id>``) or a hidden one (``.x.tmp``)."""
    return TMP_MARK in name or name.startswith(".")


def clean_temp(folder: str | os.PathLike) -> int:
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
