"""The one way a stage runs: resolve inputs, check the store, call the stage body, write, publish.

A stage is declared once (:class:`StageSpec`) with its upstream stages, the config sections and the
code it depends on; its cache key follows from those alone (:func:`compute_keys`), so
``perceptio stages`` can tell fresh from stale without running anything. When the store already
holds the artifact for the key the stage is ``cached``: no model is loaded, nothing is read beyond
the manifest. Otherwise the body runs against an :class:`~storage.ArtifactWriter` whose staging
folder survives a kill, so a long stage resumes from the files it already finished.
"""

from __future__ import annotations

import contextlib
import io

import logging
import os
import platform
import socket
import sys
import threading
import time
import tokenize
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from perceptio_core.config import PerceptioConfig, canonical_json, to_dict
from perceptio_core.data.records import MissingDataError, QuarantineEntry
from storage import ArtifactStore, ArtifactWriter, Manifest, code_digest, git_commit, stage_key
from storage.keys import digest_text
from tasks.tracking import log_stage, stage_tracking, tracking_scope

REPO_ROOT = Path(__file__).resolve().parent.parent
QUARANTINE_SAMPLE = 200  # entries kept verbatim in a manifest; the full list is the artifact's file


class PipelineError(RuntimeError):
    """A run cannot go on as asked (a needed upstream artifact is missing, ...): a user error."""


