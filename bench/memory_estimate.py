"""Memory per GPU of the Perceptio fine-tune of InternVL2.5-8B and -4B under DDP, FSDP2, ZeRO-2 and
ZeRO-3 (``configs/accelerate/*.yaml``): COMPUTED, NOT MEASURED (no GPU where this was written).

Prints a markdown table and writes ``bench/results/memory_estimate.json`` (``--out`` to change).

Parameters are counted exactly: the base InternVL is built on the meta device with transformers'
classes from the released architectures (InternVL2.5-8B: InternViT-300M-448px (24 layers, 1024,
16 heads, MLP 4096, 448 px, patch 14) + InternLM2.5-7B, in the "-hf" layout a Llama (32 layers,
4096, 32 heads / 8 KV heads, MLP 14336, vocabulary 92553, untied head); InternVL2.5-4B: the same
InternViT + Qwen2.5-3B (36 layers, 2048, 16 heads / 2 KV heads, MLP 11008, vocabulary 151674,
untied head as in the released InternVL2.5-4B); the pixel-shuffle MLP projector). LoRA adds
r (in + out) per targeted Linear of the language model (q, k, v, o, gate, up, down; r = 256), the
new-token rows (K + 3 = 131 rows of the embeddings and of the LM head, trainable deltas), the [SEG]
projection (d -> d -> 256) and SAM2.1 Hiera-L (built here on the CPU when sam2 is installed, else
its counted sizes: 216.9M parameters, 3.95M of them trained in the mask decoder).

Bytes (what the trainer does): frozen weights bf16 (2); trainable tensors fp32 master weights (4,
the trainer upcasts them), fp32 gradients (4), AdamW exp_avg + exp_avg_sq fp32 (8).

* DDP: everything on every GPU, plus DDP's gradient buckets (another 4 bytes per trainable
  parameter; ``gradient_as_bucket_view`` is off).
* FSDP2 (fsdp.yaml: full shard, bf16 MixedPrecisionPolicy, reshard after forward, one unit per
  decoder / vision layer): all of the above / N, plus what is gathered: the root unit (everything
  outside the wrapped layers: embeddings, LM head, vision embeddings and projector, SAM2, [SEG]
  projection) stays unsharded in bf16 for the whole step (FSDP2 does not reshard the root after
  forward; PerceptioModel has no ``get_input_embeddings`` for accelerate to carve the embeddings
  out), two decoder units in bf16 (the one computing and the one prefetched), and one unit's
  fp32 gradients before the reduce-scatter.
* ZeRO-2 (deepspeed_zero2.yaml): the module in bf16 on every GPU (DeepSpeed casts the trainable
  tensors too), fp32 master weights, AdamW states and gradients / N, plus the reduce and
  all-gather buckets (16.8M elements each, bf16).
* ZeRO-3 (deepspeed_zero3.yaml): bf16 weights / N, master + AdamW + gradients / N, plus the live
  gathered parameters: two decoder layers and one vocabulary matrix (the LM head) in bf16, the
  prefetch bucket (15.1M elements) and the parameters under the persistence threshold (40960
  elements, kept whole: norms, biases).

Activations, batch 1, T = 8192 tokens (image tokens included: 6 tiles + a thumbnail x 256),
gradient checkpointing on every decoder layer (non-reentrant), bf16, SDPA attention (no T x T
matrix), per GPU and the same for every scheme (h: hidden, f: MLP width, r: LoRA rank, V:
vocabulary, L: layers, T_tgt: positions the LM head runs on):

    checkpointed layer inputs   L * 2 T h
    one layer recomputed        T (20 h + 8 f)          RMSNorm fp32 inputs 2 x 4Th, q/k/v/out
                                                        (k, v repeated to all heads) 10Th, MLP
                                                        input 2Th, gate, silu, up, product 8Tf
                                + 3 T (6 h + f)         LoRA dropout (p = 0.05): a bf16 copy and
                                                        a bool mask of each adapter's input
                                + 14 T r                the seven LoRA A outputs
    its backward working set    4 T f                   two [T, f] bf16 gradient buffers
    LM head on the targets      16 T_tgt V              bf16 logits, the gathered valid rows,
                                                        their fp32 copy, fp32 log-softmax, fp32 grad
                                + 2 V h                 the merged LM-head weight of the trainable
                                                        token rows (PEFT), kept for backward
    vision tower (frozen)       tiles (P + 1) (4 d_v + f_v) 4    one layer's transient forward
    SAM2 Hiera-L forward        0.5 GiB                 an allowance, not derived (frozen, 1024 px)

T_tgt (``--target-tokens``, default 1024): the model applies the LM head from the first target
token on (answers, the 100 depth codes, reasoning). CUDA context, NCCL buffers and allocator
fragmentation are not included: add 2-4 GiB per GPU.

Usage: ``python bench/memory_estimate.py [--tokens 8192] [--target-tokens 1024] [--world 8 64]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from perceptio_core.model.presets import INTERNVIT_300M, PRESETS, preset_config

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30

VISION = INTERNVIT_300M
MODELS = {"InternVL2.5-8B": "internvl2.5-8b", "InternVL2.5-4B": "internvl2.5-4b"}  # name -> preset
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEW_TOKENS = 128 + 3  # K = 128 depth codes + <d_start>, <d_end>, [SEG]
SAM2_FALLBACK = {"total": 216_924_865, "trained": 3_950_656}  # SAM2.1 Hiera-L as build_sam2 makes it
DS_BUCKET = 16_777_216  # ds_zero*.json reduce / all-gather bucket (elements)
DS_PREFETCH = 15_099_494
DS_PERSIST = 40_960


def build_base(name: str):
    """The base InternVL of ``name`` on the meta device (no memory, exact shapes), from its preset
    (:mod:`perceptio_core.model.presets`)."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        return InternVLForConditionalGeneration(preset_config(MODELS[name]))


