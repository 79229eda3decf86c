"""How far can the mask path get on RefCOCO with a given SAM2, whatever the language model does?

Three ceilings on the referring masks of one split (RefCOCO val by default, every expression),
each with the SAM2 that fine-tuning would use (``fit_sam2``'s or Meta's checkpoint) and its image
encoder frozen, as fine-tuning freezes it (SPEC §4):

- ``point``: SAM2 prompted with the true mask's centre point (``sam2_fit.centre_point``). A model
  whose ``[SEG]`` state said exactly where the object is, and nothing more, would reach about this.
- ``box``: SAM2 prompted with the true box.
- ``text``: no location given. The mask decoder is trained, from the checkpoint, together with a
  small word-level transformer over the expression (2 layers, 128-d, the training split's words)
  whose pooled output is the one sparse prompt, as the projected ``[SEG]`` state is. This is a
  language model that understands the expression perfectly well but is not told where the object
  is: the decoder has to find it in the frozen image features.

On the default world (fit_sam2 tiny-128, 2 CPU cores) the three figures show whether a poor
RefCOCO cIoU comes from the language model's localisation or from the SAM2 side. Prints a summary
and writes ``bench/results/seg_ceiling.json``.

Usage: ``python bench/bench_seg_ceiling.py --workdir perceptio-work`` (the world and the newest
fit_sam2 checkpoint of that work folder), or ``--world DIR --sam2 PATH [--variant tiny-128]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from perceptio_core.config import DataConfig  # noqa: E402
from perceptio_core.model.losses import mask_bce_loss, mask_dice_loss  # noqa: E402
from perceptio_core.evaluation.metrics import IoUAccumulator, resize_mask  # noqa: E402
from perceptio_core.data.records import normalise_split  # noqa: E402
from perceptio_core.data.refer import ann_to_mask  # noqa: E402
from perceptio_core.model.sam2_decoder import SAM2Features, build_sam2, sam2_pixel_values, upsample_logits  # noqa: E402
from perceptio_core.training.sam2_fit import centre_point, prompt_masks  # noqa: E402
from perceptio_core.data.sources import read_sources  # noqa: E402


def locate(workdir: Path) -> tuple[Path, Path, str]:
    """The world and the newest fit_sam2 checkpoint (with its variant) of a work folder."""
    worlds = [p for p in (workdir / "worlds").glob("*") if p.is_dir() and ".tmp" not in p.name]
    if len(worlds) != 1:
        raise SystemExit(f"{workdir}/worlds: expected one world, found {len(worlds)}; pass --world")
    ckpts = sorted((workdir / "store" / "fit_sam2").glob("*/model/sam2.pt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise SystemExit(f"{workdir}/store/fit_sam2: no checkpoint; run the pipeline first or pass --sam2")
    variant = json.loads((ckpts[-1].parent / "config.json").read_text())["variant"]
    return worlds[0], ckpts[-1], variant


def words(sentence: str) -> list[str]:
    return re.findall(r"[a-z]+", sentence.lower())


class WordPrompt(nn.Module):
    """Expression -> one sparse prompt [B, 1, C]: word + position embeddings, a 2-layer transformer
    encoder, mean over the words, an MLP (the shape of ``seg_projection``)."""

    def __init__(self, vocab: dict[str, int], dim: int, max_words: int = 32) -> None:
        super().__init__()
        self.vocab, self.max_words = vocab, max_words
        self.emb = nn.Embedding(len(vocab) + 1, 128, padding_idx=0)
        self.pos = nn.Embedding(max_words, 128)
        layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, dim))

    def forward(self, sentences: list[str]) -> torch.Tensor:
        ids = [[self.vocab.get(w, 0) for w in words(s)][: self.max_words] or [0] for s in sentences]
        x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for j, t in enumerate(ids):
            x[j, : len(t)] = torch.tensor(t)
        keep = (x != 0).float()[..., None]
        h = self.enc(self.emb(x) + self.pos(torch.arange(x.shape[1])), src_key_padding_mask=x == 0)
        return self.out((h * keep).sum(1) / keep.sum(1).clamp(min=1))[:, None, :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--world", type=Path)
    ap.add_argument("--sam2", type=Path)
    ap.add_argument("--variant", default="tiny-128")
    ap.add_argument("--dataset", default="refcoco")
    ap.add_argument("--split", default="val")
    ap.add_argument("--steps", type=int, default=1500, help="training steps of the text ceiling")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "seg_ceiling.json")
    args = ap.parse_args()
    if args.workdir is not None:
        world, ckpt, variant = locate(args.workdir)
    elif args.world is not None and args.sam2 is not None:
        world, ckpt, variant = args.world, args.sam2, args.variant
    else:
        ap.error("give --workdir, or --world and --sam2")
    torch.manual_seed(0)
    t_start = time.perf_counter()
    sources = read_sources(world, DataConfig(root=str(world)))
    eval_images = sources.eval_image_ids()
    train = [r for r in sources.refs if normalise_split(r.split) == "train" and r.image_id not in eval_images
             and not r.iscrowd]  # fmt: skip
    test = [r for r in sources.refs if r.dataset == args.dataset and r.split == args.split]
    if not train or not test:
        raise SystemExit(f"{world}: no training expressions or no {args.dataset} {args.split} expressions")
    sam2 = build_sam2(variant, checkpoint=ckpt).eval()
    size = sam2.image_size

    # every image encoded once (the encoder is frozen); a batch selects its rows
    image_ids = sorted({r.image_id for r in train + test})
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    pixels = torch.stack([sam2_pixel_values(Image.open(sources.coco_images[i].path), size) for i in image_ids])
    with torch.no_grad():
        encoded = [sam2.encode_image(pixels[i : i + 1]) for i in range(len(image_ids))]
    features = SAM2Features(torch.cat([f.image_embed for f in encoded]),
                            tuple(torch.cat(levels) for levels in zip(*(f.high_res for f in encoded))))  # fmt: skip
    masks: dict[int, np.ndarray] = {}

    def mask_of(r) -> np.ndarray:
        if r.ann_id not in masks:
            img = sources.coco_images[r.image_id]
            masks[r.ann_id] = ann_to_mask(r.segmentation, img.height, img.width).astype(bool)
        return masks[r.ann_id]

    def rows(batch) -> torch.Tensor:
        return torch.tensor([row[r.image_id] for r in batch])

    def score(logits_of) -> dict[str, float]:
        acc = IoUAccumulator()
        with torch.no_grad():
            for k in range(0, len(test), 32):
                batch = test[k : k + 32]
                for r, lg in zip(batch, logits_of(batch)):
                    img = sources.coco_images[r.image_id]
                    acc.add(upsample_logits(lg[None], (img.height, img.width))[0, 0].numpy() > 0, mask_of(r))
        return acc.result()

    def scaled(r, xy: np.ndarray) -> np.ndarray:
        img = sources.coco_images[r.image_id]
        return xy * np.array([size / img.width, size / img.height])

    def point_logits(batch) -> torch.Tensor:
        pts = torch.tensor(np.stack([scaled(r, np.array(centre_point(mask_of(r)))) for r in batch]),
                           dtype=torch.float32)[:, None]  # fmt: skip
        return prompt_masks(sam2, pixels[rows(batch)], pts, torch.ones(len(batch), 1, dtype=torch.long))[0]

    def box_logits(batch) -> torch.Tensor:
        boxes = torch.tensor(np.stack([np.concatenate([scaled(r, np.array(r.bbox[:2])),
                                                       scaled(r, np.array(r.bbox[:2]) + np.array(r.bbox[2:]))])
                                       for r in batch]), dtype=torch.float32)  # fmt: skip
        none = torch.zeros(len(batch), 1, 2)
        return prompt_masks(sam2, pixels[rows(batch)], none, -torch.ones(len(batch), 1, dtype=torch.long), boxes,
                            torch.ones(len(batch), dtype=torch.bool))[0]  # fmt: skip

    results: dict[str, dict[str, float]] = {}
    results["point"] = score(point_logits)
    results["box"] = score(box_logits)
    print(f"{args.dataset} {args.split} (n={len(test)}): centre-point prompt cIoU {results['point']['ciou']:.3f}, "
          f"box prompt {results['box']['ciou']:.3f}", flush=True)  # fmt: skip

    vocab = {w: i + 1 for i, w in enumerate(sorted({w for r in train for w in words(r.sentence)}))}
    text = WordPrompt(vocab, int(sam2.sam_prompt_encoder.embed_dim))
    decoder = sam2.sam_mask_decoder
    for p in sam2.parameters():
        p.requires_grad_(False)
    for p in decoder.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(text.parameters()) + list(decoder.parameters()), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(0)
    sam2.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = [train[k] for k in rng.integers(len(train), size=args.batch_size)]
        logits = sam2.decode_masks(features.select(rows(batch)), text([r.sentence for r in batch]))[:, 0]
        side = logits.shape[-1]
        gt = torch.from_numpy(np.stack([resize_mask(mask_of(r), (side, side)) for r in batch]))
        loss = mask_bce_loss(logits, gt) + mask_dice_loss(logits, gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 250 == 0:
            print(f"  text ceiling: step {step + 1}/{args.steps} loss {np.mean(losses[-250:]):.3f}", flush=True)
    sam2.eval()
    text.eval()
    results["text"] = {**score(lambda b: sam2.decode_masks(features.select(rows(b)), text([r.sentence for r in b]))),
                       "train_expressions": len(train), "steps": args.steps,
                       "loss_first": float(np.mean(losses[:100])), "loss_last": float(np.mean(losses[-100:])),
                       "train_seconds": time.perf_counter() - t0}  # fmt: skip
    print(f"{args.dataset} {args.split}: text-only prompt (decoder trained {args.steps} steps on {len(train)} "
          f"expressions) cIoU {results['text']['ciou']:.3f}, gIoU {results['text']['giou']:.3f}")  # fmt: skip
    out = {"world": str(world), "sam2": str(ckpt), "variant": variant, "dataset": args.dataset, "split": args.split,
           **results, "seconds": time.perf_counter() - t_start, "torch": torch.__version__,
           "machine": platform.machine(), "threads": torch.get_num_threads()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
