"""Depth benchmark (SPEC §2): the teacher stage's throughput and overhead, the VQ-VAE tokenizer's speed,
and (``--quality``) the science numbers of the default world.

Prints a table and writes ``bench/results/depth.json`` (``--out`` to change; the ``speed`` and
``quality`` sections are updated independently, so a speed run keeps the last quality numbers):

- ``teacher.predict_images_per_s``: images/s through :func:`perceptio_core.depth.teacher.predict_depth`
  (DataLoader reading and preprocessing the files, forward, resize, normalisation, checks);
- ``teacher.bare_images_per_s``: the bare ``model(pixel_values)`` forward on the same preprocessed
  batches, already on the device (:func:`~perceptio_core.depth.teacher.bare_forward_throughput`);
- ``teacher.overhead_ratio``: bare / predict (1.0 = no overhead; target <= 1.15), medians over
  ``--repeats`` alternating measurements (each repeat's ratio is kept too);
- ``vqvae.encode_maps_per_s`` / ``decode_maps_per_s`` / ``soft_decode_maps_per_s``: the
  :class:`~perceptio_core.depth.tokenizer.DepthTokenizer` on random maps (random weights: the speed
  does not depend on them);
- ``peak_rss_mb`` (the process, from ``resource``) and, on CUDA, ``cuda_max_allocated_mb``.

Sizes (``--size``): ``tiny`` (default, CPU): the default profile's teacher (hidden 64, 4 layers, input
112, maps 80) and VQ-VAE (80 px, x8, K = 128, D = 128) on 128x96 images. ``small``: a
Depth-Anything-V2-Small-shaped teacher (DINOv2 ViT-S/14, 12 layers, hidden 384, neck 48-96-192-384,
fusion 64; random weights) at 518 px on 640x480 images, bf16 autocast on a GPU, and the paper-scale
VQ-VAE (320 px, x32, hidden 128).

``--quality``: generate the default synthetic world (``perceptio_core.world.synth``), fit the teacher with
the default config (:func:`~perceptio_core.training.teacher_fit.fit_teacher`; held-out AbsRel, delta1
and pair-order accuracy against the true depth), run it over every image, train the VQ-VAE on the
maps (:func:`~perceptio_core.training.vqvae_fit.train_vqvae`, the images held out by digest as in the
pipeline; held-out MSE/AbsRel/delta1 vs the teacher, code usage, perplexity) and report the
wall-clock time of each step.

Usage: ``python bench/bench_depth.py [--size tiny|small] [--device auto] [--images 64]
[--batch-size 16] [--num-workers 0] [--precision auto] [--threads 0] [--quality] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import DepthAnythingForDepthEstimation  # noqa: E402

from perceptio_core.config import SynthConfig, TeacherConfig, TeacherFitConfig, VQVAEConfig  # noqa: E402
from perceptio_core.depth.teacher import (  # noqa: E402
    bare_forward_throughput,
    build_teacher_config,
    build_teacher_processor,
    load_teacher,
    predict_depth,
)
from perceptio_core.depth.tokenizer import DepthTokenizer  # noqa: E402
from perceptio_core.depth.vqvae import VQVAE  # noqa: E402
from perceptio_core.device import resolve_device, synchronize  # noqa: E402
from perceptio_core.training.schedule import split_by_digest  # noqa: E402
from perceptio_core.training.teacher_fit import fit_teacher  # noqa: E402
from perceptio_core.training.vqvae_fit import train_vqvae  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        fit=TeacherFitConfig(),
        input_size=TeacherConfig().input_size,
        map_size=TeacherConfig().map_size,
        image_wh=(128, 96),
        vqvae=VQVAEConfig(),
    ),
    "small": dict(
        fit=TeacherFitConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, fusion_hidden_size=64),
        input_size=518,
        map_size=320,
        image_wh=(640, 480),
        vqvae=VQVAEConfig(input_size=320, hidden=128),
    ),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def write_images(folder: Path, n: int, wh: tuple[int, int], seed: int = 0) -> list[str]:
    """``n`` smooth random RGB images (JPEG-sized content, PNG files) of size ``wh``."""
    rng = np.random.default_rng(seed)
    w, h = wh
    paths = []
    for i in range(n):
        low = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
        p = folder / f"img_{i:05d}.png"
        img.save(p)
        paths.append(str(p))
    return paths


def bench_teacher(args: argparse.Namespace, size: dict[str, Any], work: Path, dev: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    ckpt = work / "teacher"
    model = DepthAnythingForDepthEstimation(build_teacher_config(size["fit"], size["input_size"]))
    model.save_pretrained(ckpt)
    build_teacher_processor(size["input_size"]).save_pretrained(ckpt)
    del model
    model, processor = load_teacher(str(ckpt), dev)
    paths = write_images(work, args.images, size["image_wh"])
    kw = dict(batch_size=args.batch_size, device=dev, precision=args.precision)
    # warm-up (allocator, kernels, worker start-up path)
    for _ in predict_depth(model, processor, paths[: args.batch_size], map_size=size["map_size"], **kw):
        pass
    # alternate the two measurements and keep medians: a shared machine's load drifts between runs
    bares, predicts, errors = [], [], 0
    for _ in range(args.repeats):
        bares.append(bare_forward_throughput(model, processor, paths, **kw))
        synchronize(dev)
        t0 = time.perf_counter()
        errors = 0
        for r in predict_depth(model, processor, paths, num_workers=args.num_workers, map_size=size["map_size"],
                               **kw):
            errors += r.error is not None
        synchronize(dev)
        predicts.append(len(paths) / (time.perf_counter() - t0))
    bare, predict = statistics.median(bares), statistics.median(predicts)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "input_size": size["input_size"],
        "map_size": size["map_size"],
        "images": len(paths),
        "image_wh": list(size["image_wh"]),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "errors": errors,
        "bare_images_per_s": bare,
        "predict_images_per_s": predict,
        "overhead_ratio": bare / predict,
        "repeats": args.repeats,
        "overhead_ratio_per_repeat": [b / p for b, p in zip(bares, predicts)],
    }


def _rate(fn, n_items: int, dev: torch.device, repeats: int) -> float:
    fn()
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(dev)
    return n_items * repeats / (time.perf_counter() - t0)


def bench_vqvae(args: argparse.Namespace, size: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg: VQVAEConfig = size["vqvae"]
    tok = DepthTokenizer(VQVAE(cfg)).to(dev)
    b = args.vq_batch
    maps = torch.rand(b, cfg.input_size, cfg.input_size, device=dev)
    idx = tok.encode(maps)
    logits = torch.randn(b, cfg.num_tokens, cfg.codebook_size, device=dev)
    out = {
        "input_size": cfg.input_size,
        "grid": cfg.grid,
        "codebook_size": cfg.codebook_size,
        "batch": b,
        "params": sum(p.numel() for p in tok.vqvae.parameters()),
        "encode_maps_per_s": _rate(lambda: tok.encode(maps), b, dev, args.repeats),
        "decode_maps_per_s": _rate(lambda: tok.decode(idx), b, dev, args.repeats),
    }
    with torch.no_grad():
        out["soft_decode_maps_per_s"] = _rate(lambda: tok.soft_decode(logits), b, dev, args.repeats)
    return out


def run_quality(args: argparse.Namespace, work: Path, dev: torch.device) -> dict[str, Any]:
    """Fit the teacher and the VQ-VAE on the default synthetic world; metrics and wall-clock times."""
    from perceptio_core.config import DataConfig
    from perceptio_core.data.sources import read_sources
    from perceptio_core.world.synth import generate_world

    world = Path(args.world) if args.world else work / "world"
    t0 = time.perf_counter()
    generate_world(world, SynthConfig())
    images = read_sources(world, DataConfig(), cache_dir=work / "cache").depth_images()
    world_s = time.perf_counter() - t0
    tcfg = TeacherConfig()
    t0 = time.perf_counter()
    fit = fit_teacher(images, tcfg.fit, tcfg.input_size, work / "fitted", dev, map_size=tcfg.map_size)
    fit_s = time.perf_counter() - t0
    model, processor = load_teacher(str(work / "fitted" / "model"), dev)
    t0 = time.perf_counter()
    maps = {images[r.index].digest: r.map
            for r in predict_depth(model, processor, [r.path for r in images], batch_size=tcfg.batch_size,
                                   device=dev, map_size=tcfg.map_size) if r.error is None}  # fmt: skip
    teacher_s = time.perf_counter() - t0
    vcfg = VQVAEConfig()
    train, hold = split_by_digest(sorted(maps), vcfg.holdout_fraction)
    t0 = time.perf_counter()
    vq = train_vqvae(np.stack([maps[d] for d in train]), np.stack([maps[d] for d in hold]), vcfg, work / "vqvae", dev)
    vq_s = time.perf_counter() - t0
    pick = ("holdout_images", "holdout_absrel", "holdout_delta1", "holdout_pair_order", "train_absrel",
            "train_pair_order", "loss_last")
    return {
        "images": len(images),
        "teacher_fit": {k: fit[k] for k in pick},
        "vqvae": {k: vq[k] for k in ("holdout_maps", "recon_mse", "recon_absrel", "delta1", "train_delta1",
                                      "code_usage", "perplexity", "restarts")},
        "seconds": {"world": world_s, "fit_teacher": fit_s, "teacher_depth": teacher_s, "train_vqvae": vq_s},
    }


def print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        val = f"{v:.4g}" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {val}")


def flatten(prefix: str, d: dict[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flatten(f"{prefix}{k}.", v)
        else:
            out.append((f"{prefix}{k}", v))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--vq-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave the default)")
    ap.add_argument("--quality", action="store_true", help="also fit teacher + VQ-VAE on the default world")
    ap.add_argument("--world", default="", help="an existing default-config world folder for --quality")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "depth.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    size = SIZES[args.size]
    env = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "precision": args.precision,
    }
    results: dict[str, Any] = {}
    out = Path(args.out)
    if out.exists():
        try:
            results = json.loads(out.read_text())
        except json.JSONDecodeError:
            results = {}
    with tempfile.TemporaryDirectory(prefix="bench-depth-") as tmp:
        work = Path(tmp)
        if not args.skip_speed:
            speed = {"size": args.size, "env": env, "teacher": bench_teacher(args, size, work, dev),
                     "vqvae": bench_vqvae(args, size, dev)}
            speed["peak_rss_mb"] = peak_rss_mb()
            if dev.type == "cuda":
                speed["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            results["speed"] = speed
            print(f"depth speed ({args.size}, {env['device']}, {env['threads']} threads)")
            print_table(flatten("", {k: v for k, v in speed.items() if k != "env"}))
        if args.quality:
            quality = {"env": env, **run_quality(args, work, dev)}
            results["quality"] = quality
            print(f"depth quality (default world, {env['device']}, {env['threads']} threads)")
            print_table(flatten("", {k: v for k, v in quality.items() if k != "env"}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
