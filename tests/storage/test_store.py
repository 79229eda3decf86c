"""The artifact store: atomic publication, resume from staging, integrity checks, lookups."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from perceptio_core.atomic_io import file_digest
from storage import ArtifactStore, Manifest, StoreError, format_lineage, lineage


def _write(store, stage, key, files, inputs=None, metrics=None):
    w = store.writer(stage, key)
    for name, data in files.items():
        with w.atomic(name) as f:
            f.write(data)
    return w.commit(Manifest(stage=stage, key=key, url="", inputs=inputs or {}, metrics=metrics or {}))


def test_commit_publishes_files_with_digests(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    m = _write(store, "vqvae", "abc123", {"model.safetensors": b"x" * 10, "config.json": b"{}"})
    assert store.has("vqvae", "abc123")
    assert m.files["model.safetensors"] == {"size": 10, "sha256": file_digest(store.path("vqvae", "abc123", "model.safetensors"))}
    assert m.url == (tmp_path / "store" / "vqvae" / "abc123").resolve().as_uri()
    # nothing of the staging folder is left
    assert not list((tmp_path / "store" / "vqvae").glob(".staging-*"))
    assert store.verify("vqvae", "abc123", digests=True).key == "abc123"


def test_uncommitted_artifact_is_invisible_and_staging_resumes(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    w = store.writer("teacher_depth", "k1")
    with w.atomic("chunk-000000.npz") as f:
        f.write(b"done")
    assert not store.has("teacher_depth", "k1")
    w2 = store.writer("teacher_depth", "k1")  # a rerun after a kill
    assert w2.resumed_files == ["chunk-000000.npz"]
    assert w2.file("chunk-000000.npz").read_bytes() == b"done"


def test_writer_killed_mid_file_leaves_nothing_trusted(tmp_path):
    """A writer process SIGKILLed half way through a file: no artifact, no partial file."""
    root = tmp_path / "store"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from storage import ArtifactStore
        w = ArtifactStore({str(root)!r}).writer("stage", "key")
        with w.atomic("first.bin") as f:
            f.write(b"a" * 1000)
        with w.atomic("second.bin") as f:
            f.write(b"b" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    store = ArtifactStore(root)
    assert not store.has("stage", "key")
    staging = root / "stage" / ".staging-key"
    assert any(".tmp-" in x.name for x in staging.iterdir())  # the half file is there, as a temp
    w = store.writer("stage", "key")
    assert w.resumed_files == ["first.bin"]  # the complete one is kept, the half one dropped
    assert not any(".tmp-" in x.name for x in staging.iterdir())


def test_manifest_is_the_commit_point(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    _write(store, "a", "k", {"f": b"123"})
    d = tmp_path / "s" / "a" / "k"
    (d / "manifest.json").unlink()
    assert not store.has("a", "k")
    with pytest.raises(StoreError, match="no artifact a/k"):
        store.manifest("a", "k")


def test_verify_detects_truncation(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    _write(store, "a", "k", {"f": b"123456"})
    (tmp_path / "s" / "a" / "k" / "f").write_bytes(b"12")
    with pytest.raises(StoreError, match="has 2 bytes, manifest says 6"):
        store.verify("a", "k")


def test_find_by_prefix_url_and_stage_key(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    _write(store, "sources", "aaaa1111", {"x": b"1"})
    _write(store, "vqvae", "aaab2222", {"x": b"1"})
    assert store.find("aaaa") == ("sources", "aaaa1111")
    assert store.find("vqvae/aaab2222") == ("vqvae", "aaab2222")
    assert store.find(store.artifact_url("vqvae", "aaab2222")) == ("vqvae", "aaab2222")
    with pytest.raises(StoreError, match="ambiguous"):
        store.find("aaa")
    with pytest.raises(StoreError, match="no artifact matches"):
        store.find("zzz")


def test_fsspec_memory_store_round_trip(tmp_path):
    """Any fsspec URL works: the in-memory filesystem stands in for s3:// or gs://."""
    store = ArtifactStore("memory://perceptio-test", cache_dir=tmp_path / "cache")
    m = _write(store, "vqvae", "k9", {"model.safetensors": b"weights"})
    assert m.url == "memory:///perceptio-test/vqvae/k9" or m.url.startswith("memory://")
    assert store.has("vqvae", "k9")
    assert store.path("vqvae", "k9", "model.safetensors").read_bytes() == b"weights"


def test_lineage_walks_manifests(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    _write(store, "sources", "s1", {"x": b"1"})
    _write(store, "teacher_depth", "t1", {"x": b"1"}, inputs={"sources": "s1"})
    _write(store, "train_vqvae", "v1", {"x": b"1"}, inputs={"teacher_depth": "t1", "gone": "g0"})
    tree = lineage(store, "train_vqvae", "v1")
    assert [p.stage for p in tree.parents] == ["gone", "teacher_depth"]
    assert tree.parents[0].missing
    assert tree.parents[1].parents[0].stage == "sources"
    text = format_lineage(tree)
    assert "train_vqvae/v1" in text and "<- teacher_depth/t1" in text and "<- sources/s1" in text
    assert "(not in this store)" in text


def test_nested_tree_is_published_and_served(tmp_path):
    src = tmp_path / "model"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "adapter_config.json").write_text("{}")
    (src / "config.json").write_text('{"a": 1}')
    (src / "adapter" / ".half.tmp").write_text("x")  # a temp leftover is never published
    store = ArtifactStore(tmp_path / "s")
    w = store.writer("finetune", "k")
    assert w.add_tree(src, "model") == 2
    m = w.commit(Manifest(stage="finetune", key="k", url=""))
    assert sorted(m.files) == ["model/adapter/adapter_config.json", "model/config.json"]
    assert (store.dir("finetune", "k") / "model" / "adapter" / "adapter_config.json").read_text() == "{}"
    assert store.path("finetune", "k", "model/config.json").read_text() == '{"a": 1}'
    with pytest.raises(ValueError, match="bad artifact file name"):
        store.writer("finetune", "k2").file("../escape")
