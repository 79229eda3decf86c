"""The artifact store: content-addressed, atomic, local by default, any fsspec URL for clusters.

Layout under the store root::

    <root>/<stage>/<key>/manifest.json     # written last: an artifact exists iff its manifest does
    <root>/<stage>/<key>/<files...>
    <root>/<stage>/.staging-<key>/...      # a writer's durable work in progress (local stores)

``key`` is the stage's cache key (see :mod:`storage.keys`): a digest of the stage's name, its code,
its resolved config section and its upstream keys, so equal inputs give the same address.

Verification. An artifact is trusted only once its files match its manifest
(:meth:`ArtifactStore.trust`): every listed file present with its size (always) and its sha256 (the
first time the artifact is trusted in a process; :meth:`ArtifactStore.verify` with ``digests``, which
``perceptio verify`` runs over the whole store). A damaged artifact (a file missing, truncated or
changed, the manifest unreadable) is moved aside into ``<root>/<stage>/.quarantine/`` with a
``DAMAGE.txt`` saying why, and is "not in the store": the stage computes it again and publishes a
fresh folder. Manifests locate nothing by absolute path: the artifact's own URL and its inputs' are
derived from the store they are read from, so a copied or moved store works on itself.

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
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import fsspec

from perceptio_core.atomic_io import atomic_open, clean_temp, file_digest, fsync_dir, is_temp, write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: ``url`` and ``input_urls`` written relative to the store (``stage/key``)
QUARANTINE_DIR = ".quarantine"
DAMAGE_NOTE = "DAMAGE.txt"

log = logging.getLogger(__name__)

# Artifacts whose digests this process has checked: (artifact path, manifest mtime and size) -> True.
_DIGESTS_OK: set[tuple[str, int, int]] = set()
_DIGESTS_LOCK = threading.Lock()


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
        """True when a complete artifact exists: its manifest readable and every listed file there
        with its size. A cheap look with no side effect; what a run reuses goes through
        :meth:`trust`, which checks the digests too and moves a damaged artifact aside."""
        try:
            self.verify(stage, key)
        except StoreError:
            return False
        return True

    def manifest(self, stage: str, key: str) -> Manifest:
        """The artifact's manifest, its ``url`` and ``input_urls`` located in this store. Raises
        :class:`StoreError` when there is none or it cannot be read (what it holds is then no
        artifact). Says nothing about the files: :meth:`verify` and :meth:`trust` check them."""
        path = f"{self.artifact_path(stage, key)}/{MANIFEST}"
        try:
            with self.fs.open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError as e:
            raise StoreError(f"no artifact {stage}/{key} in {self.url}") from e
        except (OSError, ValueError) as e:  # a truncated, garbled or unreadable manifest
            raise StoreError(f"artifact {stage}/{key}: unreadable manifest ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict) or data.get("key") != key:
            raise StoreError(f"artifact {stage}/{key}: its manifest is not this artifact's")
        for name, info in data["files"].items():
            if not (isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)):
                raise StoreError(f"artifact {stage}/{key}: its manifest lists file {name!r} without size and sha256")
        m = Manifest.from_dict(data)
        m.url = self.artifact_url(stage, key)
        m.input_urls = {n: self.artifact_url(n, k) for n, k in m.inputs.items()}
        return m

    def verify(self, stage: str, key: str, digests: bool = False) -> Manifest:
        """Check that every listed file exists with its size (and sha256 with ``digests``; a remote
        store's files are fetched for it); raises :class:`StoreError` saying what is wrong. Every
        file of a local artifact must be listed: an extra file (bar the manifest) is damage too."""
        m = self.manifest(stage, key)
        base = self.artifact_path(stage, key)
        for name, info in m.files.items():
            p = f"{base}/{name}"
            try:
                size = self.fs.size(p)
            except (FileNotFoundError, NotADirectoryError) as e:
                raise StoreError(f"artifact {stage}/{key}: file {name} is missing") from e
            if size != info["size"]:
                raise StoreError(
                    f"artifact {stage}/{key}: file {name} has {size} bytes, manifest says {info['size']}"
                )
        if self.local:
            listed = set(m.files) | {MANIFEST}
            extra = sorted(p.relative_to(base).as_posix() for p in Path(base).rglob("*")
                           if not p.is_dir() and p.relative_to(base).as_posix() not in listed)
            if extra:
                raise StoreError(f"artifact {stage}/{key}: file {extra[0]} is not in its manifest")
        if digests:
            for name, info in m.files.items():
                p = f"{base}/{name}" if self.local else str(self._fetch(stage, key, name, info, check=False))
                if file_digest(p) != info["sha256"]:
                    token = self._digest_token(stage, key)
                    with _DIGESTS_LOCK:  # trusted earlier in this process: no longer
                        _DIGESTS_OK.discard(token)
                    raise StoreError(f"artifact {stage}/{key}: file {name} fails its sha256 (its bytes changed)")
        return m

    def _digest_token(self, stage: str, key: str) -> tuple[str, int, int] | None:
        try:
            info = self.fs.info(f"{self.artifact_path(stage, key)}/{MANIFEST}")
        except (FileNotFoundError, OSError):
            return None
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        mtime = int(mtime.timestamp() * 1e9) if hasattr(mtime, "timestamp") else int(float(mtime) * 1e9)
        return (self.artifact_path(stage, key), mtime, int(info.get("size") or 0))

    def trust(self, stage: str, key: str) -> Manifest | None:
        """The artifact's manifest when its files match it: sizes every time, sha256 the first
        time in this process (:meth:`verify`). ``None`` when the store has no such artifact; a
        damaged one is moved aside (:meth:`quarantine`, logged) and is then not in the store."""
        path = self.artifact_path(stage, key)
        if not self.fs.exists(path):
            return None
        token = self._digest_token(stage, key)
        with _DIGESTS_LOCK:
            checked = token is not None and token in _DIGESTS_OK
        try:
            m = self.verify(stage, key, digests=not checked)
        except StoreError as e:
            self.quarantine(stage, key, str(e))
            return None
        if token is not None:
            with _DIGESTS_LOCK:
                _DIGESTS_OK.add(token)
        return m

    def quarantine(self, stage: str, key: str, reason: str) -> str | None:
        """Move a damaged artifact folder aside to ``<stage>/.quarantine/<key>-<time>`` (with a
        ``DAMAGE.txt`` holding ``reason``) and log it; returns where it went (None if it was gone)."""
        src = self.artifact_path(stage, key)
        dst = f"{self.root}/{stage}/{QUARANTINE_DIR}/{key}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        try:
            if self.local:
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                (Path(dst) / DAMAGE_NOTE).write_text(reason + "\n")
            else:
                self.fs.mv(src, dst, recursive=True)
                with self.fs.open(f"{dst}/{DAMAGE_NOTE}", "wb") as f:
                    f.write((reason + "\n").encode())
        except FileNotFoundError:
            return None
        log.warning("%s; the artifact was moved aside to %s and will be computed again", reason, self._uri(dst))
        return self._uri(dst)

    def damaged(self, stage: str | None = None) -> list[tuple[str, str, str]]:
        """Every damaged artifact of ``stage`` (or of the store): (stage, key, what is wrong), each
        file's sha256 checked. A folder without a readable manifest counts (its files are no
        artifact); staging folders (work in progress) and the quarantine do not."""
        out = []
        for s in [stage] if stage else self.stages():
            try:
                entries = self.fs.ls(f"{self.root}/{s}", detail=False)
            except FileNotFoundError:
                continue
            for e in sorted(entries):
                k = Path(str(e).rstrip("/")).name
                if k.startswith(".") or not self.fs.isdir(str(e)):
                    continue
                try:
                    self.verify(s, k, digests=True)
                except StoreError as err:
                    out.append((s, k, str(err)))
        return out

    def path(self, stage: str, key: str, name: str) -> Path:
        """A local path to one file of a complete artifact (downloaded for remote stores, the
        download checked against the manifest's sha256)."""
        m = self.manifest(stage, key)
        if name not in m.files:
            raise StoreError(f"artifact {stage}/{key} has no file {name!r} (has: {sorted(m.files)})")
        if self.local:
            return Path(f"{self.artifact_path(stage, key)}/{name}")
        return self._fetch(stage, key, name, m.files[name])

    def _fetch(self, stage: str, key: str, name: str, info: dict[str, Any], check: bool = True) -> Path:
        """Download one file of a remote artifact into the local cache (once: a local copy with the
        listed size and sha256 is reused; any other is fetched again)."""
        src = f"{self.artifact_path(stage, key)}/{name}"
        dst = self.cache_dir / "artifacts" / stage / key / name
        if dst.exists() and dst.stat().st_size == info["size"] and file_digest(dst) == info["sha256"]:
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(dst, "wb") as out, self.fs.open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        if check and file_digest(dst) != info["sha256"]:
            dst.unlink()
            raise StoreError(f"artifact {stage}/{key}: file {name} fails its sha256 (its bytes changed)")
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
            if not name.startswith("."):
                try:
                    self.manifest(stage, name)
                except StoreError:
                    continue
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
        manifest.files = files
        manifest.version = MANIFEST_VERSION
        record = manifest.to_dict()  # located relative to the store (the reader locates it again)
        record["url"] = f"{self.stage}/{self.key}"
        record["input_urls"] = {n: f"{n}/{k}" for n, k in manifest.inputs.items()}
        manifest.created_at = record["created_at"] = time.time()
        manifest.timings.setdefault("write_s", round(time.time() - self._t0, 3))
        record["timings"] = manifest.timings
        final = self.store.artifact_path(self.stage, self.key)
        if self.store.fs.exists(final) and not self.store.has(self.stage, self.key):
            # a damaged or half-deleted folder where this artifact belongs: moved aside, replaced
            self.store.quarantine(self.stage, self.key, f"artifact {self.stage}/{self.key}: damaged folder replaced "
                                                         "by a fresh copy")
        if self.store.local:
            write_json(self.staging / MANIFEST, record)
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
                f.write(json.dumps(record, indent=2, sort_keys=True, default=str).encode())
            self.discard()
        token = self.store._digest_token(self.stage, self.key)
        if token is not None:  # its digests were just computed from the files published
            with _DIGESTS_LOCK:
                _DIGESTS_OK.add(token)
        manifest.url = self.store.artifact_url(self.stage, self.key)
        manifest.input_urls = {n: self.store.artifact_url(n, k) for n, k in manifest.inputs.items()}
        self.committed = True
        return manifest
