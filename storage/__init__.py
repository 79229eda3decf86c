"""Artifact store and lineage: content-addressed, atomic, local or any fsspec URL."""

from storage.keys import code_digest, git_commit, stage_key
from storage.lineage import LineageNode, format_lineage, lineage
from storage.store import ArtifactStore, ArtifactWriter, Manifest, StoreError

__all__ = [
    "ArtifactStore", "ArtifactWriter", "Manifest", "StoreError",
    "code_digest", "git_commit", "stage_key", "LineageNode", "format_lineage", "lineage",
]