def sam2_counts() -> dict[str, int]:
    try:
        from perceptio_core.model.sam2_decoder import build_sam2

        s = build_sam2("sam2.1_hiera_large", None, True, seed=None)
        return {"total": sum(p.numel() for p in s.parameters()),
                "trained": sum(p.numel() for p in s.parameters() if p.requires_grad)}  # fmt: skip
    except Exception:  # sam2 not installed: its counted sizes
        return dict(SAM2_FALLBACK)


def count(name: str, rank: int, sam2: dict[str, int]) -> dict[str, float]:
    """Parameter counts of the Perceptio model on ``name``."""
    from torch import nn

    base = build_base(name)
    t = PRESETS[MODELS[name]]["text"]
    h, f, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    p_base = sum(p.numel() for p in base.parameters())
    lm = base.model.language_model
    lora_layer = 0
    for n, m in lm.layers[0].named_modules():
        if isinstance(m, nn.Linear) and n.split(".")[-1] in LORA_TARGETS:
            lora_layer += rank * (m.in_features + m.out_features)
    p_layer_base = sum(p.numel() for p in lm.layers[0].parameters())
    p_vlayer = sum(p.numel() for p in base.model.vision_tower.encoder.layer[0].parameters())
    lora = L * lora_layer
    rows = 2 * NEW_TOKENS * h  # trainable deltas of the embedding and LM-head rows
    seg = h * h + h + h * 256 + 256
    trained = lora + rows + seg + sam2["trained"]
    frozen = p_base + NEW_TOKENS * h * 2 + sam2["total"] - sam2["trained"]  # resized rows are base rows
    wrapped = L * p_layer_base + len(base.model.vision_tower.encoder.layer) * p_vlayer
    root = p_base + 2 * NEW_TOKENS * h - wrapped + sam2["total"] + seg  # unsharded for the whole FSDP step
    small = sum(p.numel() for p in base.parameters() if p.numel() < DS_PERSIST)
    return {
        "base_parameters": p_base,
        "vision_parameters": sum(p.numel() for p in base.model.vision_tower.parameters()),
        "projector_parameters": sum(p.numel() for p in base.model.multi_modal_projector.parameters()),
        "lm_parameters": sum(p.numel() for p in lm.parameters()) + sum(p.numel() for p in base.lm_head.parameters()),
        "sam2_parameters": sam2["total"],
        "lora_parameters": lora,
        "token_row_parameters": rows,
        "seg_projection_parameters": seg,
        "sam2_trained_parameters": sam2["trained"],
        "trainable_parameters": trained,
        "frozen_parameters": frozen,
        "total_parameters": trained + frozen,
        "decoder_layer_parameters": p_layer_base + lora_layer,
        "decoder_layer_lora_parameters": lora_layer,
        "vision_layer_parameters": p_vlayer,
        "fsdp_root_unit_parameters": root,
        "persistent_small_parameters": small,
        "hidden": h, "mlp": f, "layers": L, "vocab": V, "kv_heads": t["num_key_value_heads"],
    }  # fmt: skip


