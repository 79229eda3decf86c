"""Lineage from the store alone: an artifact's upstream chain, read from manifests (no server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.store import ArtifactStore, StoreError


@dataclass
class LineageNode:
    stage: str
    key: str
    url: str
    config_digest: str = ""
    code_digest: str = ""
    git_commit: str | None = None
    produced_by: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    missing: bool = False
    parents: list["LineageNode"] = field(default_factory=list)


def lineage(store: ArtifactStore, stage: str, key: str) -> LineageNode:
    """The tree of artifacts (stage, key) was made from; an upstream absent from the store is
    marked ``missing`` rather than raising, so a pruned store still shows what it knows."""
    try:
        m = store.manifest(stage, key)
    except StoreError:
        return LineageNode(stage, key, store.artifact_url(stage, key), missing=True)
    node = LineageNode(
        stage=stage, key=key, url=m.url, config_digest=m.config_digest,
        code_digest=m.code.get("digest", ""), git_commit=m.code.get("git_commit"),
        produced_by=m.produced_by, metrics=m.metrics,
    )
    for up_stage, up_key in sorted(m.inputs.items()):
        node.parents.append(lineage(store, up_stage, up_key))
    return node


def format_lineage(node: LineageNode, depth: int = 0) -> str:
    """A terminal rendering: one artifact per entry, the artifacts it came from indented below."""
    pad = "    " * depth
    arrow = "<- " if depth else ""
    if node.missing:
        return f"{pad}{arrow}{node.stage}/{node.key}  (not in this store)"
    run = node.produced_by.get("run_id", "?")
    commit = (node.git_commit or "no git")[:12]
    lines = [
        f"{pad}{arrow}{node.stage}/{node.key}  config {node.config_digest[:12]}  "
        f"code {node.code_digest[:12]}  git {commit}  run {run}",
        f"{pad}{'   ' if depth else ''}  {node.url}",
    ]
    lines += [format_lineage(p, depth + 1) for p in node.parents]
    return "\n".join(lines)
