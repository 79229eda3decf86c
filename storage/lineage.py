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


def lineage(store: ArtifactStore, stage: str, key: str,
            _seen: dict[tuple[str, str], LineageNode] | None = None) -> LineageNode:
    """The artifacts (stage, key) was made from, as a graph of nodes (``parents``, sorted by stage):
    an artifact several others read (``sources``) is one node, its manifest read once. An upstream
    absent from the store is marked ``missing`` rather than raising, so a pruned store still shows
    what it knows. URLs are where the store is now (:meth:`ArtifactStore.manifest`)."""
    seen = {} if _seen is None else _seen
    if (stage, key) in seen:
        return seen[(stage, key)]
    try:
        m = store.manifest(stage, key)
    except StoreError:
        node = seen[(stage, key)] = LineageNode(stage, key, store.artifact_url(stage, key), missing=True)
        return node
    node = seen[(stage, key)] = LineageNode(
        stage=stage, key=key, url=m.url, config_digest=m.config_digest,
        code_digest=m.code.get("digest", ""), git_commit=m.code.get("git_commit"),
        produced_by=m.produced_by, metrics=m.metrics,
    )
    for up_stage, up_key in sorted(m.inputs.items()):
        node.parents.append(lineage(store, up_stage, up_key, seen))
    return node


def lineage_order(node: LineageNode) -> list[LineageNode]:
    """Every artifact of ``node``'s lineage once, ``node`` first and each artifact before the ones it
    was made from (a topological order of the made-from graph: reading down goes upstream; the
    DAG's roots, ``sources``, come last)."""
    post: list[LineageNode] = []
    done: set[tuple[str, str]] = set()

    def visit(n: LineageNode) -> None:
        if (n.stage, n.key) in done:
            return
        done.add((n.stage, n.key))
        for p in n.parents:
            visit(p)
        post.append(n)  # after everything it was made from

    visit(node)
    return post[::-1]


def format_lineage(node: LineageNode) -> str:
    """A terminal rendering: every artifact of the lineage once (:func:`lineage_order`: ``node``
    first), each with its digests, git commit and run, its URL where the store read has it now, and
    a line ``<- stage/key`` per artifact it was made from (whose own entry follows further down)."""
    lines: list[str] = []
    for n in lineage_order(node):
        name = f"{n.stage}/{n.key}"
        if n.missing:
            lines.append(f"{name}  (not in this store)")
            continue
        run = n.produced_by.get("run_id", "?")
        commit = (n.git_commit or "no git")[:12]
        lines.append(f"{name}  config {n.config_digest[:12]}  code {n.code_digest[:12]}  git {commit}  run {run}")
        lines.append(f"    {n.url}")
        lines += [f"    <- {p.stage}/{p.key}" + ("  (not in this store)" if p.missing else "") for p in n.parents]
    return "\n".join(lines)
