"""Curation shards benchmark: write throughput vs a plain tar, peak memory at N and 4N, read-back.

Prints a summary and writes ``bench/results/curate.json``:

- ``write``: MB/s of :class:`perceptio_core.curation.shards.ShardWriter` (deterministic headers, sha256,
  fsync + atomic rename per shard, per-shard index) writing N samples, against ``tarfile`` writing
  the very same members into one plain tar (no hashing, no fsync); ``ratio`` = ours / plain.
- ``memory``: peak RSS (``ru_maxrss``) of a fresh subprocess that streams N, then 4N samples through
  :func:`perceptio_core.curation.shards.write_shards` (shards + manifest); bounded memory means the 4N/N
  ratio stays near 1.
- ``read``: samples/s of :func:`perceptio_core.curation.shards.read_shards` (webdataset, json decoded) and
  with the image decoded to an RGB array (PIL).
- ``curate_world``: samples/s of :func:`perceptio_core.curation.curate.iter_samples` on a small synthetic
  world (real readers, fake depth tokens): the cost of building samples (mask decoding, RLE, PNG
  re-encoding of the drawn depth chain-of-thought images).

Samples are built from a pool of distinct JPEG images (``--image-size``) cycled under distinct
keys, with a 100-token depth block and a mask RLE, so the numbers reflect the shard layer, not image
generation. Usage: ``python bench/bench_curate.py [--n 5000] [--image-size 256]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perceptio_core.data.masks import encode_mask  # noqa: E402
from perceptio_core.format.target import format_target  # noqa: E402
from perceptio_core.atomic_io import bytes_digest  # noqa: E402
from perceptio_core.curation.sample import Sample, make_key  # noqa: E402
from perceptio_core.curation.shards import (  # noqa: E402
    TAR_FORMAT,
    ShardWriter,
    _members,
    read_shards,
    shard_paths,
    write_manifest,
)


def image_pool(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct smooth JPEGs of ``size`` x ``3/4 size`` (photo-like entropy, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size * 3 // 4, size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        f = rng.uniform(2, 9, 3)
        base = np.stack([np.sin(f[c] * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))) for c in range(3)], -1)
        arr = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_stream(n: int, pool: list[bytes], seed: int = 0):
    """A lazy stream of ``n`` refer-style samples cycling through ``pool``."""
    rng = np.random.default_rng(seed)
    digests = [bytes_digest(b) for b in pool]
    masks = []
    for i in range(8):
        m = np.zeros((48, 64), bool)
        m[4 + i : 30 + i, 6 : 40 + 2 * i] = True
        masks.append(encode_mask(m))
    for i in range(n):
        j = i % len(pool)
        tokens = rng.integers(0, 128, 100).tolist()
        answer = "A large red box on the left side of the image, close to the camera."
        yield Sample(
            key=make_key("bench", "train", f"r{i}", "s0"), source="refcoco", split="train", task="refer_seg",
            image_digest=digests[j], image=pool[j],
            prompt="Please segment the object described as: red box on the left. Show its mask and the "
            "depth of the scene before answering.",
            target=format_target(True, tokens, answer), answer=answer, masks_rle=[masks[i % 8]],
            depth_tokens=tokens, upstream={"sources": "bench", "tokenize_depth": "bench"},
            meta={"ref_id": i, "sent_id": 0, "ann_id": i, "image_id": j, "sentence": "red box on the left"},
        )  # fmt: skip


def bench_write(n: int, pool: list[bytes], tmp: Path, max_bytes: int) -> dict:
    samples = list(make_stream(n, pool))
    out = tmp / "write"
    t0 = time.perf_counter()
    w = ShardWriter(out, max_bytes=max_bytes, max_samples=10**9, verify=False)
    for s in samples:
        w.write(s)
    shards = w.close()
    t_ours = time.perf_counter() - t0
    n_bytes = sum(s.n_bytes for s in shards)
    t0 = time.perf_counter()
    write_manifest(out, shards)
    t_manifest = time.perf_counter() - t0
    plain = tmp / "plain.tar"
    t0 = time.perf_counter()
    with tarfile.open(plain, "w", format=TAR_FORMAT) as tf:
        for s in samples:
            for ti, data in _members(s):
                tf.addfile(ti, io.BytesIO(data))
    t_plain = time.perf_counter() - t0
    plain_bytes = plain.stat().st_size
    shutil.rmtree(out)
    plain.unlink()
    ours = n_bytes / t_ours / 1e6
    base = plain_bytes / t_plain / 1e6
    return {
        "n_samples": n, "n_shards": len(shards), "bytes": n_bytes, "plain_tar_bytes": plain_bytes,
        "ours_MBps": round(ours, 1), "plain_tar_MBps": round(base, 1), "ratio": round(ours / base, 3),
        "manifest_s": round(t_manifest, 3),
    }  # fmt: skip


_RSS_CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from bench.bench_curate import image_pool, make_stream
from perceptio_core.curation.shards import write_shards
pool = image_pool({pool}, {size})
t0 = time.perf_counter()
shards = write_shards(make_stream({n}, pool), {out!r}, max_bytes={max_bytes}, max_samples=10**9, verify=False)
dt = time.perf_counter() - t0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(shards), dt)
"""