LOCK_FILE = ".perceptio-run.lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path, wait_s: float = 0.0,
                 log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold ``<workdir>/.perceptio-run.lock`` for a run, so that two runs never compute the same
    stages through the same staging folders. A run that finds the lock held waits up to ``wait_s``
    seconds for it (saying so through ``log``: which run holds it, pid, host and start), then goes
    on (what the first run made is then cached); past that, or with ``wait_s`` 0, it stops with a
    :class:`PipelineError` naming the holder. The lock is the operating system's (``flock``), so a
    run that dies, even by ``kill -9``, releases it and the next run takes it over; the file's text
    only says who holds it. (``flock`` is per machine: runs on several nodes sharing a workdir over
    NFS are not kept apart by it.)"""
    import fcntl

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    f = open(path, "a+")
    deadline = time.monotonic() + max(0.0, wait_s)
    told = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if time.monotonic() >= deadline:
                f.close()
                raise PipelineError(f"workdir {workdir} is in use by another perceptio run ({holder}); wait for it "
                                    "to finish, or give this run another --workdir") from None
            if not told and log is not None:
                log(f"workdir {workdir} is in use by another perceptio run ({holder}); waiting for it "
                    f"(up to {wait_s:.0f} s, run.lock_wait_s)")
                told = True
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield path
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


@dataclass(frozen=True)
class ArtifactRef:
    """What a stage task returns: a reference to an artifact, never its content."""

    stage: str
    key: str
    url: str
    status: str  # "computed", "cached" (in the store already), "reused" (not selected in this run)


@dataclass
class StageOutput:
    """What a stage body returns besides the files it wrote."""

    metrics: dict[str, Any] = field(default_factory=dict)
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)  # caption -> artifact file name (PNG)
    notes: list[str] = field(default_factory=list)


@dataclass
class RunContext:
    """One pipeline run: its config, where it works, and which stages it forces."""

    cfg: PerceptioConfig
    workdir: Path
    run_id: str
    force: frozenset[str] = frozenset()
    flow_run_id: str | None = None

    @property
    def store_url(self) -> str:
        return self.cfg.run.store or str(self.workdir / "store")

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_url, cache_dir=self.workdir / "cache")


@dataclass
class StageContext:
    """Everything a stage body may use."""

    run: RunContext
    spec: "StageSpec"
    key: str
    writer: ArtifactWriter
    upstream: dict[str, ArtifactRef]
    log: logging.Logger | logging.LoggerAdapter

    @property
    def cfg(self) -> PerceptioConfig:
        return self.run.cfg

    @property
    def store(self) -> ArtifactStore:
        return self.writer.store

    def upstream_dir(self, stage: str) -> Path:
        ref = self.upstream[stage]
        return self.store.dir(ref.stage, ref.key)

    def upstream_manifest(self, stage: str) -> Manifest:
        ref = self.upstream[stage]
        return self.store.manifest(ref.stage, ref.key)


# Project modules left out of every stage's code version: the config schema (a stage is keyed on the
# values of the config sections it reads, so an edit to another stage's settings does not re-run
# it), the progress reporting and the experiment tracking (how a stage logs, not what it computes).
# Package inits (lazy re-exports and docstrings only) are left out too (:func:`_is_package_init`).
UNVERSIONED = frozenset({"perceptio_core.config", "tasks.progress", "tasks.tracking",
                         "perceptio_core.training.tracking"})
PROJECT_PACKAGES = ("perceptio_core", "tasks")


def _module_file(module: str) -> Path | None:
    """The source file of a project module (``pkg/mod.py`` or ``pkg/mod/__init__.py``), or None."""
    base = REPO_ROOT / module.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _is_package_init(module: str) -> bool:
    path = _module_file(module)
    return path is not None and path.name == "__init__.py"


_PARSE_LOCK = threading.Lock()
_IMPORTS: dict[tuple[str, int, int], frozenset[str]] = {}  # (file, mtime, size) -> its project imports


def _direct_project_imports(module: str) -> set[str]:
    """Project modules named by ``module``'s import statements, absolute and relative (``from pkg
    import mod`` and ``from . import mod`` count as ``pkg.mod`` when that is a module), imports
    inside functions included. Each file is read once per process (per modification)."""
    path = _module_file(module)
    if path is None:
        return set()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _PARSE_LOCK:
        if key not in _IMPORTS:
            _IMPORTS[key] = frozenset(_parse_imports(module, path))
        return set(_IMPORTS[key])


def import_statements(text: str) -> list[tuple[int, str, list[str]]]:
    """Every import statement of Python source ``text`` as ``(level, module, names)``: ``import a.b,
    c`` -> ``(0, "", ["a.b", "c"])``, ``from ..x import y as z`` -> ``(2, "x", ["y"])``. Read with the
    tokenizer, not ``ast.parse``: CPython 3.11's AST conversion fails at random ("AST constructor
    recursion depth mismatch") when another thread builds an AST at the same time, and a run has
    Prefect's threads beside it."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL)]
    out: list[tuple[int, str, list[str]]] = []
    start = True
    i = 0
    while i < len(toks):
        t = toks[i]
        # a statement starts a logical line, or follows ";" or a compound statement's ":" (``if x: import y``;
        # import and from are keywords, so after ":" they can only start a statement)
        if t.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) or (t.type == tokenize.OP and t.string in ";:"):
            start = True
            i += 1
            continue
        if start and t.type == tokenize.NAME and t.string in ("import", "from"):
            j = i
            while j < len(toks) and toks[j].type not in (tokenize.NEWLINE, tokenize.ENDMARKER) and \
                    not (toks[j].type == tokenize.OP and toks[j].string == ";"):
                j += 1
            words = [x.string for x in toks[i:j] if x.string not in ("(", ")")]
            out.append(_statement(words))
            i = j
            continue
        start = False
        i += 1
    return out


def _statement(words: list[str]) -> tuple[int, str, list[str]]:
    def names(ws: list[str]) -> list[str]:
        out, cur, skip = [], "", False
        for w in ws + [","]:
            if w == ",":
                if cur and cur != "*":
                    out.append(cur)
                cur, skip = "", False
            elif w == "as":
                skip = True
            elif not skip:
                cur += w
        return out

    if words[0] == "import":
        return 0, "", names(words[1:])
    k, level = 1, 0
    while k < len(words) and words[k] in (".", "..."):
        level += len(words[k])
        k += 1
    module = ""
    while k < len(words) and words[k] != "import":
        module += words[k]
        k += 1
    return level, module, names(words[k + 1:])


def _parse_imports(module: str, path: Path) -> set[str]:
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out: set[str] = set()
    for level, mod, names in import_statements(path.read_text()):
        if level == 0 and not mod:  # import a.b, c
            found = names
        else:
            if level:  # relative: from the module's package, one level up per extra dot
                parts = package[: len(package) - (level - 1)] if level - 1 <= len(package) else []
                base = ".".join(parts + ([mod] if mod else []))
            else:
                base = mod
            if not base:
                continue
            found = [base] + [f"{base}.{n}" for n in names]
        out |= {n for n in found if n.split(".")[0] in PROJECT_PACKAGES and _module_file(n) is not None}
    return out


