"""Tiny InternVL checkpoints in OpenGVLab's own layout (``InternVLChatModel``), with the real key
names and config fields of the releases: (a) InternVL2.5-8B in miniature (InternLM2 text model,
packed GQA ``wqkv``, untied ``output``, sentencepiece ``tokenizer.model`` written as protobuf bytes,
LayerNorm InternViT with qkv bias); (b) InternVL2.5-1B in miniature (Qwen2 text model, tied
embeddings, padded rows, byte-level ``tokenizer.json``, RMSNorm InternViT with q/k norm, sharded
weights). Used by tests/core/model/test_convert.py and the end-to-end test of the released-checkpoint
path (tests/flows/test_released_checkpoints.py)."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM

INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
IMAGE, PATCH = 56, 14  # a 4 x 4 patch grid: pixel shuffle 0.5 -> 4 image tokens


# --------------------------------------------------------------------------------------------
# A sentencepiece BPE model, written as protobuf bytes
# --------------------------------------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER, BYTE = 1, 2, 3, 4, 6
MERGES = ["▁t", "he", "▁the", "in", "ing", "▁a", "an", "er", "or", "ld", "▁w", "▁wor", "▁world",
          "ll", "el", "hel", "hell", "hello", "▁c", "ub", "▁cub", "▁cube", "re", "▁re", "▁red"]  # fmt: skip
CHARS = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:'")


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([b])
        out += bytes([b | 0x80])


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def sp_pieces() -> list[tuple[str, float, int]]:
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    pieces += [(m, -float(i), NORMAL) for i, m in enumerate(MERGES)]
    pieces += [(c, -100.0 - i, NORMAL) for i, c in enumerate(CHARS)]
    # InternLM2's tail (92540 ... 92543); one of them a normal piece, which only the declaration
    # in tokenizer_config.json keeps whole
    pieces += [("<|action_start|>", 0.0, NORMAL), ("<|im_end|>", 0.0, USER), ("<|im_start|>", 0.0, USER)]
    return pieces


def write_sp_model(path, pieces, dummy_prefix: bool = False, collapse_spaces: bool = False) -> None:
    """A sentencepiece ModelProto: BPE; by default no dummy prefix and whitespace kept (InternLM2's
    settings)."""
    body = b"".join(
        _field(1, 2, _field(1, 2, t.encode()) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, _varint(k)))
        for t, s, k in pieces
    )
    body += _field(2, 2, _field(3, 0, _varint(2)) + _field(35, 0, _varint(1)))
    norm = _field(3, 0, _varint(int(dummy_prefix))) + _field(4, 0, _varint(int(collapse_spaces)))
    body += _field(3, 2, _field(1, 2, b"identity") + norm)
    path.write_bytes(body)


def sp_bpe_reference(text: str, pieces) -> list[int]:
    """Sentencepiece BPE by its definition: start from characters, repeatedly merge the adjacent
    pair whose union is the highest-scoring piece (leftmost on ties), then bytes for what is not a
    piece (byte fallback)."""
    vocab = {t: i for i, (t, _, _) in enumerate(pieces)}
    score = {t: s for t, s, k in pieces if k == NORMAL}
    syms = list(text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            m = syms[i] + syms[i + 1]
            if m in score and (best is None or score[m] > best[0]):
                best = (score[m], i)
        if best is None:
            break
        i = best[1]
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
    ids = []
    for s in syms:
        ids += [vocab[s]] if s in score else [vocab[f"<0x{b:02X}>"] for b in s.encode()]
    return ids


# --------------------------------------------------------------------------------------------
# Tiny OpenGVLab checkpoints
# --------------------------------------------------------------------------------------------


def vision_cfg(norm_type: str, qk_norm: bool, qkv_bias: bool) -> dict:
    return {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "image_size": IMAGE,
        "patch_size": PATCH, "num_channels": 3, "qkv_bias": qkv_bias, "qk_normalization": qk_norm,
        "norm_type": norm_type, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "drop_path_rate": 0.0,
        "dropout": 0.0, "attention_dropout": 0.0, "initializer_factor": 0.1, "initializer_range": 0.02,
        "use_flash_attn": False,
    }  # fmt: skip


def vision_weights(vc: dict, llm_hidden: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    C, L, F_ = vc["hidden_size"], vc["num_hidden_layers"], vc["intermediate_size"]
    n = (IMAGE // PATCH) ** 2 + 1

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    w = {
        "vision_model.embeddings.class_embedding": r(1, 1, C),
        "vision_model.embeddings.patch_embedding.weight": r(C, 3, PATCH, PATCH, s=0.05),
        "vision_model.embeddings.patch_embedding.bias": r(C),
        "vision_model.embeddings.position_embedding": r(1, n, C),
    }
    for i in range(L):
        p = f"vision_model.encoder.layers.{i}."
        w[p + "attn.qkv.weight"] = r(3 * C, C)
        if vc["qkv_bias"]:
            w[p + "attn.qkv.bias"] = r(3 * C)
        if vc["qk_normalization"]:
            w[p + "attn.q_norm.weight"] = 1 + r(C)
            w[p + "attn.k_norm.weight"] = 1 + r(C)
        w[p + "attn.proj.weight"], w[p + "attn.proj.bias"] = r(C, C), r(C)
        w[p + "ls1"], w[p + "ls2"] = 0.5 + r(C), 0.5 + r(C)
        for norm in ("norm1", "norm2"):
            w[p + norm + ".weight"] = 1 + r(C)
            if vc["norm_type"] == "layer_norm":
                w[p + norm + ".bias"] = r(C)
        w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = r(F_, C), r(F_)
        w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = r(C, F_), r(C)
    w["mlp1.0.weight"], w["mlp1.0.bias"] = 1 + r(4 * C), r(4 * C)
    w["mlp1.1.weight"], w["mlp1.1.bias"] = r(llm_hidden, 4 * C), r(llm_hidden)
    w["mlp1.3.weight"], w["mlp1.3.bias"] = r(llm_hidden, llm_hidden), r(llm_hidden)
    return w


def chat_config(llm_config: dict, vc: dict) -> dict:
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "llm_config": llm_config, "vision_config": vc, "downsample_ratio": 0.5, "select_layer": -1,
        "template": "internvl2_5", "ps_version": "v2", "force_image_size": IMAGE,
        "dynamic_image_size": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "use_thumbnail": True, "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "float32",
        "tie_word_embeddings": False,
    }  # fmt: skip


def added_tokens_decoder(start: int, tokens: list[str]) -> dict:
    return {str(start + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, t in enumerate(tokens)}  # fmt: skip


def write_internlm2_checkpoint(path) -> dict:
    """InternVL2.5-8B's layout in miniature. Returns {"weights", "llm", "vision", "pieces"}."""
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    pieces = sp_pieces()
    write_sp_model(path / "tokenizer.model", pieces)
    n_sp = len(pieces)
    vocab = n_sp + len(INTERNVL_TOKENS)  # the LLM's vocabulary is exactly the tokenizer's (as in 8B)
    decoder = {**added_tokens_decoder(0, ["<unk>", "<s>", "</s>"]),
               **added_tokens_decoder(n_sp - 3, ["<|action_start|>", "<|im_end|>", "<|im_start|>"]),
               **added_tokens_decoder(n_sp, INTERNVL_TOKENS)}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "</s>", "model_max_length": 8192,
        "added_tokens_decoder": decoder,
    }))  # fmt: skip
    D, L, H, KV, F_ = 32, 2, 4, 2, 64
    d, grp = D // H, H // KV
    llm = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoModel": "modeling_internlm2.InternLM2ForCausalLM"},
        "vocab_size": vocab, "hidden_size": D, "intermediate_size": F_, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": KV, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False, "attn_implementation": "eager",
        "use_cache": True, "temperature": 1.0, "top_p": 1.0, "torch_dtype": "bfloat16",
    }  # fmt: skip
    vc = vision_cfg("layer_norm", qk_norm=False, qkv_bias=True)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    w = {"language_model.model.tok_embeddings.weight": r(vocab, D, s=1.0),
         "language_model.model.norm.weight": 1 + r(D), "language_model.output.weight": r(vocab, D)}  # fmt: skip
    for i in range(L):
        p = f"language_model.model.layers.{i}."
        w[p + "attention.wqkv.weight"] = r(KV * (grp + 2) * d, D)
        w[p + "attention.wo.weight"] = r(D, D)
        w[p + "feed_forward.w1.weight"], w[p + "feed_forward.w3.weight"] = r(F_, D), r(F_, D)
        w[p + "feed_forward.w2.weight"] = r(D, F_)
        w[p + "attention_norm.weight"], w[p + "ffn_norm.weight"] = 1 + r(D), 1 + r(D)
    w.update(vision_weights(vc, D, g))
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(chat_config(llm, vc)))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [92542, 2]}))
    (path / "modeling_internvl_chat.py").write_text("raise RuntimeError('remote code must never run')\n")
    return {"weights": w, "llm": llm, "vision": vc, "pieces": pieces}


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["a red cube on the left of the blue sphere", "the green cylinder is near the camera",
          "hello world, what colour is the box?", "Please segment the small yellow ball."] * 10  # fmt: skip