def peak_rss(n: int, pool: int, size: int, out: Path, max_bytes: int) -> dict:
    code = _RSS_CHILD.format(root=str(ROOT), pool=pool, size=size, n=n, out=str(out), max_bytes=max_bytes)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    kb, n_shards, dt = res.stdout.split()
    shutil.rmtree(out)
    return {"n_samples": n, "n_shards": int(n_shards), "peak_rss_MB": round(int(kb) / 1024, 1),
            "samples_per_s": round(n / float(dt), 1)}  # fmt: skip


def bench_read(n: int, pool: list[bytes], tmp: Path, max_bytes: int) -> dict:
    from PIL import Image

    out = tmp / "read"
    w = ShardWriter(out, max_bytes=max_bytes, max_samples=10**9, verify=False)
    for s in make_stream(n, pool):
        w.write(s)
    paths = shard_paths(out, w.close())
    for _ in read_shards(paths[:1]):  # warm-up: webdataset's (and torch's) import, page cache
        break
    t0 = time.perf_counter()
    k = sum(1 for _ in read_shards(paths))
    t_json = time.perf_counter() - t0
    t0 = time.perf_counter()
    k2 = 0
    for s in read_shards(paths):
        with Image.open(io.BytesIO(s.image)) as im:
            np.asarray(im.convert("RGB"))
        k2 += 1
    t_img = time.perf_counter() - t0
    shutil.rmtree(out)
    assert k == k2 == n
    return {"n_samples": n, "samples_per_s": round(n / t_json, 1),
            "samples_per_s_with_image_decode": round(n / t_img, 1)}  # fmt: skip


def bench_curate_world(tmp: Path, images: int) -> dict:
    from perceptio_core.config import CurateConfig, DataConfig, SynthConfig
    from perceptio_core.curation.curate import iter_samples
    from perceptio_core.curation.inputs import CurateStats
    from perceptio_core.data.masks import resize_nearest
    from perceptio_core.data.sources import read_sources
    from perceptio_core.world.synth import generate_world

    root = tmp / "world"
    generate_world(root, SynthConfig(images=images, ade_images=images // 2, hardblink_per_count=1, vqa_questions=2))
    src = read_sources(root, DataConfig(), cache_dir=tmp / "cache")
    rng = np.random.default_rng(0)
    tokens, maps = {}, {}
    for rec in src.depth_images():
        inv = 1.0 / np.load(rec.depth_path)
        maps[rec.digest] = resize_nearest((inv - inv.min()) / np.ptp(inv), 80, 80).astype(np.float32)
        tokens[rec.digest] = rng.integers(0, 128, 100)
    stats = CurateStats()
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_samples(src, tokens, maps, CurateConfig(), {}, stats))
    dt = time.perf_counter() - t0
    shutil.rmtree(root)
    return {"world_images": images, "n_samples": n, "samples_per_s": round(n / dt, 1), "tasks": dict(stats.tasks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="N for the write/read/memory runs (memory also runs 4N)")
    ap.add_argument("--image-size", type=int, default=256, help="width of the pooled JPEGs")
    ap.add_argument("--pool", type=int, default=64, help="distinct images cycled through")
    ap.add_argument("--shard-mb", type=float, default=16.0, help="shard_max_bytes in MB")
    ap.add_argument("--world-images", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "curate.json"))
    args = ap.parse_args()
    max_bytes = int(args.shard_mb * 1024 * 1024)
    pool = image_pool(args.pool, args.image_size)
    with tempfile.TemporaryDirectory(prefix="bench_curate_") as d:
        tmp = Path(d)
        result = {
            "config": {**vars(args), "mean_image_bytes": int(np.mean([len(b) for b in pool])),
                       "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
            "write": bench_write(args.n, pool, tmp, max_bytes),
            "memory": {
                "N": peak_rss(args.n, args.pool, args.image_size, tmp / "m1", max_bytes),
                "4N": peak_rss(4 * args.n, args.pool, args.image_size, tmp / "m4", max_bytes),
            },
            "read": bench_read(args.n, pool, tmp, max_bytes),
            "curate_world": bench_curate_world(tmp, args.world_images),
        }  # fmt: skip
    m = result["memory"]
    m["ratio_4N_over_N"] = round(m["4N"]["peak_rss_MB"] / m["N"]["peak_rss_MB"], 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    w, r = result["write"], result["read"]
    print(f"write: {w['ours_MBps']} MB/s vs plain tar {w['plain_tar_MBps']} MB/s (ratio {w['ratio']}), "
          f"{w['n_shards']} shards, manifest {w['manifest_s']} s")
    print(f"peak RSS: N={m['N']['n_samples']}: {m['N']['peak_rss_MB']} MB, 4N={m['4N']['n_samples']}: "
          f"{m['4N']['peak_rss_MB']} MB (ratio {m['ratio_4N_over_N']})")
    print(f"read back: {r['samples_per_s']} samples/s (json), "
          f"{r['samples_per_s_with_image_decode']} with image decode")
    c = result["curate_world"]
    print(f"iter_samples on a {c['world_images']}-image world: {c['samples_per_s']} samples/s "
          f"({c['n_samples']} samples)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
