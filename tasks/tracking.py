"""A computed stage's experiment tracking (issue 21): the :class:`TrackingSpec` of the stage (the
run's ``run.trackers``, ``<workdir>/tracking``, the run id, the stage and its store key, the resolved
config as hyper-parameters), made current while its body runs so that the training loop tracks
into it, and the stage's numeric metrics logged once it is committed
(:mod:`perceptio_core.training.tracking` says where each tracker writes)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

from perceptio_core.training.tracking import TrackingSpec, log_stage_metrics, require_trackers, tracking_scope

if TYPE_CHECKING:
    from tasks.runner import RunContext

__all__ = ["log_stage", "stage_tracking", "tracking_scope"]


def stage_tracking(run: RunContext, stage: str, key: str) -> TrackingSpec | None:
    """The tracking of ``stage`` in ``run`` (None with ``run.trackers: []``). Raises
    :class:`~perceptio_core.training.tracking.TrackerUnavailableError` (naming ``run.trackers`` and
    the pip command) before the stage's body runs when a tracker's package is missing."""
    if not run.cfg.run.trackers:
        return None
    spec = TrackingSpec.for_stage(run.cfg, run.run_id, stage, key, workdir=run.workdir)
    require_trackers(spec.trackers)
    return spec


def log_stage(spec: TrackingSpec | None, metrics: Mapping[str, Any],
              log: logging.Logger | logging.LoggerAdapter) -> None:  # fmt: skip
    """The stage's numeric metrics (flat, ``stage/<name>``) to its trackers. The artifact is
    committed by then: a tracker that fails here is logged as a warning, the stage stands."""
    if spec is None:
        return
    try:
        values = log_stage_metrics(spec, metrics)
    except Exception as e:  # noqa: BLE001 - tracking never undoes a computed stage
        log.warning("%s: its metrics did not reach the trackers (%s: %s)", spec.stage, type(e).__name__, e)
        return
    if values:
        log.info("%s: %d metrics tracked in %s", spec.stage, len(values), spec.logdir())
