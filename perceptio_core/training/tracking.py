"""Experiment tracking (issue 21): the training curves and each stage's metrics, through accelerate's
tracker API (``Accelerator(log_with=..., project_dir=...)``, ``init_trackers``, ``log``), to
TensorBoard, Weights & Biases or MLflow (``run.trackers``; ``[]`` turns tracking off).

One :class:`TrackingSpec` says what a stage tracks: the trackers, the root (``<workdir>/tracking``),
the pipeline run id, the stage and its store key, and the resolved config as flat hyper-parameters.
The runner opens one per computed stage and makes it current (:func:`tracking_scope`), so the one
training loop (:class:`~perceptio_core.training.trainer.Trainer`, which also takes one as an
argument) logs every optimizer step into it without any fit passing it along; a loop run outside a
scope (a test, ``flows.train_script``) tracks nothing unless given a spec.

Where things go:

- TensorBoard: one run folder per pipeline run and stage, ``<root>/<run_id>/<stage>`` (a stage that
  runs several loops, as the two-phase SAM2 fit, puts each phase in ``<stage>/<phase>``), so
  ``tensorboard --logdir <workdir>/tracking`` shows every run side by side. accelerate writes the
  hyper-parameters (``add_hparams``) into a time-stamped sub-folder of the run folder, with an
  ``hparams.yml``.
- W&B: project ``perceptio``, run ``<run_id>/<stage>`` (id ``<run_id>-<stage>``, so the stage's
  metrics join the training run), grouped by the run id, tagged with run id, stage and key; its
  local files under ``<root>/wandb``.
- MLflow: experiment ``perceptio``, run ``<run_id>/<stage>`` tagged with run id, stage and key; the
  tracking store ``<root>/mlruns`` unless ``MLFLOW_TRACKING_URI`` names another.

Names are tracker-safe: a character other than a letter, digit or ``_-./`` and space (``refcoco+``'s
plus) becomes ``_``. Only the main process writes (accelerate's trackers run ``@on_main_process``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceptio_core.config import TRACKERS

log = logging.getLogger(__name__)

PROJECT = "perceptio"  # the W&B project and MLflow experiment
TRACKING_DIR = "tracking"  # under the workdir
# tracker -> (importable packages, any one of which serves it; the pip command that installs it)
_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")
_MAX_TEXT = 250  # a list hyper-parameter longer than this as JSON text is left out


class TrackerUnavailableError(RuntimeError):
    """``run.trackers`` names a tracker whose package is not installed."""


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module in sys.modules without a spec
        return False


def require_trackers(trackers: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`TrackerUnavailableError` (naming ``run.trackers`` and the pip command) when a
    tracker in ``trackers`` lacks its package; an unknown name is a ``ValueError``."""
    unknown = [t for t in trackers if t not in _PACKAGES]
    if unknown:
        raise ValueError(f"run.trackers: unknown tracker(s) {unknown}; known: {', '.join(TRACKERS)}")
    missing = [t for t in trackers if not any(_installed(p) for p in _PACKAGES[t][0])]
    if missing:
        how = "; ".join(f"{t}: {_PACKAGES[t][1]}" for t in missing)
        raise TrackerUnavailableError(
            f"run.trackers asks for {', '.join(missing)} but it is not installed ({how}); install it, or "
            f"leave it out (--set 'run.trackers=[{', '.join(t for t in trackers if t not in missing)}]'; [] "
            "turns tracking off)"
        )


def safe_name(name: str) -> str:
    """``name`` with every character other than a letter, digit, ``_-./`` or space made ``_``
    (MLflow refuses the others; every tracker takes these)."""
    return _UNSAFE.sub("_", str(name))


