"""The Prefect task every stage runs as: thin, it delegates to :func:`tasks.runner.execute_stage`,
then materializes the stage's asset and publishes its artifacts."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.assets import Asset, AssetProperties, add_asset_metadata
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_UI_URL
from prefect.states import Completed
from prefect.tasks import MaterializingTask, Task

from tasks.publish import publish_stage
from tasks.runner import ArtifactRef, RunContext, execute_stage
from tasks.stages import BY_NAME


class StageResult:
    """What a stage task returns: its :class:`ArtifactRef` in an opaque box.

    Prefect draws the run graph from identities: it links a task's result, *and the result's
    first-level fields*, to the task run by ``id()``, then finds a downstream task's inputs by
    visiting its arguments deeply. An ArtifactRef (a dataclass) handed on as it is would link its
    strings too, and those are shared (``"computed"``, ``"cached"``, stage names, the cache keys in
    ``material``): a stage would get a false edge from whichever task last returned the same
    string (``base`` from ``curate``, say). The box is no collection, so only the box is linked,
    and a downstream task that receives it gets exactly one edge per upstream stage."""

    __slots__ = ("ref", "__weakref__")

    def __init__(self, ref: ArtifactRef):
        self.ref = ref

    def __repr__(self) -> str:
        return f"StageResult({self.ref!r})"


def _run_stage(
    stage: str, run: RunContext, key: str, material: dict[str, Any],
    upstream: dict[str, StageResult | ArtifactRef],
) -> Any:
    spec = BY_NAME[stage]
    upstream = {n: u.ref if isinstance(u, StageResult) else u for n, u in upstream.items()}
    log = get_run_logger()
    if spec.prepare is not None:
        spec.prepare(run)
    ref, manifest = execute_stage(spec, run, key, material, upstream, log)
    if ref.status == "computed":
        add_asset_metadata(
            ref.url,
            {
                "stage": ref.stage,
                "cache_key": ref.key,
                "config_digest": manifest.config_digest,
                "code_digest": manifest.code.get("digest"),
                "git_commit": manifest.code.get("git_commit"),
                "upstream": manifest.input_urls,
                "metrics": manifest.metrics,
                "quarantined": manifest.quarantine.get("count", 0),
            },
        )
    ui = PREFECT_UI_URL.value()
    publish_stage(ref, manifest, run.store, ui_url=ui, flow_run_id=run.flow_run_id)
    if ref.status == "cached":
        # A reuse is not a materialization: Prefect emits no asset event for a "Cached" state,
        # while the table artifact above still says where the reused output came from.
        return Completed(data=StageResult(ref), name="Cached", message=f"reused {ref.url}")
    return StageResult(ref)


def stage_task(stage: str, url: str, reused_upstream: list[str]) -> Task:
    """The Prefect task for ``stage``, materializing the asset at ``url``; ``reused_upstream`` are
    upstream asset URLs not produced by a task of this flow run (declared as asset dependencies).
    Call it with the upstream stages' :class:`StageResult` boxes (see there) so Prefect draws the
    stage's edges, and plain ArtifactRefs for upstream artifacts taken from the store."""
    spec = BY_NAME[stage]
    return MaterializingTask(
        fn=_run_stage,
        assets=[
            Asset(
                key=url,
                properties=AssetProperties(name=f"{stage}", description=spec.description or stage),
            )
        ],
        name=stage,
        task_run_name=stage,
        cache_policy=NO_CACHE,
        persist_result=False,
        asset_deps=reused_upstream or None,
    )
