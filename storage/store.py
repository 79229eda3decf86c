"""The artifact store: content-addressed, atomic, local by default, any fsspec URL for clusters.

Layout under the store root::

    <root>/<stage>/<key>/manifest.json     # written last: an artifact exists iff its manifest does
    <root>/<stage>/<key>/<files...>
    <root>/<stage>/.staging-<key>/...      # a writer's durable work in progress (local stores)

``key`` is the stage's cache key (see :mod:`storage.keys`): a digest of the stage's name, its code,
its resolved config section and its upstream keys, so equal inputs give the same address.

Atomicity. On a local store a writer fills ``.staging-<key>/`` (every file through an atomic
rename), writes the manifest into it, then renames the whole folder to ``<key>/``: a reader sees
either nothing or the complete artifact. The staging folder survives a kill, which is what lets a
long stage resume: files already in it are complete by construction. On a remote (fsspec) store the
files are staged on local disk, uploaded, and the manifest is uploaded last; readers trust only an
artifact whose manifest exists and whose listed files have the listed sizes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import fsspec

from perceptio_core.atomic_io import atomic_open, clean_temp, file_digest, fsync_dir, is_temp, write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class StoreError(RuntimeError):
    """The store holds no such artifact, or an artifact fails its integrity check."""


@dataclass
class Manifest:
    """What an artifact is and where it came from (ARCHITECTURE.md, storage)."""

    stage: str
    key: str
    url: str
    inputs: dict[str, str] = field(default_factory=dict)  # upstream stage -> upstream key
    input_urls: dict[str, str] = field(default_factory=dict)  # upstream stage -> store URL
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config sections it read
    config_digest: str = ""
    code: dict[str, Any] = field(default_factory=dict)  # {"digest", "files", "git_commit"}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {size, sha256}
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    quarantine: dict[str, Any] = field(default_factory=dict)  # {"count", "reasons", "entries"}
    produced_by: dict[str, Any] = field(default_factory=dict)  # run id, flow run id, host, ...
    created_at: float = 0.0
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class ArtifactStore:
    """A store rooted at a local path or an fsspec URL (``s3://bucket/perceptio``, ``gs://...``).

    ``cache_dir`` is local scratch for remote stores (downloaded files, staged uploads).
    """

    def __init__(self, url: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        url = str(url)
        self.fs, root = fsspec.core.url_to_fs(url)
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        if self.local:
            root = str(Path(root).resolve())
            Path(root).mkdir(parents=True, exist_ok=True)
        self.root = root.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "perceptio"

    # ---- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._uri(self.root)

    def _uri(self, path: str) -> str:
        if self.local:
            return Path(path).as_uri()
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{proto}://{path}"

    def artifact_path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def artifact_url(self, stage: str, key: str) -> str:
        """The artifact's URL: also its Prefect asset key."""
        return self._uri(self.artifact_path(stage, key))

    # ---- reading ---------------------------------------------------------------------------
    def has(self, stage: str, key: str) -> bool:
        """True when a complete artifact exists (its manifest is present and readable)."""
        try:
            self.manifest(stage, key)
        except StoreError:
            return False
        return True

    def manifest(self, stage: str, key: str) -> Manifest:
        path = f"{self.artifact_path(stage, key)}/{MANIFEST}"
        try:
            with self.fs.open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError as e:
            raise StoreError(f"no artifact {stage}/{key} in {self.url}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"artifact {stage}/{key}: unreadable manifest ({e})") from e
        return Manifest.from_dict(data)

    def verify(self, stage: str, key: str, digests: bool = False) -> Manifest:
        """Check that every listed file exists with its size (and sha256 with ``digests``)."""
        m = self.manifest(stage, key)
        base = self.artifact_path(stage, key)
        for name, info in m.files.items():
            p = f"{base}/{name}"
            try:
                size = self.fs.size(p)
            except FileNotFoundError as e:
                raise StoreError(f"artifact {stage}/{key}: file {name} is missing") from e
            if size != info["size"]:
                raise StoreError(
                    f"artifact {stage}/{key}: file {name} has {size} bytes, manifest says {info['size']}"
                )
            if digests and self.local and file_digest(p) != info["sha256"]:
                raise StoreError(f"artifact {stage}/{key}: file {name} fails its sha256")
        return m

    def path(self, stage: str, key: str, name: str) -> Path:
        """A local path to one file of a complete artifact (downloaded for remote stores)."""
        m = self.manifest(stage, key)
        if name not in m.files:
            raise StoreError(f"artifact {stage}/{key} has no file {name!r} (has: {sorted(m.files)})")
        src = f"{self.artifact_path(stage, key)}/{name}"
        if self.local:
            return Path(src)
        dst = self.cache_dir / "artifacts" / stage / key / name
        if not dst.exists() or dst.stat().st_size != m.files[name]["size"]:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(dst, "wb") as out, self.fs.open(src, "rb") as f:
                shutil.copyfileobj(f, out)
        return dst

    def dir(self, stage: str, key: str) -> Path:
        """A local folder holding all the artifact's files (the artifact itself on local stores)."""
        m = self.manifest(stage, key)
        if self.local:
            return Path(self.artifact_path(stage, key))
        for name in m.files:
            self.path(stage, key, name)
        return self.cache_dir / "artifacts" / stage / key

    def stages(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(Path(e).name for e in entries if not Path(e).name.startswith("."))

    def keys(self, stage: str) -> list[str]:
        try:
            entries = self.fs.ls(f"{self.root}/{stage}", detail=False)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = Path(str(e).rstrip("/")).name
            if not name.startswith(".") and self.has(stage, name):
                out.append(name)
        return sorted(out)

    def find(self, ref: str) -> tuple[str, str]:
        """Resolve ``stage/key``, a store URL, or a unique key prefix to (stage, key)."""
        ref = ref.strip().rstrip("/")
        root_url = self.url.rstrip("/")
        if ref.startswith(root_url + "/"):
            ref = ref[len(root_url) + 1 :]
        elif "://" in ref:
            raise StoreError(f"{ref} is not in this store ({self.url})")
        if "/" in ref:
            stage, key = ref.split("/", 1)
            if self.has(stage, key):
                return stage, key
            matches = [(stage, k) for k in self.keys(stage) if k.startswith(key)]
        else:
            matches = [(s, k) for s in self.stages() for k in self.keys(s) if k.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise StoreError(f"no artifact matches {ref!r} in {self.url}")
        raise StoreError(f"{ref!r} is ambiguous: {', '.join(f'{s}/{k}' for s, k in matches[:5])}")

    # ---- writing ---------------------------------------------------------------------------
    def writer(self, stage: str, key: str) -> "ArtifactWriter":
        return ArtifactWriter(self, stage, key)


class ArtifactWriter:
    """Builds one artifact. Files go into ``staging`` (through :meth:`atomic` or :meth:`add_file`);
    :meth:`commit` records sizes and digests, writes the manifest, and publishes atomically.

    The staging folder is durable: a writer opened again for the same (stage, key) after a kill
    finds the complete files of the earlier attempt there (:meth:`has_file`), never a partial one.
    """

    def __init__(self, store: ArtifactStore, stage: str, key: str):
        self.store, self.stage, self.key = store, stage, key
        if store.local:
            self.staging = Path(store.root) / stage / f".staging-{key}"
        else:
            self.staging = store.cache_dir / "staging" / stage / key
        self.staging.mkdir(parents=True, exist_ok=True)
        clean_temp(self.staging)  # a killed writer's half files are never trusted
        self.resumed_files = sorted(
            p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*") if p.is_file()
        )
        self._t0 = time.time()
        self.committed = False

    def file(self, name: str) -> Path:
        """The staging path of ``name``, a relative POSIX path (``model/adapter/config.json``);
        read it, and write it only through :meth:`atomic`, :meth:`add_file` or :meth:`add_tree`."""
        parts = name.split("/")
        if not name or name == MANIFEST or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad artifact file name {name!r}")
        return self.staging.joinpath(*parts)

    def add_tree(self, src: str | os.PathLike, prefix: str = "") -> int:
        """Copy a finished local folder into the artifact under ``prefix`` (file by file, each
        atomically); returns the number of files."""
        src = Path(src)
        n = 0
        for p in sorted(src.rglob("*")):
            if p.is_file() and not is_temp(p.name):
                rel = p.relative_to(src).as_posix()
                self.add_file(p, f"{prefix}/{rel}" if prefix else rel)
                n += 1
        return n

    def has_file(self, name: str) -> bool:
        return self.file(name).exists()

    @contextlib.contextmanager
    def atomic(self, name: str, mode: str = "wb") -> Iterator[Any]:
        """Open ``name`` for writing; it appears in staging only once fully written."""
        with atomic_open(self.file(name), mode) as f:
            yield f

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.file(name), obj)

    def add_file(self, src: str | os.PathLike, name: str | None = None) -> Path:
        """Copy a finished local file into the artifact (atomically)."""
        dst = self.file(name or Path(src).name)
        with atomic_open(dst, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        return dst

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self, manifest: Manifest) -> Manifest:
        """Publish the staged files with ``manifest`` (its files/url/key fields are filled here)."""
        clean_temp(self.staging)
        files = {}
        for p in sorted(self.staging.rglob("*")):
            rel = p.relative_to(self.staging).as_posix()
            if p.is_file() and rel != MANIFEST and not is_temp(p.name):
                files[rel] = {"size": p.stat().st_size, "sha256": file_digest(p)}
        manifest.stage, manifest.key = self.stage, self.key
        manifest.url = self.store.artifact_url(self.stage, self.key)
        manifest.files = files
        manifest.created_at = time.time()
        manifest.timings.setdefault("write_s", round(time.time() - self._t0, 3))
        final = self.store.artifact_path(self.stage, self.key)
        if self.store.local:
            write_json(self.staging / MANIFEST, manifest.to_dict())
            final_p = Path(final)
            if final_p.exists():  # someone else published the same content-addressed artifact
                self.discard()
            else:
                os.replace(self.staging, final_p)
                fsync_dir(final_p.parent)
        else:
            fs = self.store.fs
            for name in files:
                fs.put_file(str(self.staging / name), f"{final}/{name}")
            with fs.open(f"{final}/{MANIFEST}", "wb") as f:  # the commit point
                f.write(json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=str).encode())
            self.discard()
        self.committed = True
        return manifest
