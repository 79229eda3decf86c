"""The verified store: an artifact is trusted only when its files match its manifest; a damaged one
is moved aside and computed again; a copied store reads itself (issue 19)."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from storage import ArtifactStore, Manifest, StoreError
from storage.store import DAMAGE_NOTE, QUARANTINE_DIR, _DIGESTS_LOCK, _DIGESTS_OK
from tasks.runner import RunContext, StageOutput, StageSpec, execute_stage
from perceptio_core.config import load_config


def _write(store, stage, key, files, inputs=None):
    w = store.writer(stage, key)
    for name, data in files.items():
        with w.atomic(name) as f:
            f.write(data)
    return w.commit(Manifest(stage=stage, key=key, url="", inputs=inputs or {}))


def _forget_digests():
    with _DIGESTS_LOCK:
        _DIGESTS_OK.clear()


def _quarantined(root: Path, stage: str) -> list[Path]:
    q = root / stage / QUARANTINE_DIR
    return sorted(q.iterdir()) if q.is_dir() else []


def test_same_size_change_is_caught_by_the_digest_and_moved_aside(tmp_path, caplog):
    root = tmp_path / "store"
    store = ArtifactStore(root)
    _write(store, "finetune", "k1", {"model.safetensors": b"w" * 64, "config.json": b"{}"})
    p = root / "finetune" / "k1" / "model.safetensors"
    p.write_bytes(b"w" * 63 + b"X")  # same size: only the sha256 tells
    assert store.has("finetune", "k1")  # the cheap look checks sizes only
    _forget_digests()  # a new process: the digests are checked on first use
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        assert store.trust("finetune", "k1") is None
    assert not (root / "finetune" / "k1").exists()
    [moved] = _quarantined(root, "finetune")
    assert (moved / "model.safetensors").read_bytes().endswith(b"X")
    assert "model.safetensors fails its sha256" in (moved / DAMAGE_NOTE).read_text()
    assert "moved aside" in caplog.text and "model.safetensors" in caplog.text
    # computed again: the fresh copy is published where the damaged one was
    _write(store, "finetune", "k1", {"model.safetensors": b"w" * 64, "config.json": b"{}"})
    assert store.trust("finetune", "k1").files["model.safetensors"]["size"] == 64


def test_digests_are_checked_once_per_process(tmp_path):
    root = tmp_path / "store"
    store = ArtifactStore(root)
    _write(store, "a", "k", {"f.bin": b"1234"})
    _forget_digests()
    assert store.trust("a", "k") is not None
    (root / "a" / "k" / "f.bin").write_bytes(b"9999")  # after this process checked it
    assert store.trust("a", "k") is not None  # sizes only now: the digest was checked once
    _forget_digests()
    assert store.trust("a", "k") is None


def test_damage_found_by_a_full_check_is_not_trusted_later_in_the_process(tmp_path):
    """perceptio verify (digests) finds the change: the artifact this process trusted before is
    checked again, and moved aside, when a run reuses it."""
    root = tmp_path / "store"
    store = ArtifactStore(root)
    _write(store, "a", "k", {"f.bin": b"1234"})
    assert store.trust("a", "k") is not None
    (root / "a" / "k" / "f.bin").write_bytes(b"9999")
    assert [s for s, _, _ in store.damaged()] == ["a"]
    assert store.trust("a", "k") is None


@pytest.mark.parametrize("damage", ["truncate_file", "delete_file", "extra_file", "truncate_manifest",
                                    "delete_manifest", "garble_manifest", "other_key_manifest"])
def test_every_kind_of_damage_is_not_in_the_store_and_is_replaced(tmp_path, damage):
    root = tmp_path / "store"
    store = ArtifactStore(root)
    files = {"shards/shard-000000.tar": b"t" * 100, "manifest.parquet": b"p" * 50}
    _write(store, "curate", "k2", files)
    d = root / "curate" / "k2"
    if damage == "truncate_file":
        (d / "shards" / "shard-000000.tar").write_bytes(b"t" * 40)
    elif damage == "delete_file":
        (d / "manifest.parquet").unlink()
    elif damage == "extra_file":
        (d / "shards" / "shard-000001.tar").write_bytes(b"planted")
    elif damage == "truncate_manifest":
        text = (d / "manifest.json").read_text()
        (d / "manifest.json").write_text(text[: len(text) // 2])
    elif damage == "delete_manifest":
        (d / "manifest.json").unlink()
    elif damage == "garble_manifest":
        (d / "manifest.json").write_bytes(b"\xff\xfe not json")
    elif damage == "other_key_manifest":
        m = json.loads((d / "manifest.json").read_text())
        m["key"] = "someone-else"
        (d / "manifest.json").write_text(json.dumps(m))
    _forget_digests()
    assert not store.has("curate", "k2")
    assert [s for s, k, why in store.damaged()] == ["curate"]
    assert store.trust("curate", "k2") is None
    # the recompute publishes a fresh folder (a damaged folder never blocks it)
    _write(store, "curate", "k2", files)
    _forget_digests()
    m = store.trust("curate", "k2")
    assert m is not None and sorted(m.files) == sorted(files)
    assert (d / "shards" / "shard-000000.tar").read_bytes() == b"t" * 100
    assert store.damaged() == []


def test_commit_replaces_a_folder_without_manifest(tmp_path):
    """A half-deleted artifact (no manifest) where the stage publishes: moved aside, replaced."""
    root = tmp_path / "store"
    store = ArtifactStore(root)
    (root / "sources" / "k3").mkdir(parents=True)
    (root / "sources" / "k3" / "sources.json").write_text("stale")
    _write(store, "sources", "k3", {"sources.json": b"fresh"})
    assert (root / "sources" / "k3" / "sources.json").read_text() == "fresh"
    assert [p.name.split("-")[0] for p in _quarantined(root, "sources")] == ["k3"]


def test_manifests_locate_nothing_by_absolute_path_a_copied_store_reads_itself(tmp_path):
    a = tmp_path / "a" / "store"
    store = ArtifactStore(a)
    _write(store, "sources", "s1", {"x.json": b"{}"})
    _write(store, "teacher_depth", "t1", {"d.npz": b"zz"}, inputs={"sources": "s1"})
    raw = json.loads((a / "teacher_depth" / "t1" / "manifest.json").read_text())
    assert raw["url"] == "teacher_depth/t1" and raw["input_urls"] == {"sources": "sources/s1"}
    assert str(tmp_path) not in (a / "teacher_depth" / "t1" / "manifest.json").read_text()
    b = tmp_path / "b" / "store"
    shutil.copytree(a, b)
    shutil.rmtree(a)
    copy = ArtifactStore(b)
    m = copy.trust("teacher_depth", "t1")
    assert m.url == (b / "teacher_depth" / "t1").resolve().as_uri()
    assert m.input_urls == {"sources": (b / "sources" / "s1").resolve().as_uri()}
    assert copy.path("teacher_depth", "t1", "d.npz").read_bytes() == b"zz"


def test_remote_store_download_is_checked_against_its_digest(tmp_path):
    import fsspec

    url = "memory://verified-store-test"
    store = ArtifactStore(url, cache_dir=tmp_path / "cache")
    _write(store, "a", "k", {"f.bin": b"abcd"})
    assert store.path("a", "k", "f.bin").read_bytes() == b"abcd"
    fs = fsspec.filesystem("memory")
    with fs.open("/verified-store-test/a/k/f.bin", "wb") as f:
        f.write(b"abcX")  # same size, changed after the first download
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(StoreError, match="fails its sha256"):
        store.path("a", "k", "f.bin")
    with pytest.raises(StoreError, match="fails its sha256"):
        store.verify("a", "k", digests=True)
    fs.rm("/verified-store-test", recursive=True)


def _spec(calls: list[str]) -> StageSpec:
    def body(ctx):
        calls.append(ctx.key)
        with ctx.writer.atomic("out.txt", "w") as f:
            f.write("result")
        return StageOutput(metrics={"n": 1})

    return StageSpec(name="toy", upstream=(), sections=(), body=body)


def test_execute_stage_recomputes_a_damaged_artifact(tmp_path):
    """What a run does: a cached artifact whose bytes changed is not reused but computed again."""
    cfg = load_config(None)
    run = RunContext(cfg=cfg, workdir=tmp_path / "wd", run_id="r1")
    calls: list[str] = []
    spec = _spec(calls)
    log = logging.getLogger("test")
    material = {"code": "c", "config": {}, "upstream": {}}
    ref, _ = execute_stage(spec, run, "kk", material, {}, log)
    assert ref.status == "computed"
    ref, _ = execute_stage(spec, run, "kk", material, {}, log)
    assert ref.status == "cached" and calls == ["kk"]
    out = tmp_path / "wd" / "store" / "toy" / "kk" / "out.txt"
    out.write_text("resulT")
    _forget_digests()
    ref, m = execute_stage(spec, run, "kk", material, {}, log)
    assert ref.status == "computed" and calls == ["kk", "kk"]
    assert out.read_text() == "result"
    assert len(_quarantined(tmp_path / "wd" / "store", "toy")) == 1
