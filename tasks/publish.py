"""Publishing a stage's artifact to Prefect: a table artifact with lineage and a markdown artifact
with the stage's pictures, under a stable key per stage so the UI shows its history across runs."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage import ArtifactStore, Manifest
from tasks.runner import ArtifactRef, flatten

MAX_INLINE_PNG = 600_000  # bytes; larger pictures are linked, not inlined


def artifact_key(stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return "perceptio-" + stage.replace("_", "-").lower()


def _ui_link(ui_url: str | None, path: str, label: str) -> str:
    """A link into the Prefect UI that reads well in both of its table views: with the UI's URL known
    (PREFECT_UI_URL, derived from PREFECT_API_URL) a bare absolute URL after the label, which the
    classic UI turns into a link and the new one shows as text; without it a root-relative markdown
    link, which the UI of the server holding the artifact resolves."""
    if ui_url:
        return f"{label} {ui_url.rstrip('/')}{path}"
    return f"[{label}]({path})"


def _run_link(store: ArtifactStore, stage: str, key: str, ui_url: str | None,
              current_flow_run: str | None = None) -> str:
    """Where an artifact came from: the flow run that produced it (read from its manifest, so it
    holds when the artifact was produced by an earlier run and reused in this one)."""
    try:
        m = store.manifest(stage, key)
    except Exception:  # noqa: BLE001 - a pruned upstream is shown as such, never fatal
        return "(not in store)"
    fr = m.produced_by.get("flow_run_id")
    run_id = m.produced_by.get("run_id", "?")
    if not fr:
        return f"run {run_id} (no Prefect flow run)"
    when = " (this flow run)" if fr == current_flow_run else ""
    return _ui_link(ui_url, f"/runs/flow-run/{fr}", f"run {run_id}") + when


def lineage_rows(
    ref: ArtifactRef, manifest: Manifest, store: ArtifactStore, ui_url: str | None,
    flow_run_id: str | None = None,
) -> list[dict[str, str]]:
    """Rows of the stage's table artifact: what it is, and what it came from. Each upstream artifact
    gets three rows: its store URL (its asset key, ending in its cache key), its Prefect artifact key,
    and the flow run that produced it."""
    rows = [
        {"field": "stage", "value": ref.stage},
        {"field": "status in this run", "value": ref.status},
        {"field": "store URL", "value": ref.url},
        {"field": "cache key", "value": ref.key},
        {"field": "produced by",
         "value": _run_link(store, ref.stage, ref.key, ui_url, flow_run_id)},
        {"field": "config digest", "value": manifest.config_digest[:16]},
        {"field": "code digest", "value": manifest.code.get("digest", "")[:16]},
        {"field": "git commit", "value": str(manifest.code.get("git_commit"))},
    ]
    for up_stage, up_key in sorted(manifest.inputs.items()):
        url = manifest.input_urls.get(up_stage, store.artifact_url(up_stage, up_key))
        up_art = artifact_key(up_stage)
        rows += [
            {"field": f"upstream {up_stage}", "value": url},
            {"field": f"upstream {up_stage} artifact",
             "value": _ui_link(ui_url, f"/artifacts/key/{up_art}", up_art)},
            {"field": f"upstream {up_stage} produced by",
             "value": _run_link(store, up_stage, up_key, ui_url, flow_run_id)},
        ]
    for k, v in flatten(manifest.metrics).items():
        rows.append({"field": f"metric {k}", "value": f"{v:.4g}" if isinstance(v, float) else str(v)})
    q = manifest.quarantine or {}
    if q.get("count"):
        rows.append({"field": "quarantined", "value": f"{q['count']} {q.get('reasons', {})}"})
    return rows


def publish_stage(
    ref: ArtifactRef, manifest: Manifest, store: ArtifactStore, ui_url: str | None = None,
    flow_run_id: str | None = None,
) -> None:
    """Create the stage's Prefect artifacts (table always, markdown with pictures if any), in every
    run: a stage reused from the store emits no asset event, its table still says where it came from."""
    key = artifact_key(ref.stage)
    create_table_artifact(
        table=lineage_rows(ref, manifest, store, ui_url, flow_run_id),
        key=key,
        description=f"{ref.stage} {ref.key} ({ref.status}): lineage, config, code and metrics",
    )
    figures = manifest.produced_by.get("figures") or {}
    if not figures:
        return
    folder = store.dir(ref.stage, ref.key)
    parts = [
        f"# {ref.stage} `{ref.key}`\n",
        f"Store: `{ref.url}`, {ref.status} in this run\n",
        f"Produced by {_run_link(store, ref.stage, ref.key, ui_url, flow_run_id)}\n",
    ]
    for caption, name in figures.items():
        p = Path(folder) / name
        if p.exists() and p.stat().st_size <= MAX_INLINE_PNG:
            b64 = base64.b64encode(p.read_bytes()).decode()
            parts.append(f"## {caption}\n\n![{caption}](data:image/png;base64,{b64})\n")
        else:
            parts.append(f"## {caption}\n\n`{ref.url}/{name}`\n")
    create_markdown_artifact(
        markdown="\n".join(parts), key=key + "-figures", description=f"{ref.stage} pictures"
    )
