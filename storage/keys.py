"""Cache keys: what makes a stage's artifact the same artifact (ARCHITECTURE.md, caching).

key = sha256(stage name, digest of the code the stage depends on, its resolved config sections,
the keys of its upstream artifacts). Inputs are small (text), never tensors or paths: a changed file
under the same path changes its content digest, and so the key.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Iterable

KEY_LEN = 20  # hex characters shown and used as folder names (80 bits)


def digest_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def code_digest(files: Iterable[str | Path]) -> str:
    """Digest of the given source files' bytes (sorted by path relative to their package root)."""
    h = hashlib.sha256()
    for f in sorted(Path(x) for x in files):
        h.update(f"{f.parent.name}/{f.name}".encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def stage_key(stage: str, code: str, config: Any, upstream: dict[str, str]) -> str:
    """The cache key of one stage run."""
    return digest_text(stage, code, canonical(config), canonical(sorted(upstream.items())))[:KEY_LEN]


def git_commit(path: str | Path) -> str | None:
    """The checkout's commit (with ``+dirty`` when it has changes), or None outside git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None