def activations(c: dict[str, float], tokens: int, target_tokens: int, rank: int, tiles: int) -> dict[str, float]:
    """Activation bytes per GPU (batch 1, gradient checkpointing; formula in the module docstring)."""
    T, h, f, L, V, r = tokens, c["hidden"], c["mlp"], c["layers"], c["vocab"], rank
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1
    return {
        "checkpointed_inputs": L * 2 * T * h,
        "layer_recompute": T * (20 * h + 8 * f) + 3 * T * (6 * h + f) + 14 * T * r,
        "layer_backward": 4 * T * f,
        "lm_head": 16 * target_tokens * V + 2 * V * h,
        "vision_transient": tiles * patches * (4 * VISION["hidden_size"] + VISION["intermediate_size"]) * 4,
        "sam2_allowance": 0.5 * GIB,
    }


def per_gpu(c: dict[str, float], act: float, scheme: str, n: int) -> dict[str, float]:
    """Bytes per GPU of ``scheme`` at world size ``n``: weights, gradients + optimizer, gathered
    (transient) parameters, activations."""
    P_t, P_f = c["trainable_parameters"], c["frozen_parameters"]
    if scheme == "DDP":
        weights, grad_opt, gathered = 2 * P_f + 4 * P_t, (4 + 4 + 8) * P_t, 0.0
    elif scheme == "FSDP2":
        weights, grad_opt = (2 * P_f + 4 * P_t) / n, (4 + 8) * P_t / n
        gathered = 2 * c["fsdp_root_unit_parameters"] + 2 * 2 * c["decoder_layer_parameters"] \
            + 4 * c["decoder_layer_lora_parameters"]  # fmt: skip
    elif scheme == "ZeRO-2":
        weights, grad_opt = 2 * (P_f + P_t) + 4 * P_t / n, (4 + 8) * P_t / n
        gathered = 2 * 2 * DS_BUCKET
    elif scheme == "ZeRO-3":
        weights, grad_opt = 2 * (P_f + P_t) / n + 4 * P_t / n, (4 + 8) * P_t / n
        gathered = 2 * (2 * c["decoder_layer_parameters"] + c["vocab"] * c["hidden"] + DS_PREFETCH) \
            + 2 * c["persistent_small_parameters"]  # fmt: skip
    else:
        raise ValueError(scheme)
    total = weights + grad_opt + gathered + act
    return {"weights_gib": weights / GIB, "grads_optimizer_gib": grad_opt / GIB, "gathered_gib": gathered / GIB,
            "activations_gib": act / GIB, "total_gib": total / GIB}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--target-tokens", type=int, default=1024, help="positions the LM head runs on")
    p.add_argument("--lora-rank", type=int, default=256)
    p.add_argument("--tiles", type=int, default=7, help="6 tiles + a thumbnail (model.max_tiles = 6)")
    p.add_argument("--world", type=int, nargs="+", default=[8, 64])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_estimate.json"))
    args = p.parse_args(argv)

    sam2 = sam2_counts()
    result = {"note": "computed, not measured", "tokens": args.tokens, "target_tokens": args.target_tokens,
              "lora_rank": args.lora_rank, "tiles": args.tiles, "models": {}}  # fmt: skip
    lines = ["| model | scheme | GPUs | weights | grads + AdamW | gathered | activations | **total / GPU** |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in MODELS:
        c = count(name, args.lora_rank, sam2)
        act = activations(c, args.tokens, args.target_tokens, args.lora_rank, args.tiles)
        a = sum(act.values())
        rows = {}
        for scheme in ("DDP", "FSDP2", "ZeRO-2", "ZeRO-3"):
            for n in args.world:
                r = per_gpu(c, a, scheme, n)
                rows[f"{scheme}@{n}"] = r
                lines.append(f"| {name} | {scheme} | {n} | {r['weights_gib']:.1f} | {r['grads_optimizer_gib']:.1f} | "
                             f"{r['gathered_gib']:.1f} | {r['activations_gib']:.1f} | **{r['total_gib']:.1f} GiB** |")
        result["models"][name] = {"counts": c, "activations_gib": {k: v / GIB for k, v in act.items()}, "per_gpu": rows}
        print(f"{name}: {c['total_parameters'] / 1e9:.2f}B parameters ({c['base_parameters'] / 1e9:.2f}B base, "
              f"SAM2 {c['sam2_parameters'] / 1e6:.0f}M), {c['trainable_parameters'] / 1e6:.0f}M trainable "
              f"(LoRA {c['lora_parameters'] / 1e6:.0f}M); activations {a / GIB:.1f} GiB "
              + ", ".join(f"{k} {v / GIB:.2f}" for k, v in act.items()))  # fmt: skip
    table = "\n".join(lines)
    result["table_markdown"] = table
    print(f"\nMemory per GPU, batch 1 x {args.tokens} tokens, LoRA r{args.lora_rank}, gradient checkpointing "
          f"(computed, not measured; CUDA context / NCCL / fragmentation not included):\n")  # fmt: skip
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