def project_imports_closure(roots: list[str]) -> set[str]:
    """``roots`` and every project module they import, transitively."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(_direct_project_imports(mod) - seen)
    return seen


def versioned_modules(roots: list[str]) -> list[str]:
    """``roots`` and every project module they reach by import, less :data:`UNVERSIONED` and the
    package inits: the modules whose source versions what ``roots`` compute."""
    return sorted(m for m in project_imports_closure(roots) - UNVERSIONED if not _is_package_init(m))


def module_files(modules: list[str]) -> list[Path]:
    """The source files of ``modules`` (those that exist)."""
    return [p for m in modules if (p := _module_file(m)) is not None]


@dataclass(frozen=True)
class StageSpec:
    """A stage: its name, inputs, the config and code that make its key, and its body."""

    name: str
    upstream: tuple[str, ...]
    sections: tuple[str, ...]  # dotted config sections the stage reads ("teacher", "vqvae", ...)
    body: Callable[[StageContext], StageOutput]
    description: str = ""
    # extra key material computed from the config (e.g. a digest of the input data's files)
    fingerprint: Callable[[PerceptioConfig, Path], str] | None = None
    # run before the cache check, every run: cheap idempotent set-up (e.g. the synthetic world)
    prepare: Callable[[RunContext], None] | None = None
    # whether the stage is part of the DAG under this config (e.g. fit_teacher only without a
    # released teacher checkpoint); a disabled stage is no one's upstream
    enabled: Callable[[PerceptioConfig], bool] | None = None
    # modules the body's imports do not reach but whose source should version the stage too
    code: tuple[str, ...] = ()
    # the config values the stage reads, where which fields it reads depends on the config (e.g.
    # sources reads data.captions only while model.base is unset); None: its ``sections``
    view: Callable[[PerceptioConfig], dict[str, Any]] | None = None

    def is_enabled(self, cfg: PerceptioConfig) -> bool:
        return self.enabled is None or self.enabled(cfg)

    def code_modules(self) -> list[str]:
        """The modules whose source makes the stage's code version: the body's module and every
        project module (``perceptio_core.*``, ``tasks.*``) it imports, directly or not (read from
        the source, imports inside functions included), plus ``code`` and ``tasks.runner``; less
        :data:`UNVERSIONED` and the package inits (the config's values are keyed through ``sections``
        instead)."""
        for mod in self.code:
            if _module_file(mod) is None:
                raise FileNotFoundError(f"stage {self.name}: code module {mod} not found under {REPO_ROOT}")
        return sorted({*versioned_modules([self.body.__module__, *self.code]), "tasks.runner"})

    def code_files(self) -> list[Path]:
        return module_files(self.code_modules())

    def config_view(self, cfg: PerceptioConfig) -> dict[str, Any]:
        if self.view is not None:
            return to_dict(self.view(cfg))
        return {s: to_dict(cfg.section(s)) for s in self.sections}


def compute_keys(
    cfg: PerceptioConfig, stages: list[StageSpec], workdir: Path
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every stage's cache key (with its key material), in topological order. Pure: reads the
    config and the code files (and the input fingerprint), never an artifact.

    Give only the stages a run needs (a stage and its upstream): only their inputs are demanded.
    The datasets missing for any of them are named together in one :class:`MissingDataError`
    (raised once every stage's inputs were looked at), each with the ``--set`` that skips it."""
    keys: dict[str, tuple[str, dict[str, Any]]] = {}
    missing: list[MissingDataError] = []
    for spec in stages:
        if not spec.is_enabled(cfg):
            continue
        code = code_digest(spec.code_files())
        config = spec.config_view(cfg)
        if spec.fingerprint is not None:
            try:
                config = {**config, "_inputs": spec.fingerprint(cfg, workdir)}
            except MissingDataError as e:
                missing.append(e)
                continue
        if any(u not in keys and u in {s.name for s in stages if s.is_enabled(cfg)} for u in spec.upstream):
            continue  # an upstream stage lacks its data (reported below)
        upstream = {u: keys[u][0] for u in spec.upstream if u in keys}
        key = stage_key(spec.name, code, config, upstream)
        keys[spec.name] = (key, {"code": code, "config": config, "upstream": upstream})
    if missing:
        raise MissingDataError.merge(missing)
    return keys


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (metric names as summary.json reports them)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        kk = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, kk))
        else:
            out[kk] = v
    return out


