"""Released checkpoints named by the config: found before anything runs, keyed on their content.

A stage that loads a checkpoint named in the config (``teacher.checkpoint``, ``model.base``,
``model.tokenizer``, ``model.sam2_checkpoint``) folds :func:`checkpoint_fingerprint` of it into
its cache key (``StageSpec.fingerprint``), so:

* a path that does not exist stops the run when the keys are computed, before the first stage,
  with the config key, the path and the ``--set`` that changes it (not hours later, when the stage
  that loads it starts);
* a checkpoint replaced under the same path re-keys what was trained from it (the content
  of every file in it, not its name), and a hub id is keyed on its name;
* ``model.base`` in OpenGVLab's own layout (``InternVLChatModel``, remote code) is refused with
  the ``perceptio convert-internvl`` command that converts it.

Content digests of large files (an 8B base is 16 GB) are cached in ``<workdir>/cache`` by path,
size and modification time, so a checkpoint is read once, not on every run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from perceptio_core.atomic_io import file_digest, write_json
from perceptio_core.config import ConfigError, PerceptioConfig
from storage.keys import digest_text

DIGEST_CACHE = "checkpoint-digests.json"


def is_local(value: str) -> bool:
    """A value that names a local path (absolute, relative with ./ or ../, or ~) rather than a hub id."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def require(key: str, value: str, kind: str = "folder") -> Path:
    """The local checkpoint ``value`` of config ``key`` as a path; ``FileNotFoundError`` naming the
    key, the path and the ``--set`` that changes it when it is missing or not a ``kind``
    ("folder" or "file")."""
    path = Path(value).expanduser()
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        what = "does not exist" if not path.exists() else f"is not a {kind}"
        raise FileNotFoundError(f"{key} {path} {what}: point it at the checkpoint with --set {key}=PATH")
    return path


def _cached_file_digest(path: Path, cache: dict[str, list]) -> str:
    st = path.stat()
    entry = cache.get(str(path))
    if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
        return str(entry[2])
    digest = file_digest(path)
    cache[str(path)] = [st.st_size, st.st_mtime_ns, digest]
    return digest


def content_digest(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 over the relative names and content digests of every file under ``path`` (or of the
    file ``path``), hidden files and temporaries left out; file digests cached in ``cache_dir``."""
    cache_file = cache_dir / DIGEST_CACHE if cache_dir is not None else None
    cache: dict[str, list] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}  # a damaged cache is only a cache: recompute
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    before = dict(cache)
    parts = [f"{f.relative_to(path) if f != path else f.name}:{_cached_file_digest(f.resolve(), cache)}" for f in files]
    if cache_file is not None and cache != before:  # written only when a file was (re)read
        os.makedirs(cache_file.parent, exist_ok=True)
        write_json(cache_file, cache)
    return digest_text(*parts)


def checkpoint_fingerprint(key: str, value: str | None, workdir: Path, kind: str = "folder") -> str:
    """Key material of one configured checkpoint: ``"none"``, ``"hub:<id>"`` or ``"content:<sha256>"``
    (missing local paths raise, see :func:`require`)."""
    if not value:
        return "none"
    if not is_local(value):
        return f"hub:{value}"
    path = require(key, value, kind)
    return "content:" + content_digest(path, Path(workdir) / "cache")


def model_fingerprint(cfg: PerceptioConfig, workdir: Path) -> str:
    """The released checkpoints fine-tuning loads (``model.base``, ``model.tokenizer``,
    ``model.sam2_checkpoint``), each checked and keyed on its content; ``model.base`` must be in
    the transformers layout (:func:`perceptio_core.model.convert.checkpoint_layout`)."""
    m = cfg.model
    if m.base and is_local(m.base):
        from perceptio_core.model.convert import checkpoint_layout

        base = require("model.base", m.base)
        try:
            layout = checkpoint_layout(base)
        except ValueError as e:
            raise ConfigError(f"model.base: {e}") from e
        if layout != "native":
            raise FileNotFoundError(
                f"model.base {base} is in OpenGVLab's own layout (InternVLChatModel, remote code): convert it "
                f"once with `perceptio convert-internvl {base} {base}-converted` and --set model.base={base}-converted"
            )
    return digest_text(
        checkpoint_fingerprint("model.base", m.base, workdir),
        checkpoint_fingerprint("model.tokenizer", m.tokenizer, workdir),
        checkpoint_fingerprint("model.sam2_checkpoint", m.sam2_checkpoint, workdir, kind="file"),
    )


__all__ = ["checkpoint_fingerprint", "content_digest", "is_local", "model_fingerprint", "require"]