def _flat(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        kk = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _flat(v, kk)
        else:
            yield kk, v


def flat_hparams(d: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested mapping (a resolved config) as flat hyper-parameters, scalars only, as TensorBoard's
    hparams need: ``{"run": {"seed": 0}}`` -> ``{"run.seed": 0}``; bools, ints, floats and strings
    kept, a list of scalars as its JSON text (left out past 250 characters), None left out."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in _flat(d, prefix):
        if isinstance(v, (bool, int, float, str)):
            out[safe_name(k)] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            text = json.dumps(list(v))
            if len(text) <= _MAX_TEXT:
                out[safe_name(k)] = text
    return out


def numeric_metrics(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) metrics mapping, flat (``a.b``) and tracker-safe; bools, strings,
    lists and None left out."""
    return {
        safe_name(k): float(v)
        for k, v in _flat(d, prefix)
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@dataclass(frozen=True)
class TrackingSpec:
    """What one stage of one pipeline run tracks, and where (module docstring)."""

    trackers: tuple[str, ...]
    root: str  # <workdir>/tracking
    run_id: str
    stage: str
    key: str = ""  # the stage's store key
    hparams: Mapping[str, Any] = field(default_factory=dict)  # flat scalars (flat_hparams)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trackers", tuple(self.trackers))

    @classmethod
    def for_stage(cls, cfg: Any, run_id: str, stage: str, key: str = "",
                  workdir: str | os.PathLike[str] | None = None) -> TrackingSpec:  # fmt: skip
        """The spec of ``stage`` under the resolved config ``cfg`` (a ``PerceptioConfig``): its
        ``run.trackers``, ``<workdir>/tracking`` (default ``run.workdir``), and the whole config as
        hyper-parameters."""
        from perceptio_core.config import to_dict

        root = Path(workdir if workdir is not None else cfg.run.workdir) / TRACKING_DIR
        return cls(
            trackers=tuple(cfg.run.trackers), root=str(root),
            run_id=run_id, stage=stage, key=key, hparams=flat_hparams(to_dict(cfg)),
        )  # fmt: skip

    @property
    def enabled(self) -> bool:
        return bool(self.trackers)

    def run_name(self, sub: str = "") -> str:
        """``<run_id>/<stage>`` (``/<sub>`` for one of several loops of the stage)."""
        return "/".join(safe_name(p) for p in (self.run_id, self.stage, sub) if p)

    def logdir(self, sub: str = "") -> Path:
        """The TensorBoard run folder: ``<root>/<run_id>/<stage>[/<sub>]``."""
        return Path(self.root) / self.run_name(sub)

    def tags(self) -> dict[str, str]:
        return {"run_id": self.run_id, "stage": self.stage, "key": self.key}

    def config(self, extra: Mapping[str, Any] | None = None) -> dict[str, bool | int | float | str]:
        """The hyper-parameters to log: the resolved config, ``extra`` (flattened), and the tags."""
        return {**self.hparams, **flat_hparams(extra or {}), **{safe_name(k): v for k, v in self.tags().items()}}

    def build(self, sub: str = "") -> list[Any]:
        """accelerate tracker objects (``GeneralTracker``), not started, for ``log_with``. Raises
        :class:`TrackerUnavailableError` when a tracker's package is missing."""
        require_trackers(self.trackers)
        from accelerate.tracking import TensorBoardTracker

        name = self.run_name(sub)
        out: list[Any] = []
        for t in self.trackers:
            if t == "tensorboard":
                out.append(TensorBoardTracker(name, self.root))
            elif t == "wandb":
                from accelerate.tracking import WandBTracker

                Path(self.root).mkdir(parents=True, exist_ok=True)
                out.append(WandBTracker(
                    PROJECT, name=name, id=name.replace("/", "-"), resume="allow", group=safe_name(self.run_id),
                    job_type=safe_name(self.stage), tags=[v for v in self.tags().values() if v], dir=self.root,
                ))  # fmt: skip
            elif t == "mlflow":
                out.append(_mlflow_tracker(PROJECT, self.root, tags=self.tags(), run_name=name))
        return out


def _mlflow_tracker(experiment: str, root: str, **kwargs: Any) -> Any:
    """accelerate's MLflowTracker whose store is ``<root>/mlruns`` unless MLFLOW_TRACKING_URI says."""
    from accelerate.tracking import MLflowTracker, on_main_process

    class _Tracker(MLflowTracker):
        @on_main_process
        def start(self) -> None:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri((Path(root).resolve() / "mlruns").as_uri())
            super().start()

    return _Tracker(experiment_name=experiment, **kwargs)


def log_stage_metrics(spec: TrackingSpec, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log the numbers of a stage's metrics (flat, under ``stage/``) to the stage's trackers, in its
    run (``<root>/<run_id>/<stage>``), at ``step`` (default: the metrics' ``steps``, else 0). Opens
    and closes the trackers here (accelerate's tracker objects, no ``Accelerator``: the stage may
    have none). Returns what was logged."""
    values = {f"stage/{k}": v for k, v in numeric_metrics(metrics).items()}
    if not spec.enabled or not values:
        return {}
    if step is None:
        s = metrics.get("steps", 0)
        step = int(s) if isinstance(s, (int, float)) and math.isfinite(s) else 0
    trackers = spec.build()
    started = []
    try:
        for t in trackers:
            t.start()
            started.append(t)
        for t in started:
            t.log(values, step=step)
    finally:
        for t in started:
            t.finish()
    return values


# ---- the current stage's spec (set by whoever runs the stage) ---------------------------------

_CURRENT: contextvars.ContextVar[TrackingSpec | None] = contextvars.ContextVar("perceptio_tracking", default=None)


@contextlib.contextmanager
def tracking_scope(spec: TrackingSpec | None) -> Iterator[TrackingSpec | None]:
    """Make ``spec`` the current one (what a training loop given none tracks into) inside the block."""
    token = _CURRENT.set(spec)
    try:
        yield spec
    finally:
        _CURRENT.reset(token)


def current_tracking() -> TrackingSpec | None:
    """The spec of the stage running in this context (:func:`tracking_scope`), or None."""
    return _CURRENT.get()


__all__ = [
    "PROJECT",
    "TRACKING_DIR",
    "TrackerUnavailableError",
    "TrackingSpec",
    "current_tracking",
    "flat_hparams",
    "log_stage_metrics",
    "numeric_metrics",
    "require_trackers",
    "safe_name",
    "tracking_scope",
]
