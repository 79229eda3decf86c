"""Training benchmark: the ``finetune`` step of the one training loop (:mod:`perceptio_core.training.trainer`).

Prints a summary and writes ``bench/results/train.json`` (``--out`` to change):

- ``samples_per_s``, ``tokens_per_s``: global batch (resp. attention-mask tokens) per second of
  optimizer step, over the steps after ``--warmup`` (median step time is reported too);
- ``data_wait_frac``: the share of step time the loop spent waiting for the next batch (loader
  workers reading shards by offset, decoding images, collating, SAM2/InternVL preprocessing);
- ``peak_memory_bytes``: CUDA max allocated on a GPU, the process's peak RSS on the CPU;
- on CUDA, ``mfu``: 6 * P_lm * tokens/s / ``--peak-flops`` (P_lm: language-model parameters, tokens:
  sequence tokens, the 6ND convention; default peak 989e12, H100 SXM bf16 dense), and
  ``mfu_with_vision``, which adds 6 * P_vision * (patches + 1) per image for the vision tower.

Shapes (``--shape``):

- ``tiny`` (default; CPU-friendly): the tiny InternVL of the default profile (``TinyVLMConfig``:
  text 4 layers x 128, vision 2 x 64, 64 px tiles), its SAM2 (``tiny-128``), LoRA rank
  ``model.lora_rank``.
- ``internvl2.5-1b``, ``internvl2.5-4b``, ``internvl2.5-8b``, ``internvl3-8b``: the released
  architecture with random weights (:mod:`perceptio_core.model.presets`: InternViT-300M + the
  language model, untied head, 256 image tokens per tile), bf16 base, LoRA rank 256 (paper
  profile), SAM2.1 Hiera-L (1024 px); images are 640 x 480, so ``--set model.max_tiles=6`` gives
  InternVL's training sequences (640 x 480 tiles as 3 x 2 + a thumbnail: 7 x 256 image tokens).
  For GPU step time and MFU; ``--smoke`` shrinks the shape to 1 layer per tower and the tiny SAM2
  to check the code path on a CPU.

Data: synthetic referring samples (random images, a mask, the perception block of N = 100 depth
codes of K = 128, a one-sentence answer) written as real curated shards and read through the real
loader. The depth tokenizer is the stand-in of the tests at the real block size (its decoder is a
1x1 convolution: L_rec's VQ-VAE decode is cheaper than the real one's).

Usage: ``python bench/bench_train.py [--shape tiny|internvl2.5-1b|internvl2.5-8b|...] [--steps 8] [--warmup 2]
[--batch-size 4] [--num-workers 2] [--device auto] [--peak-flops 989e12] [--set section.key=value]``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # perceptio_helpers: the stand-in depth codec of the tests

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from perceptio_core.config import load_config  # noqa: E402
from perceptio_core.model.presets import PRESETS  # noqa: E402
from perceptio_core.training.finetune import FinetuneTask  # noqa: E402
from perceptio_core.training.trainer import Trainer, read_history  # noqa: E402

CORPUS = [
    "Please segment the object described as: the small red cube on the left.",
    "The object is a large blue sphere near the camera.",
    "Which point is the closest to the camera? (A) (B) (C)",
    "Describe the image briefly. A green cylinder stands behind a yellow box.",
] * 50



def make_shards(out: Path, n: int, width: int, height: int, codebook_size: int, num_tokens: int) -> Path:
    from perceptio_core.data.masks import encode_mask
    from perceptio_core.format.target import format_target
    from perceptio_core.atomic_io import bytes_digest
    from perceptio_core.curation.sample import Sample, make_key
    from perceptio_core.curation.shards import write_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        img = buf.getvalue()
        mask = np.zeros((height, width), np.uint8)
        y, x = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        mask[y : y + height // 3, x : x + width // 3] = 1
        codes = rng.integers(0, codebook_size, num_tokens).tolist()
        answer = "The object is a small red cube on the left."
        samples.append(Sample(
            key=make_key("bench", i), source="refcoco", split="train", task="refer_seg",
            image_digest=bytes_digest(img), image=img, prompt=CORPUS[0], target=format_target(True, codes, answer),
            answer=answer, masks_rle=[encode_mask(mask)], depth_tokens=codes,
        ))  # fmt: skip
    write_shards(samples, out, max_samples=max(1, n // 4))
    return out


def build_base(shape: str, tokenizer, device: torch.device, smoke: bool):
    """The base InternVL of ``shape`` (random init; a released shape from
    :mod:`perceptio_core.model.presets`, in bf16) and its language-model / vision parameter counts."""
    from transformers import InternVLForConditionalGeneration

    from perceptio_core.config import TinyVLMConfig
    from perceptio_core.model.internvl import build_tiny_internvl, image_tokens
    from perceptio_core.model.presets import preset_config

    if shape == "tiny":
        model = build_tiny_internvl(TinyVLMConfig(), tokenizer, seed=0)
    else:
        _, context, _ = image_tokens(tokenizer)
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, image_token_id=tokenizer.convert_tokens_to_ids(context))
        cut = dict(num_hidden_layers=1, vision_layers=1, vocab_size=4096) if smoke else {}
        config = preset_config(shape, **ids, **cut)  # fmt: skip
        torch.manual_seed(0)
        with torch.device(device):
            model = InternVLForConditionalGeneration(config)
        model = model.to(torch.bfloat16)
    n_lm = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n)
    n_vis = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n)
    return model, n_lm, n_vis


class BenchTask(FinetuneTask):
    """:class:`FinetuneTask` with a base model object instead of a base directory."""

    def __init__(self, *args, base_model, tokenizer, **kw):
        super().__init__(*args, **kw)
        self._base_model, self._tokenizer = base_model, tokenizer

    def build_model(self):
        from perceptio_core.model.perceptio_model import PerceptioModel

        model = PerceptioModel.build(
            self.cfg.model, self.cfg.loss, self.load_depth_tokenizer(), tokenizer=self._tokenizer,
            base_model=self._base_model, seed=0,
        )  # fmt: skip
        self._collate = model.collator()
        return model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("tiny", *PRESETS), default="tiny",
                   help="tiny, or a released architecture with random weights (perceptio_core/model/presets.py)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps measured after the warm-up")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps not measured")
    p.add_argument("--batch-size", type=int, default=4, help="per process and micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-flops", type=float, default=989e12, help="accelerator peak (default: H100 bf16 dense)")
    p.add_argument("--smoke", action="store_true", help="a released shape cut to 1 layer per tower, tiny SAM2")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = p.parse_args(argv)

    from perceptio_core.model.internvl import train_tokenizer

    from perceptio_helpers import StandInDepthTokenizer

    big = args.shape != "tiny"
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    device = torch.device("cuda" if cuda else "cpu")
    codec = StandInDepthTokenizer(codebook_size=128, grid=10, code_dim=32, input_size=80)  # the paper's K, N = 100
    total = args.warmup + args.steps
    sets = [
        f"run.device={'cuda' if cuda else 'cpu'}", f"finetune.steps={total}",
        f"finetune.batch_size={args.batch_size}", f"finetune.grad_accum={args.grad_accum}",
        f"finetune.num_workers={args.num_workers}", f"finetune.checkpoint_every={10**9}",
        "finetune.keep_checkpoints=1",
    ]  # fmt: skip
    if big:
        sets += ["model.lora_rank=256", "model.lora_alpha=512", "model.dtype=bfloat16",
                 f"model.sam2_variant={'tiny-test' if args.smoke else 'sam2.1_hiera_large'}"]  # fmt: skip
    cfg = load_config("tiny", sets + args.overrides)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        n = args.batch_size * args.grad_accum * (total + 1)  # one epoch: no epoch restart measured
        side = (640, 480) if big and not args.smoke else (128, 96)
        data = make_shards(tmp / "shards", n, side[0], side[1], codec.codebook_size, codec.num_tokens)
        tok = train_tokenizer(CORPUS, cfg.model.tiny.tokenizer_vocab_size)
        base, n_lm, n_vis = build_base(args.shape, tok, device, args.smoke)
        task = BenchTask(cfg, data, depth_tokenizer=codec, base_model=base, tokenizer=tok)
        trainer = Trainer(task, cfg.finetune, tmp / "run", device=cfg.run.device)
        t0 = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        metrics = trainer.train()
        train_s = time.perf_counter() - t0
        rows = read_history(tmp / "run" / "history.jsonl")[args.warmup :]

    step_times = [r["step_time"] for r in rows]
    wall = sum(step_times)
    gb = trainer.global_batch
    tokens = sum(r["tokens"] for r in rows)
    vc = base.config.vision_config
    patches = (int(vc.image_size[0]) // int(vc.patch_size[0])) ** 2 + 1
    res = {
        "shape": args.shape + (" (smoke)" if args.smoke else ""),
        "device": str(device) if not cuda else torch.cuda.get_device_name(0),
        "processes": trainer.accelerator.num_processes,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "global_batch": gb,
        "measured_steps": len(rows),
        "step_time_median_s": statistics.median(step_times),
        "step_time_mean_s": wall / len(rows),
        "samples_per_s": gb * len(rows) / wall,
        "tokens_per_step": tokens / len(rows),
        "tokens_per_s": tokens / wall,
        "data_wait_frac": sum(r["data_time"] for r in rows) / wall,
        "peak_memory_bytes": metrics["peak_memory_bytes"],
        "parameters": metrics["parameters"],
        "trainable_parameters": metrics["trainable_parameters"],
        "lm_parameters": n_lm,
        "vision_parameters": n_vis,
        "setup_s": setup_s,
        "train_s_all_steps": train_s,
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "num_workers": args.num_workers,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if cuda:
        flops_lm = 6 * n_lm * tokens / wall
        flops_vis = 6 * n_vis * patches * gb * len(rows) / wall
        res["peak_flops"] = args.peak_flops
        res["mfu"] = flops_lm / args.peak_flops
        res["mfu_with_vision"] = (flops_lm + flops_vis) / args.peak_flops
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(
        f"{res['shape']} on {res['device']} ({res['mixed_precision']}), global batch {gb}: "
        f"{res['samples_per_s']:.2f} samples/s, {res['tokens_per_s']:.0f} tokens/s, step "
        f"{res['step_time_median_s']:.3f} s (median), data wait {100 * res['data_wait_frac']:.1f}% of step time, "
        f"peak memory {res['peak_memory_bytes'] / 2**20:.0f} MiB"
        + (f", MFU {100 * res['mfu']:.1f}% (with vision {100 * res['mfu_with_vision']:.1f}%)" if cuda else "")
    )
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
