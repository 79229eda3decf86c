"""A restricted unpickler for the REFER refs files (SPEC §5: RefCOCO/+/g ship as pickles).

``refs(unc).p`` and friends are pickles of plain data: a list of dicts of strings, numbers and
lists. Loading such data never needs a global, so :func:`safe_load` refuses *every* global (and every
persistent id): ``find_class`` is where a malicious pickle would fetch ``os.system`` or any other
callable, and with nothing to fetch no code can run. A refusal raises :class:`UnsafePickleError`
naming the file and the refused global.

Python 2 pickles (the public REFER files are protocol 2) store byte strings as ``str``; each is
decoded as UTF-8 on its own, a byte that is not UTF-8 kept as a lone surrogate (U+DC80 to U+DCFF,
``errors="surrogateescape"``), so one bad string spoils only itself: the reader quarantines the
record holding it (:func:`perceptio_core.data.limits.has_lone_surrogate`) and every other string
keeps its text (no Latin-1 mojibake of the whole file). Loading builds containers without
recursion, so a pickle nesting lists 200,000 deep loads; its readers must not recurse into it.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a global (a class or function) or a persistent id: refused."""


class PickleReadError(pickle.UnpicklingError):
    """The data is not a readable pickle (truncated, corrupt, not a pickle)."""


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and scalars and nothing else."""

    def __init__(self, file: io.BytesIO, source: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding, errors="surrogateescape")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self._source}: refused global '{_short(module)}.{_short(name)}': only plain data (lists, "
            "dicts, strings, numbers) may be loaded; this pickle would import and call code"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(  # the id by its type only: a repr could recurse or run long
            f"{self._source}: refused a persistent id (a {type(pid).__name__}): only plain data may be loaded")


def _short(text: Any, n: int = 80) -> str:
    """A name from the pickle, for a message: at most ``n`` characters, non-printable ones escaped."""
    s = text if isinstance(text, str) else type(text).__name__
    s = s.encode("ascii", "backslashreplace").decode("ascii")
    return s if len(s) <= n else s[:n] + "..."


def safe_load(path_or_bytes: str | os.PathLike[str] | bytes, name: str | None = None) -> Any:
    """Load a pickle of plain data from a path or from bytes; refuse any global.

    ``name`` labels bytes in error messages (default ``"<bytes>"``; a path names itself).
    Raises :class:`UnsafePickleError` when the pickle references any global or persistent id,
    :class:`PickleReadError` when it is not a readable pickle, ``FileNotFoundError`` for a missing path.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        source = name or "<bytes>"
    else:
        source = str(path_or_bytes)
        data = Path(path_or_bytes).read_bytes()
    try:
        return _PlainDataUnpickler(io.BytesIO(data), source, "utf-8").load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, MemoryError, RecursionError) as e:
        raise PickleReadError(f"{source}: not a readable pickle ({type(e).__name__}: {_short(str(e), 200)})") from e
