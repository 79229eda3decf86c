"""WebDataset shards: read back, manifest, rollover, and kill-then-resume giving identical bytes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from perceptio_core.data.records import QuarantineEntry
from perceptio_core.curation.sample import sample_json
from perceptio_core.curation.shards import (
    MANIFEST_SCHEMA,
    QuarantineLog,
    ResumeMismatchError,
    ShardWriter,
    index_name,
    read_shards,
    shard_name,
    shard_paths,
    verify_read_back,
    write_shards,
)

ROOT = Path(__file__).resolve().parents[3]  # the repository root

# the deterministic sample stream, shared with the killed subprocess
GEN_SRC = textwrap.dedent(
    '''
    import io
    import numpy as np
    from PIL import Image
    from perceptio_core.data.masks import encode_mask
    from perceptio_core.atomic_io import bytes_digest
    from perceptio_core.curation.sample import Sample, make_key

    def make_samples(n, seed=0):
        rng = np.random.default_rng(seed)
        for i in range(n):
            w, h = int(rng.integers(8, 40)), int(rng.integers(8, 40))
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG" if i % 2 else "JPEG")
            img = buf.getvalue()
            has_mask = i % 3 != 0
            yield Sample(
                key=make_key("src", "train", i), source=("refcoco", "ade20k")[i % 2], split="train",
                task="refer_seg", image_digest=bytes_digest(img), image=img, prompt=f"p{i}",
                target=f"t{i}", answer=f"a{i}",
                masks_rle=[encode_mask(rng.random((h, w)) > 0.5)] if has_mask else [],
                depth_tokens=rng.integers(0, 16, 9).tolist() if i % 4 else None,
                upstream={"sources": "s"}, meta={"i": i},
            )
    '''
)
_ns: dict = {}
exec(GEN_SRC, _ns)
make_samples = _ns["make_samples"]

N, MAX_SAMPLES, MAX_BYTES = 37, 5, 12_000


def _digests(d: Path) -> dict[str, str]:
    return {p.name: __import__("hashlib").sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    shards = write_shards(make_samples(N), out, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    return out, shards


def test_read_back_equals_stream_and_manifest(reference):
    out, shards = reference
    assert sum(s.n_samples for s in shards) == N and len(shards) > N // MAX_SAMPLES
    table = pq.read_table(out / "manifest.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA)
    rows = table.to_pylist()
    back = list(read_shards(shard_paths(out, shards)))
    orig = list(make_samples(N))
    assert [s.key for s in back] == [r["key"] for r in rows] == [s.key for s in orig]
    for a, b, r in zip(back, orig, rows):
        assert sample_json(a) == sample_json(b) and a.image == b.image
        assert (r["source"], r["split"], r["task"], r["image_digest"]) == (b.source, b.split, b.task, b.image_digest)
        assert (r["has_mask"], r["has_depth"]) == (b.has_mask, b.has_depth)
    _check_offsets(out, rows)


def _check_offsets(out, rows):
    """The manifest offset points at the sample's first member (json), with fixed header fields."""
    for r in rows:
        with open(out / r["shard"], "rb") as f:
            f.seek(r["offset"])
            with tarfile.open(fileobj=f, mode="r:") as tf:
                ti = tf.next()
                assert ti.name == f"{r['key']}.json" and ti.mtime > 0 and ti.uid == 0 and ti.uname == ""
                assert ti.mode == 0o444


def test_long_keys_round_trip(tmp_path):
    long = [dataclasses.replace(s, key=s.key + "-" + "x" * 150) for s in make_samples(4)]
    shards = write_shards(long, tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    assert [s.key for s in read_shards(shard_paths(tmp_path, shards))] == [s.key for s in long]
    _check_offsets(tmp_path, pq.read_table(tmp_path / "manifest.parquet").to_pylist())


def test_verify_read_back(reference, tmp_path):
    out, shards = reference
    assert verify_read_back(out) == N
    # a manifest that disagrees with its shards is caught
    table = pq.read_table(out / "manifest.parquet")
    bad = table.set_column(0, "key", pa.array(["x"] + table["key"].to_pylist()[1:]))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="sample 0"):
        verify_read_back(out, tmp_path / "bad.parquet")
    pq.write_table(table.slice(0, N - 1), tmp_path / "short.parquet")
    with pytest.raises(ValueError, match="more samples|names shards"):
        verify_read_back(out, tmp_path / "short.parquet")
    last = table["shard"][N - 1].as_py()
    pq.write_table(table.filter(pa.compute.not_equal(table["shard"], last)), tmp_path / "fewer.parquet")
    with pytest.raises(ValueError, match="names shards"):
        verify_read_back(out, tmp_path / "fewer.parquet")