def write_qwen2_checkpoint(path) -> dict:
    """InternVL2.5-1B's layout in miniature: tied embeddings, padded embedding rows, two shards."""
    path.mkdir()
    g = torch.Generator().manual_seed(1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN_SPECIALS,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    n = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in INTERNVL_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 8192,
        "added_tokens_decoder": {**added_tokens_decoder(0, QWEN_SPECIALS), **added_tokens_decoder(n, INTERNVL_TOKENS)},
    }))  # fmt: skip
    vocab = n + len(INTERNVL_TOKENS) + 6  # padded rows, as the Qwen2 releases have
    D, L, H, KV, F_ = 32, 2, 4, 2, 64
    llm = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
        "hidden_size": D, "intermediate_size": F_, "num_hidden_layers": L, "num_attention_heads": H,
        "num_key_value_heads": KV, "hidden_act": "silu", "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "use_sliding_window": False,
        "sliding_window": 256, "max_window_layers": 2, "tie_word_embeddings": True, "bos_token_id": 0,
        "eos_token_id": 2, "attn_implementation": "eager", "torch_dtype": "bfloat16", "do_sample": False,
        "num_beams": 1, "output_attentions": False, "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
    }  # fmt: skip
    vc = vision_cfg("rms_norm", qk_norm=True, qkv_bias=False)
    ref = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in llm.items() if k not in ("architectures", "model_type")}))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
    w = {"language_model." + k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    w.update(vision_weights(vc, D, g))
    keys = sorted(w)
    half = {k: w[k] for k in keys[: len(keys) // 2]}, {k: w[k] for k in keys[len(keys) // 2 :]}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, part in zip(names, half):
        save_file(part, str(path / name), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: names[0] if k in half[0] else names[1] for k in keys}}))  # fmt: skip
    (path / "config.json").write_text(json.dumps(chat_config(llm, vc)))
    return {"weights": w, "llm": llm, "vision": vc, "reference": ref.eval()}