def _quarantine_summary(entries: list[QuarantineEntry]) -> dict[str, Any]:
    reasons = Counter(e.reason.split(":")[0] for e in entries)
    return {
        "count": len(entries),
        "reasons": dict(sorted(reasons.items())),
        "entries": [e.to_dict() for e in entries[:QUARANTINE_SAMPLE]],
    }


def interrupts() -> tuple[type[BaseException], ...]:
    """What a stop looks like inside a stage: Ctrl-C, and Prefect's ``TerminationSignal`` (SIGTERM
    during a flow run) when Prefect is loaded (this module does not import it)."""
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    signal = getattr(prefect_exceptions, "TerminationSignal", None)
    return (KeyboardInterrupt,) + ((signal,) if signal is not None else ())


def execute_stage(
    spec: StageSpec,
    run: RunContext,
    key: str,
    material: dict[str, Any],
    upstream: dict[str, ArtifactRef],
    log: logging.Logger | logging.LoggerAdapter,
) -> tuple[ArtifactRef, Manifest]:
    """Run one stage (or find it cached) and return its reference and manifest."""
    store = run.store
    if spec.name not in run.force:
        m = store.trust(spec.name, key)  # verified (a damaged artifact is moved aside: recomputed)
        if m is not None:
            log.info("%s: cached (%s)", spec.name, key)
            return ArtifactRef(spec.name, key, m.url, "cached"), m
    for name, ref in upstream.items():
        if store.trust(ref.stage, ref.key) is None:
            raise PipelineError(
                f"stage {spec.name}: upstream artifact {name}/{ref.key} is not in the store {store.url} "
                "(never made, or damaged and moved aside); run the pipeline without --only/--from to make it"
            )
    tracking = stage_tracking(run, spec.name, key)  # None: run.trackers []; a missing package stops here
    writer = store.writer(spec.name, key)
    if writer.resumed_files:
        log.info(
            "%s: resuming, %d finished file(s) from an earlier attempt", spec.name,
            len(writer.resumed_files),
        )
    ctx = StageContext(run=run, spec=spec, key=key, writer=writer, upstream=upstream, log=log)
    t0 = time.time()
    try:
        with tracking_scope(tracking):  # the training loop tracks into the stage's run
            out = spec.body(ctx)
    except BaseException as e:
        if isinstance(e, interrupts()):  # Ctrl-C or SIGTERM: one line, no traceback
            log.warning("%s interrupted; its finished chunks stay in %s for the next run", spec.name, writer.staging)
        else:
            log.error("%s failed:\n%s", spec.name, traceback.format_exc())
        raise
    wall = time.time() - t0
    if out.quarantine:
        writer.write_json("quarantine.json", [e.to_dict() for e in out.quarantine])
    config = material["config"]
    manifest = Manifest(
        stage=spec.name,
        key=key,
        url="",
        inputs=dict(material["upstream"]),
        input_urls={n: r.url for n, r in upstream.items()},
        config=config,
        config_digest=digest_text(canonical_json(config)),
        code={
            "digest": material["code"],
            "files": [str(p.relative_to(REPO_ROOT)) for p in spec.code_files()],
            "git_commit": git_commit(REPO_ROOT),
        },
        metrics=out.metrics,
        timings={"wall_s": round(wall, 3)},
        quarantine=_quarantine_summary(out.quarantine),
        produced_by={
            "run_id": run.run_id,
            "flow_run_id": run.flow_run_id,
            "host": socket.gethostname(),
            "user": os.environ.get("USER", ""),
            "python": platform.python_version(),
            "figures": out.figures,
            "notes": out.notes,
        },
    )
    manifest = writer.commit(manifest)
    log_stage(tracking, out.metrics, log)
    log.info("%s: computed in %.1f s -> %s", spec.name, wall, manifest.url)
    return ArtifactRef(spec.name, key, manifest.url, "computed"), manifest