def test_rollover_limits(reference):
    out, shards = reference
    for s in shards:
        assert s.n_samples <= MAX_SAMPLES
        assert s.n_bytes <= MAX_BYTES + tarfile.RECORDSIZE
        idx = json.loads((out / index_name("samples", s.index)).read_text())
        assert idx["sha256"] == s.sha256 and idx["n_samples"] == len(idx["rows"])


def test_deterministic_bytes(reference, tmp_path):
    out, _ = reference
    write_shards(make_samples(N), tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    assert _digests(tmp_path) == _digests(out)


def _failing(n_ok):
    for i, s in enumerate(make_samples(N)):
        if i == n_ok:
            raise KeyboardInterrupt("simulated kill")
        yield s


def test_exception_then_resume_is_byte_identical(reference, tmp_path):
    out, _ = reference
    with pytest.raises(KeyboardInterrupt):
        write_shards(_failing(17), tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    assert not (tmp_path / "manifest.parquet").exists()
    assert list(tmp_path.glob(".*.tmp"))  # the open shard was left as a temp file
    n_done = len(list(tmp_path.glob("*.idx.json")))
    w = ShardWriter(tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    assert len(w.shards) == n_done and 0 < w.resume_count <= 17
    assert not list(tmp_path.glob(".*.tmp"))  # temp files are removed, never trusted
    for s in make_samples(N):
        w.write(s)
    w.close()
    assert w.n_skipped == w.resume_count and w.n_written == N - w.resume_count
    assert _digests(tmp_path) == _digests(out)


def test_sigkill_mid_shard_then_resume(reference, tmp_path):
    out, _ = reference
    script = GEN_SRC + textwrap.dedent(
        f'''
        import os, signal
        from perceptio_core.curation.shards import write_shards
        def stream():
            for i, s in enumerate(make_samples({N})):
                if i == 23:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield s
        write_shards(stream(), {str(tmp_path)!r}, max_bytes={MAX_BYTES}, max_samples={MAX_SAMPLES})
        '''
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".*.tmp"))
    write_shards(make_samples(N), tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    assert _digests(tmp_path) == _digests(out)
    assert pq.read_table(tmp_path / "manifest.parquet").equals(pq.read_table(out / "manifest.parquet"))


def test_untrusted_shards_are_rewritten(reference, tmp_path):
    out, shards = reference
    write_shards(make_samples(N), tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    # shard 2 corrupted (same size, other bytes), shard 4 without its index, and a stale temp file
    p2 = tmp_path / shard_name("samples", 2)
    data = bytearray(p2.read_bytes())
    data[700] ^= 0xFF
    p2.write_bytes(bytes(data))
    (tmp_path / index_name("samples", 4)).unlink()
    (tmp_path / ".samples-000005.tar.tmp").write_bytes(b"half a shard")
    w = ShardWriter(tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    assert len(w.shards) == 2 and w.resume_count == shards[0].n_samples + shards[1].n_samples
    assert not (tmp_path / shard_name("samples", 4)).exists()
    w.abandon()
    write_shards(make_samples(N), tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    assert _digests(tmp_path) == _digests(out)


def test_changed_stream_is_refused(reference, tmp_path):
    write_shards(make_samples(N), tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    with pytest.raises(ResumeMismatchError):
        write_shards(make_samples(N, seed=1), tmp_path, max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    write_shards(make_samples(N), tmp_path / "b", max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)
    with pytest.raises(ResumeMismatchError):
        write_shards(make_samples(3), tmp_path / "b", max_bytes=MAX_BYTES, max_samples=MAX_SAMPLES)


def test_quarantine_log(tmp_path):
    with QuarantineLog(tmp_path / "q.parquet", batch_rows=2) as q:
        q.add(QuarantineEntry("coco", "image_id=3", "missing image"))
        for i in range(4):
            q.add("refcoco", f"ref_id={i}", "near-duplicate expression")
    rows = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert len(rows) == 5 and rows[0] == {"source": "coco", "record": "image_id=3", "reason": "missing image"}
    with QuarantineLog(tmp_path / "empty.parquet"):
        pass
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0
