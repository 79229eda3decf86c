"""Evaluation benchmark: generation cost with and without the perception block, evaluation throughput.

Prints a summary and writes ``bench/results/eval.json``:

- ``generation``: seconds per 100 generated tokens (median over ``--reps`` runs, one image) for
  - ``text_only``: a text prompt, no perception block (constrained decoding on, nothing to constrain);
  - ``block_constrained``: the refer prompt with the block forced open (``[SEG]<d_start>``), the
    constraint restricting N steps to the K codes then forcing ``<d_end>``; mask and depth not decoded;
  - ``block_unconstrained``: the same without the constraint (its overhead = the difference);
  - ``block_with_mask_depth``: ``block_constrained`` plus SAM2 on the ``[SEG]`` state and the VQ-VAE
    decode of the block (what the evaluators pay per refer sample), per 100 tokens and per call.
  A random model rarely emits eos, so each run generates about ``--max-new-tokens`` tokens; the
  per-100-token figure divides by the tokens actually generated.
- ``evaluation``: samples/s of :func:`perceptio_core.evaluation.evaluate.run_evaluation` on a small synthetic
  world (real readers) with the real tiny model at each ``--batch-sizes`` (``by_batch_size``: the
  same samples, one after the other in this process; ``batched_metrics_equal``: every metric the
  same at every batch size; ``model_samples_per_s`` is the first batch size's) and with an instant
  fake predictor (``overhead_samples_per_s``: ground-truth decoding, metrics, parsing, depth metrics).

The model is the tiny random one of the tests (the default ``TinyVLMConfig``, tiny-128 SAM2) with a
stand-in depth codec of the real block size (``--grid 10``: N = 100 codes, ``--codebook-size 128``),
so the block costs what it costs at N = 100. Usage:
``python bench/bench_eval.py [--reps 3] [--max-new-tokens 120] [--device cpu] [--grid 10] [--codebook-size 128]
[--batch-sizes 1,16]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # perceptio_helpers: the tiny builders of the tests

import torch  # noqa: E402

from perceptio_core.config import DataConfig, EvaluateConfig, SynthConfig  # noqa: E402
from perceptio_core.evaluation.evaluate import model_predictor, refer_prompt, run_evaluation  # noqa: E402
from perceptio_core.model.generation import generate  # noqa: E402
from perceptio_core.data.sources import read_sources  # noqa: E402
from perceptio_core.world.synth import generate_world  # noqa: E402


def build_model(device: str, codebook_size: int, grid: int):
    """The tiny model over a stand-in depth codec of K = ``codebook_size`` codes on a grid x grid
    lattice (N = grid^2): the model's K and N are that codec's."""
    from perceptio_helpers import StandInDepthTokenizer, build_tiny

    dt = StandInDepthTokenizer(codebook_size=codebook_size, grid=grid, code_dim=8, input_size=8 * grid)
    model = build_tiny(depth_tokenizer=dt).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a little structure in the random weights, as the generation tests do
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(device)


def time_generation(model, image, prompt: str, reps: int, **kw) -> dict[str, float]:
    generate(model, model.tokenizer, image, prompt, max_new_tokens=8, **{k: v for k, v in kw.items()
                                                                          if k != "max_new_tokens"})  # warm-up
    secs, toks = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = generate(model, model.tokenizer, image, prompt, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
        toks.append(len(r.token_ids))
    per100 = [s / max(t, 1) * 100 for s, t in zip(secs, toks)]
    return {"s_per_100_tokens": statistics.median(per100), "s_per_call": statistics.median(secs),
            "tokens": statistics.median(toks), "status": str(r.status)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--codebook-size", type=int, default=128)
    ap.add_argument("--grid", type=int, default=10, help="the stand-in codec's grid side: N = grid^2")
    ap.add_argument("--eval-refer-limit", type=int, default=16, help="expressions per RefCOCO split (val, testA)")
    ap.add_argument("--batch-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1, 16],
                    help="evaluation batch sizes compared side by side (comma-separated)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = build_model(args.device, args.codebook_size, args.grid)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    refer = refer_prompt("the red cube on the left")
    text = "Describe the image briefly."
    mx = args.max_new_tokens
    gen = {
        "text_only": time_generation(model, image, text, args.reps, max_new_tokens=mx, want_mask=False,
                                     want_depth=False),
        "block_constrained": time_generation(model, image, refer, args.reps, max_new_tokens=mx,
                                             response_prefix="[SEG]<d_start>", want_mask=False, want_depth=False),
        "block_unconstrained": time_generation(model, image, refer, args.reps, max_new_tokens=mx, constrained=False,
                                               response_prefix="[SEG]<d_start>", want_mask=False, want_depth=False),
        "block_with_mask_depth": time_generation(model, image, refer, args.reps, max_new_tokens=mx,
                                                 response_prefix="[SEG]<d_start>"),
    }  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        # large enough that every benchmark split fills batches of 16, as the default world's do
        generate_world(root, SynthConfig(images=96, ade_images=4, hardblink_per_count=16, vqa_questions=32,
                                         mme_images=4, width=128, height=96, seed=0))  # fmt: skip
        src = read_sources(root, DataConfig(), cache_dir=Path(tmp) / "cache")
        predict = model_predictor(model, max_new_tokens=mx)
        runs = {}
        for bs in args.batch_sizes:  # side by side in one process: the same samples at each batch size
            cfg = EvaluateConfig(refer_datasets=["refcoco"], refer_splits=["val", "testA"],
                                 refer_limit=args.eval_refer_limit, hardblink_limit=0, mcq_limit=0, mme_limit=0,
                                 unconstrained_limit=0, max_new_tokens=mx, batch_size=bs)  # fmt: skip
            t0 = time.perf_counter()
            ev = run_evaluation(predict, src, cfg, depth_spec=model.depth_spec)
            secs = time.perf_counter() - t0
            n = int(sum(v for k, v in ev.metrics.items() if k.endswith(".n") and ".category." not in k
                        and not k.startswith(("depth.", "perception"))))
            runs[bs] = {"samples": n, "seconds": secs, "samples_per_s": n / secs, "metrics": ev.metrics}
        first = runs[args.batch_sizes[0]]["metrics"]
        same = all(r["metrics"].keys() == first.keys() and all(
            (math.isnan(first[k]) and math.isnan(v)) or abs(first[k] - v) < 1e-6 for k, v in r["metrics"].items())
            for r in runs.values())
        n_model, model_s = runs[args.batch_sizes[0]]["samples"], runs[args.batch_sizes[0]]["seconds"]
        fake = lambda image, prompt: SimpleNamespace(text="(A)", mask=None, depth_map=None, depth_indices=None)
        full = EvaluateConfig(refer_limit=0, hardblink_limit=0, mcq_limit=0, mme_limit=0, unconstrained_limit=0)
        t0 = time.perf_counter()
        ev_fake = run_evaluation(fake, src, full, depth_spec=model.depth_spec)
        fake_s = time.perf_counter() - t0
        n_fake = int(sum(v for k, v in ev_fake.metrics.items() if k.endswith(".n") and ".category." not in k
                         and not k.startswith(("depth.", "perception"))))

    result = {
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],  # other processes on a shared machine skew the timings
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model": {"num_depth_tokens": model.num_depth_tokens, "codebook_size": model.codebook_size,
                  "build_s": round(build_s, 2)},
        "max_new_tokens": mx,
        "reps": args.reps,
        "generation": gen,
        "block_overhead_ratio": gen["block_constrained"]["s_per_100_tokens"] / gen["text_only"]["s_per_100_tokens"],
        "constraint_overhead_ratio": (gen["block_constrained"]["s_per_100_tokens"]
                                      / gen["block_unconstrained"]["s_per_100_tokens"]),
        "evaluation": {"model_samples": n_model, "model_samples_per_s": n_model / model_s,
                       "overhead_samples": n_fake, "overhead_samples_per_s": n_fake / fake_s,
                       "by_batch_size": {str(bs): {k: v for k, v in r.items() if k != "metrics"}
                                         for bs, r in runs.items()},
                       "batched_metrics_equal": same},
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {result['load_average_1m']:.1f} on {os.cpu_count()} CPUs (timings are skewed by other work)")
    print(f"device {args.device}, N={model.num_depth_tokens}, K={model.codebook_size}, max_new_tokens={mx}")
    for k, v in gen.items():
        print(f"  {k:24s} {v['s_per_100_tokens']:.3f} s / 100 tokens  ({v['tokens']:.0f} tokens, "
              f"{v['s_per_call']:.3f} s per call, {v['status']})")
    print(f"  block / text-only: {result['block_overhead_ratio']:.2f}x; "
          f"constrained / unconstrained: {result['constraint_overhead_ratio']:.2f}x")
    e = result["evaluation"]
    print(f"  evaluation: {e['model_samples_per_s']:.2f} samples/s with the model ({e['model_samples']} samples); "
          f"{e['overhead_samples_per_s']:.0f} samples/s evaluator overhead ({e['overhead_samples']} samples)")
    for bs, r in e["by_batch_size"].items():
        print(f"  evaluation at batch size {bs:>2}: {r['samples_per_s']:.2f} samples/s ({r['samples']} samples, "
              f"{r['seconds']:.1f} s)")
    sizes = list(e["by_batch_size"])
    if len(sizes) > 1:
        a, b = e["by_batch_size"][sizes[0]], e["by_batch_size"][sizes[-1]]
        print(f"  batch {sizes[-1]} / batch {sizes[0]}: {b['samples_per_s'] / a['samples_per_s']:.2f}x; "
              f"metrics equal: {e['batched_metrics_equal']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
