"""Convert an InternVL checkpoint from OpenGVLab's remote-code layout to the transformers-native one.

OpenGVLab releases InternVL2 / InternVL2.5 / InternVL3 as ``InternVLChatModel`` (``config.json``
with ``architectures: ["InternVLChatModel"]``, ``llm_config``, ``vision_config``, run by remote
code). Perceptio loads ``InternVLForConditionalGeneration`` (transformers' own InternVL), so
:func:`convert_internvl` rewrites such a folder into one that ``from_pretrained`` loads with no
missing or unexpected key, and no remote code is ever executed (nothing here imports or runs the
checkpoint's ``*.py``; ``trust_remote_code`` is never set).

What maps to what (original key -> native key; the file stores the native keys in the layout
``save_pretrained`` writes and the released "-hf" checkpoints ship: ``vision_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``)

* Vision tower (InternViT -> ``InternVLVisionModel``), ``vision_model.`` -> ``vision_tower.``:
  ``embeddings.class_embedding`` -> ``embeddings.cls_token``; ``embeddings.position_embedding`` ->
  ``embeddings.position_embeddings``; ``embeddings.patch_embedding`` ->
  ``embeddings.patch_embeddings.projection``; ``encoder.layers.N.`` -> ``encoder.layer.N.`` with
  ``attn.qkv`` [3C, C] split in thirds (rows 0:C, C:2C, 2C:3C) into ``attention.{q,k,v}_proj``,
  ``attn.proj`` -> ``attention.projection_layer``, ``attn.{q,k}_norm`` -> ``attention.{q,k}_norm``,
  ``ls1``/``ls2`` -> ``lambda_1``/``lambda_2``, ``norm1``/``norm2`` ->
  ``layernorm_before``/``layernorm_after``, ``mlp.fc1``/``mlp.fc2`` unchanged.
* Projector: ``mlp1.0`` (LayerNorm) -> ``multi_modal_projector.layer_norm``, ``mlp1.1`` ->
  ``linear_1``, ``mlp1.3`` -> ``linear_2`` (``mlp1.2`` is the parameter-free GELU).
* InternLM2 text model (``InternLM2ForCausalLM``, InternVL2.5-2B/8B, InternVL2-2B/8B) -> Llama:
  ``tok_embeddings`` -> ``embed_tokens``; ``attention.wqkv`` [(n_kv * (g + 2)) * d, D] is packed per
  key/value head: rows reshape to [n_kv, g + 2, d] with the g query heads of that group first, then
  its key head, then its value head (OpenGVLab's ``rearrange(qkv, 'b q (h gs d) -> b q h gs d',
  gs=2 + g)``; q = ``[:, :g]``, k = ``[:, -2]``, v = ``[:, -1]``), so q_proj is the
  [n_kv, g, d] block flattened (head order h = kv * g + j, which is the order GQA's
  ``repeat_kv`` pairs them in), k_proj and v_proj the [n_kv, d] ones; ``attention.wo`` ->
  ``self_attn.o_proj``; ``feed_forward.w1/w3/w2`` -> ``mlp.gate_proj/up_proj/down_proj``
  (SwiGLU ``w2(silu(w1 x) * w3 x)``); ``attention_norm``/``ffn_norm`` ->
  ``input_layernorm``/``post_attention_layernorm``; ``output`` -> ``lm_head``. The text config
  becomes a ``LlamaConfig`` (hidden size, layers, heads, kv heads, intermediate size, rms eps,
  rope theta and scaling, vocabulary, max positions, ``attention_bias`` = InternLM2's ``bias``).
* Qwen2 / Qwen3 / Llama text models (InternVL2.5-1B/4B, InternVL3): already transformers'
  own classes, so ``language_model.model.*`` and ``language_model.lm_head.weight`` keep their
  names and the text config keeps its class (fields the class does not take are dropped).
* Saved ``rotary_emb.inv_freq`` buffers are dropped (recomputed from the config). Any other key
  without a rule is an error naming it; so is a missing, unexpected or mis-shaped target key
  (checked against a meta-device ``InternVLForConditionalGeneration`` of the converted config
  before anything is written).

Config: ``vision_config`` -> ``InternVLVisionConfig`` (``qkv_bias`` -> ``attention_bias``,
``qk_normalization`` -> ``use_qk_norm``, ``norm_type``, ``layer_norm_eps``, ``initializer_factor``
-> ``layer_scale_init_value``, absolute position embeddings, no final norm); ``InternVLConfig``
with ``image_token_id`` = the tokenizer's ``<IMG_CONTEXT>``, ``image_seq_length`` =
``(image_size / patch_size)^2 * downsample_ratio^2`` (256 at 448 px), ``downsample_ratio``,
``vision_feature_layer`` = ``select_layer``, ``projector_hidden_act`` "gelu" and
``tie_word_embeddings`` written explicitly: tied exactly when the checkpoint has no LM head or its
head equals its input embedding. Only ``ps_version`` "v2" pixel shuffle is converted
(transformers implements that one).

Tokenizer (no remote code): a ``tokenizer.json`` (Qwen2-based releases) is taken as it is; an
InternLM2 sentencepiece ``tokenizer.model`` is read by a small protobuf reader in this file (no
``sentencepiece``/``protobuf`` package needed) and rebuilt as a ``tokenizers`` BPE with byte
fallback, the merges ranked by the merged piece's score as transformers' own sentencepiece
converter ranks them, and the normalizer/decoder its ``normalizer_spec`` asks for. The added
tokens of ``tokenizer_config.json`` keep their ids; InternVL's image tokens are declared as
``extra_special_tokens`` (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``); a token the
vocabulary lacks (``<video>`` in the releases) is appended, and the embedding and LM head grow to
cover it, the new rows set to the mean of the existing ones. ``chat_template.jinja`` renders the
checkpoint's conversation template (``internvl2_5`` for InternVL2.5 and InternVL3: the system
prompt 你是书生·万象... unless the messages bring one, ``<|im_start|>role\\n...<|im_end|>\\n``
turns; an image content item becomes ``<IMG_CONTEXT>\\n``, which ``InternVLProcessor`` expands);
for InternLM2 the template starts with ``{{ bos_token }}`` since its tokenizer adds ``<s>``.
``generation_config.json`` stops on the tokenizer's eos and the turn end ``<|im_end|>`` (plus the
source generation config's own eos ids). ``preprocessor_config.json`` (``GotOcr2ImageProcessor``:
448 px tiles, ``crop_to_patches`` with ``max_patches`` = ``max_dynamic_patch``, ImageNet mean and
std, bicubic) and ``processor_config.json`` (``InternVLProcessor``, ``image_seq_length``) complete
the folder.

Memory: the weights stream tensor by tensor from the memory-mapped source shards into output
shards of at most ``max_shard_bytes`` (5 GiB by default), so the peak is about one output shard
plus the tensor being split, not the model (an 8B bf16 checkpoint is 16 GB; the tie check holds
the embedding and the head, 0.76 GB each for InternVL2.5-8B, for a moment). Only safetensors are read: a folder with just
``pytorch_model.bin`` is refused (unpickling is code execution; convert it to safetensors with
a tool you trust first). The output is built in a temporary sibling of ``dst`` and renamed into
place at the end; ``dst`` must not exist or be empty.

Measured (tests/core/model/test_convert.py, float32, tiny random checkpoints whose logits reach
about 5 in magnitude): max |logit difference| against an independent plain-torch InternLM2 forward
on the original weights 4.4e-6 text-only and 1.9e-6 with an image (its InternViT + pixel shuffle +
``mlp1`` features: 1.4e-6); Qwen2 against transformers' ``Qwen2ForCausalLM`` on the original
weights 3.6e-6, its image features 2.1e-6. The tests assert 1e-4; swapping the k and v parts of
the wqkv split moves the logits by about 6. ``AutoProcessor.from_pretrained`` of the output needs
``torchvision`` (for InternVLProcessor's video processor), which Perceptio never imports; the image
processor alone loads as ``GotOcr2ImageProcessorPil``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tqdm.auto import tqdm
from transformers import (
    CONFIG_MAPPING,
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from perceptio_core.atomic_io import fsync_dir, fsync_tree, temp_sibling
from perceptio_core.model.internvl import IMAGE_TOKENS
from perceptio_core.model.processor import TileProcessor

log = logging.getLogger(__name__)

OPENGVLAB_ARCH = "InternVLChatModel"
NATIVE_ARCH = "InternVLForConditionalGeneration"
CONVERT_COMMAND = "perceptio convert-internvl SRC DST"
MAX_SHARD_BYTES = 5 * 2**30

# OpenGVLab's conversation templates (their conversation.py, SeparatorStyle.MPT):
# (system prefix, default system message, user role, assistant role, separator).
_SYS_25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_SYS_2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_CHATML = ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n")
TEMPLATES: dict[str, tuple[str, str, str, str, str]] = {
    "internvl2_5": (_CHATML[0], _SYS_25, _CHATML[1], _CHATML[2], "<|im_end|>\n"),
    "Hermes-2": (_CHATML[0], _SYS_2, _CHATML[1], _CHATML[2], "<|im_end|>"),
    "internlm2-chat": (_CHATML[0], _SYS_2, _CHATML[1], _CHATML[2], "<|im_end|>"),
}

# Generic PretrainedConfig fields that a converted text config does not carry over.
_GENERIC_CONFIG_FIELDS = {
    "self", "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
}  # fmt: skip
_HF_TEXT_TYPES = {"qwen2", "qwen3", "llama"}  # llm_config model types kept as they are


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_layout(path: str | os.PathLike[str]) -> Literal["native", "opengvlab"]:
    """``"opengvlab"`` for a folder whose ``config.json`` declares ``InternVLChatModel`` (model
    type ``internvl_chat``), ``"native"`` for ``InternVLForConditionalGeneration`` (model type
    ``internvl``). Raises ``FileNotFoundError`` without a ``config.json`` and ``ValueError`` (naming
    the file and the architectures found) for anything else."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no config.json, not a checkpoint folder")
    cfg = _read_json(cfg_path)
    archs = list(cfg.get("architectures") or [])
    model_type = cfg.get("model_type")
    if OPENGVLAB_ARCH in archs or model_type == "internvl_chat":
        return "opengvlab"
    if NATIVE_ARCH in archs or model_type == "internvl":
        return "native"
    raise ValueError(
        f"{cfg_path}: not an InternVL checkpoint in either layout (architectures {archs}, "
        f"model_type {model_type!r}; expected {OPENGVLAB_ARCH} or {NATIVE_ARCH})"
    )


# --------------------------------------------------------------------------------------------
# Source weights
# --------------------------------------------------------------------------------------------


class _Weights:
    """The source's safetensors: key -> file, shapes without reading, tensors on demand
    (memory-mapped, one at a time)."""

    def __init__(self, src: Path):
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index)["weight_map"]
            self.files = {k: src / f for k, f in weight_map.items()}
        else:
            single = sorted(src.glob("*.safetensors"))
            if not single:
                bins = sorted(p.name for p in src.glob("*.bin"))
                if bins:
                    raise ValueError(
                        f"{src}: only pickled weights ({', '.join(bins)}); convert-internvl reads "
                        "safetensors only (unpickling runs code): convert them to safetensors first"
                    )
                raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json")
            if len(single) > 1:
                raise ValueError(f"{src}: several .safetensors files and no index: {[p.name for p in single]}")
            with safe_open(single[0], framework="pt") as f:
                self.files = {k: single[0] for k in f.keys()}
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard named by the index is missing")
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.files[key]).get_slice(key).get_shape())

    def itemsize(self, key: str) -> int:
        """Bytes per element of ``key`` as stored."""
        name = self._open(self.files[key]).get_slice(key).get_dtype()
        return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}.get(name, 4)

    def get(self, key: str) -> torch.Tensor:
        return self._open(self.files[key]).get_tensor(key)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


# --------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    targets: tuple[tuple[str, Transform | None], ...]  # (replacement, tensor transform)


def _identity_rules(pairs: list[tuple[str, str]]) -> list[_Rule]:
    return [_Rule(re.compile(p), ((r, None),)) for p, r in pairs]


def _thirds(i: int) -> Transform:
    """Part ``i`` of a tensor stacked [q; k; v] along dim 0 (InternViT's ``attn.qkv``)."""

    def f(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] // 3
        return t[i * n : (i + 1) * n].contiguous()

    return f


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's packed ``attention.wqkv`` weight [(n_kv * (g + 2)) * d, D] (or bias [...]) ->
    ``(q [n_heads * d, ...], k [n_kv * d, ...], v [n_kv * d, ...])`` with g = n_heads / n_kv: the
    rows are grouped per key/value head as g query heads, the key head, the value head."""
    g = num_heads // num_kv_heads
    rows = wqkv.shape[0]
    d = rows // (num_kv_heads * (g + 2))
    if num_heads % num_kv_heads or d * num_kv_heads * (g + 2) != rows:
        raise ValueError(f"wqkv with {rows} rows does not pack {num_heads} heads / {num_kv_heads} kv heads")
    grouped = wqkv.reshape(num_kv_heads, g + 2, d, *wqkv.shape[1:])  # [n_kv, g + 2, d, D]
    q = grouped[:, :g].reshape(num_heads * d, *wqkv.shape[1:])
    k = grouped[:, -2].reshape(num_kv_heads * d, *wqkv.shape[1:])
    v = grouped[:, -1].reshape(num_kv_heads * d, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def _wqkv_part(i: int, num_heads: int, num_kv_heads: int) -> Transform:
    return lambda t: split_wqkv(t, num_heads, num_kv_heads)[i]


_VT = "model.vision_tower."
_LM = "model.language_model."
_VISION_RULES = _identity_rules([
    (r"^vision_model\.embeddings\.class_embedding$", _VT + "embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", _VT + "embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$", _VT + r"embeddings.patch_embeddings.projection.\1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)$", _VT + r"encoder.layer.\1.attention.projection_layer.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.(weight|bias)$", _VT + r"encoder.layer.\1.attention.\2.\3"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls(1|2)$", _VT + r"encoder.layer.\1.lambda_\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)$", _VT + r"encoder.layer.\1.layernorm_before.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)$", _VT + r"encoder.layer.\1.layernorm_after.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", _VT + r"encoder.layer.\1.mlp.\2.\3"),
    (r"^mlp1\.0\.(weight|bias)$", r"model.multi_modal_projector.layer_norm.\1"),
    (r"^mlp1\.1\.(weight|bias)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^mlp1\.3\.(weight|bias)$", r"model.multi_modal_projector.linear_2.\1"),
]) + [
    _Rule(
        re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$"),
        tuple((_VT + rf"encoder.layer.\1.attention.{n}_proj.\2", _thirds(i)) for i, n in enumerate("qkv")),
    )
]  # fmt: skip


def _internlm2_rules(num_heads: int, num_kv_heads: int) -> list[_Rule]:
    p = r"^language_model\.model\.layers\.(\d+)\."
    out = _LM + r"layers.\1."
    return _identity_rules([
        (r"^language_model\.model\.tok_embeddings\.weight$", _LM + "embed_tokens.weight"),
        (r"^language_model\.model\.norm\.weight$", _LM + "norm.weight"),
        (r"^language_model\.output\.weight$", "lm_head.weight"),
        (p + r"attention\.wo\.(weight|bias)$", out + r"self_attn.o_proj.\2"),
        (p + r"feed_forward\.w1\.weight$", out + "mlp.gate_proj.weight"),
        (p + r"feed_forward\.w3\.weight$", out + "mlp.up_proj.weight"),
        (p + r"feed_forward\.w2\.weight$", out + "mlp.down_proj.weight"),
        (p + r"attention_norm\.weight$", out + "input_layernorm.weight"),
        (p + r"ffn_norm\.weight$", out + "post_attention_layernorm.weight"),
    ]) + [
        _Rule(
            re.compile(p + r"attention\.wqkv\.(weight|bias)$"),
            tuple((out + rf"self_attn.{n}_proj.\2", _wqkv_part(i, num_heads, num_kv_heads))
                  for i, n in enumerate("qkv")),
        )
    ]  # fmt: skip


_HF_TEXT_RULES = _identity_rules([
    (r"^language_model\.lm_head\.weight$", "lm_head.weight"),
    (r"^language_model\.model\.(.+)$", _LM + r"\1"),
])  # fmt: skip
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _map_keys(keys: list[str], rules: list[_Rule]) -> list[tuple[str, str, Transform | None]]:
    """``(source key, native key, transform)`` for every source key; raises naming the unmapped."""
    plan, unmapped = [], []
    for key in keys:
        if _DROPPED.search(key):
            continue
        for rule in rules:
            if rule.pattern.match(key):
                plan += [(key, rule.pattern.sub(rep, key), fn) for rep, fn in rule.targets]
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"{len(unmapped)} checkpoint keys have no conversion rule, e.g. {unmapped[:5]}")
    return plan


def hub_key(native_key: str) -> str:
    """The name a native state-dict key is stored under (what ``save_pretrained`` writes)."""
    if native_key == "lm_head.weight":
        return "language_model.lm_head.weight"
    for prefix, stored in ((_LM, "language_model.model."), (_VT, "vision_tower."),
                           ("model.multi_modal_projector.", "multi_modal_projector.")):  # fmt: skip
        if native_key.startswith(prefix):
            return stored + native_key[len(prefix) :]
    raise ValueError(f"no stored name for {native_key!r}")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _kept_fields(cls: type, cfg: dict[str, Any]) -> dict[str, Any]:
    allowed = set(inspect.signature(cls.__init__).parameters) - _GENERIC_CONFIG_FIELDS
    allowed |= {"rope_theta", "rope_scaling"}
    kept = {k: v for k, v in cfg.items() if k in allowed}
    dropped = sorted(set(cfg) - set(kept))
    if dropped:
        log.debug("text config: not carried over: %s", dropped)
    return kept


def text_config(llm_config: dict[str, Any], vocab_size: int, tied: bool):
    """The transformers text config of OpenGVLab's ``llm_config``: InternLM2 -> ``LlamaConfig``;
    Qwen2 / Qwen3 / Llama keep their class. ``vocab_size`` and ``tie_word_embeddings`` are set
    from the converted weights."""
    archs = list(llm_config.get("architectures") or [])
    model_type = llm_config.get("model_type")
    if "InternLM2ForCausalLM" in archs or model_type == "internlm2":
        c = llm_config
        if c.get("num_attention_heads", 0) % c.get("num_key_value_heads", c.get("num_attention_heads", 1)):
            raise ValueError("llm_config: num_attention_heads is not a multiple of num_key_value_heads")
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c["hidden_size"] // c["num_attention_heads"],
            hidden_act=c.get("hidden_act", "silu"),
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            initializer_range=c.get("initializer_range", 0.02),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=c.get("rope_theta", 10000.0),
            rope_scaling=c.get("rope_scaling"),
            attention_bias=bool(c.get("bias", False)),
            mlp_bias=False,
            pad_token_id=c.get("pad_token_id"),
            bos_token_id=c.get("bos_token_id", 1),
            eos_token_id=c.get("eos_token_id", 2),
            tie_word_embeddings=tied,
            use_cache=True,
        )
    if model_type in _HF_TEXT_TYPES:
        cls = CONFIG_MAPPING[model_type]
        kept = _kept_fields(cls, llm_config)
        kept.update(vocab_size=vocab_size, tie_word_embeddings=tied, use_cache=True)
        return cls(**kept)
    raise ValueError(
        f"llm_config: unsupported language model (architectures {archs}, model_type {model_type!r}); "
        f"supported: InternLM2ForCausalLM, {', '.join(sorted(_HF_TEXT_TYPES))}"
    )


def _is_internlm2(llm_config: dict[str, Any]) -> bool:
    return "InternLM2ForCausalLM" in (llm_config.get("architectures") or []) or llm_config.get("model_type") == "internlm2"


def vision_config(vc: dict[str, Any], force_image_size: int | None) -> InternVLVisionConfig:
    """``InternVLVisionConfig`` of OpenGVLab's InternViT ``vision_config``."""
    image_size = int(force_image_size or vc.get("image_size", 448))
    if int(vc.get("image_size", image_size)) != image_size:
        raise ValueError(
            f"vision_config.image_size {vc.get('image_size')} differs from force_image_size {force_image_size}: "
            "position embeddings would need interpolating, which this conversion does not do"
        )
    if vc.get("qk_normalization") and float(vc.get("layer_norm_eps", 1e-6)) != 1e-6:
        log.warning("InternViT q/k norm eps %s: transformers' InternVL uses 1e-6 there", vc.get("layer_norm_eps"))
    return InternVLVisionConfig(
        hidden_size=vc["hidden_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"],
        hidden_act=vc.get("hidden_act", "gelu"),
        image_size=image_size,
        patch_size=int(vc.get("patch_size", 14)),
        num_channels=int(vc.get("num_channels", 3)),
        attention_bias=bool(vc.get("qkv_bias", False)),
        use_qk_norm=bool(vc.get("qk_normalization", False)),
        norm_type=vc.get("norm_type", "rms_norm"),
        layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
        attention_dropout=float(vc.get("attention_dropout", 0.0)),
        projection_dropout=float(vc.get("attention_dropout", 0.0)),
        hidden_dropout_prob=float(vc.get("dropout", 0.0)),
        initializer_range=float(vc.get("initializer_range", 0.02)),
        layer_scale_init_value=float(vc.get("initializer_factor", 0.1)),
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,  # InternViT has no final norm: the last layer's output is used
        use_mask_token=False,
    )


# --------------------------------------------------------------------------------------------
# Tokenizer: sentencepiece model (protobuf) -> tokenizers BPE, without sentencepiece/protobuf
# --------------------------------------------------------------------------------------------

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message: varints as int, fixed32/64 as
    raw bytes, length-delimited as bytes."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, value


@dataclass
class SentencePieceModel:
    """What a sentencepiece ``ModelProto`` says that the conversion needs: pieces (text, score,
    type), the model type (1 unigram, 2 BPE) and the normalizer spec."""

    pieces: list[tuple[str, float, int]]
    model_type: int
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    precompiled_charsmap: bytes


def read_sentencepiece(path: str | os.PathLike[str]) -> SentencePieceModel:
    """Parse a sentencepiece ``.model`` (``ModelProto``: pieces = 1 {piece 1, score 2, type 3},
    trainer_spec = 2 {model_type 3}, normalizer_spec = 3 {precompiled_charsmap 2, add_dummy_prefix
    3, remove_extra_whitespaces 4}; proto2 defaults apply to absent fields)."""
    data = Path(path).read_bytes()
    pieces: list[tuple[str, float, int]] = []
    model_type, dummy, extra_ws, charsmap = 1, True, True, b""
    for num, _, value in _fields(data):
        if num == 1:
            text, score, kind = "", 0.0, _SP_NORMAL
            for n, _, v in _fields(value):
                if n == 1:
                    text = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append((text, score, kind))
        elif num == 2:
            for n, _, v in _fields(value):
                if n == 3:
                    model_type = v
        elif num == 3:
            for n, _, v in _fields(value):
                if n == 2:
                    charsmap = bytes(v)
                elif n == 3:
                    dummy = bool(v)
                elif n == 4:
                    extra_ws = bool(v)
    if not pieces:
        raise ValueError(f"{path}: no sentencepiece pieces: not a sentencepiece model")
    return SentencePieceModel(pieces, model_type, dummy, extra_ws, charsmap)


def sentencepiece_tokenizer(sp: SentencePieceModel) -> Tokenizer:
    """A ``tokenizers`` BPE equal to sentencepiece's BPE encoding of ``sp``: same vocabulary and
    ids, byte fallback when the model has byte pieces, merges ranked by the merged piece's score
    (sentencepiece merges the adjacent pair whose union scores highest), control and user-defined
    pieces as added tokens that are never split."""
    if sp.model_type != 2:
        raise ValueError(f"sentencepiece model type {sp.model_type} (1 = unigram): only BPE models are converted")
    vocab = {text: i for i, (text, _, _) in enumerate(sp.pieces)}
    scores = {text: score for text, score, kind in sp.pieces if kind == _SP_NORMAL}
    merges = []
    for piece, score in scores.items():
        local = [(piece[:j], piece[j:], score) for j in range(1, len(piece))
                 if piece[:j] in vocab and piece[j:] in vocab]  # fmt: skip
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: -m[2])  # stable: ties keep the vocabulary order
    unk = next((t for t, _, k in sp.pieces if k == _SP_UNKNOWN), None)
    byte_fallback = any(k == _SP_BYTE for _, _, k in sp.pieces)
    tok = Tokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=byte_fallback))  # fmt: skip
    steps = []
    if sp.precompiled_charsmap:
        steps.append(normalizers.Precompiled(sp.precompiled_charsmap))
    if sp.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if sp.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if sp.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    specials = [t for t, _, k in sp.pieces if k in (_SP_CONTROL, _SP_UNKNOWN)]
    users = [t for t, _, k in sp.pieces if k == _SP_USER]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in users])
    return tok


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class _ConvertedTokenizer:
    tokenizer: PreTrainedTokenizerFast
    turn_end: str  # the token that ends a turn (<|im_end|>)


def chat_template(template: str, bos: bool) -> tuple[str, str]:
    """The Jinja chat template of OpenGVLab's conversation ``template`` and its turn-end token.
    Raises ``ValueError`` for a template this module does not know."""
    if template not in TEMPLATES:
        raise ValueError(f"conversation template {template!r} is not known here (known: {', '.join(TEMPLATES)})")
    sys_prefix, sys_msg, user, assistant, sep = TEMPLATES[template]
    q = json.dumps  # JSON strings are valid Jinja string literals
    content = (
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '<IMG_CONTEXT>\\n' }}"
        "{%- elif item['type'] == 'video' -%}{{ '<video>\\n' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    jinja = (
        ("{{- bos_token -}}" if bos else "")
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        + "{%- set message = messages[0] -%}"
        + f"{{{{- {q(sys_prefix)} -}}}}" + content + f"{{{{- {q(sep)} -}}}}"
        + "{%- set rest = messages[1:] -%}"
        + f"{{%- else -%}}{{{{- {q(sys_prefix + sys_msg + sep)} -}}}}{{%- set rest = messages -%}}{{%- endif -%}}"
        + "{%- for message in rest -%}"
        + f"{{%- if message['role'] == 'user' -%}}{{{{- {q(user)} -}}}}"
        + f"{{%- elif message['role'] == 'assistant' -%}}{{{{- {q(assistant)} -}}}}"
        + "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}{%- endif -%}"
        + content + f"{{{{- {q(sep)} -}}}}"
        + "{%- endfor -%}"
        + f"{{%- if add_generation_prompt -%}}{{{{- {q(assistant)} -}}}}{{%- endif -%}}"
    )  # fmt: skip
    return jinja, sep.strip()


def convert_tokenizer(src: Path, template: str) -> _ConvertedTokenizer:
    """The source tokenizer as a ``PreTrainedTokenizerFast`` (see the module docstring)."""
    tcfg_path = src / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else {}
    internlm2_bos = False
    if (src / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    elif (src / "tokenizer.model").is_file():
        tok = sentencepiece_tokenizer(read_sentencepiece(src / "tokenizer.model"))
        internlm2_bos = bool(tcfg.get("add_bos_token", True))
    else:
        raise FileNotFoundError(f"{src}: no tokenizer.json or tokenizer.model")
    # Added tokens of tokenizer_config.json, at their ids.
    decoder = tcfg.get("added_tokens_decoder") or {}
    for idx in sorted(decoder, key=int):
        spec = decoder[idx]
        text = spec["content"]
        special = bool(spec.get("special", True))
        added = AddedToken(text, special=special, normalized=bool(spec.get("normalized", False)),
                           lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                           single_word=bool(spec.get("single_word", False)))  # fmt: skip
        # Declared even when the vocabulary has it (a normal sentencepiece piece): never split then.
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        have = tok.token_to_id(text)
        if have != int(idx):
            raise ValueError(f"{tcfg_path}: added token {text!r} should have id {idx} but gets {have}")
    for text in IMAGE_TOKENS.values():
        if tok.token_to_id(text) is None:
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
            log.info("tokenizer: %r added (id %d)", text, tok.token_to_id(text))
    bos, eos = _token_str(tcfg.get("bos_token")), _token_str(tcfg.get("eos_token"))
    unk, pad = _token_str(tcfg.get("unk_token")), _token_str(tcfg.get("pad_token"))
    if internlm2_bos:
        bos = bos or "<s>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    jinja, turn_end = chat_template(template, bos=internlm2_bos)
    for name, text in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", pad), ("turn end", turn_end)):
        if text is not None and tok.token_to_id(text) is None:
            raise ValueError(f"{src}: the tokenizer has no {name} token {text!r}")
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)) if v}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens=dict(IMAGE_TOKENS),
        model_max_length=int(tcfg.get("model_max_length") or 8192),
        padding_side=tcfg.get("padding_side", "right"),
        chat_template=jinja,
        **kwargs,
    )
    return _ConvertedTokenizer(fast, turn_end)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(table)})")
    return table[dtype]


def _grow_rows(rows: int) -> Transform:
    """Append rows to an embedding / head [V, D] up to ``rows``, each the mean of the existing."""

    def f(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] >= rows:
            return t
        mean = t.float().mean(0, keepdim=True).to(t.dtype)
        return torch.cat([t, mean.expand(rows - t.shape[0], -1)], 0)

    return f


def _then(first: Transform | None, second: Transform) -> Transform:
    return second if first is None else (lambda t: second(first(t)))


def _prepare_dst(dst: Path) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty folder: choose a new destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dst)
    tmp.mkdir()
    return tmp


def convert_internvl(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert the OpenGVLab-layout InternVL folder ``src`` into a transformers-native folder
    ``dst`` (which must not exist, or be empty) and return ``dst``.

    ``dtype``: ``None`` keeps each tensor's dtype (the release's bfloat16), else ``"float32"`` /
    ``"bfloat16"`` / ``"float16"`` (or a ``torch.dtype``) for every floating tensor. Writes
    ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at
    most ``max_shard_bytes`` + ``model.safetensors.index.json``), ``generation_config.json``, the
    tokenizer files, ``chat_template.jinja``, ``preprocessor_config.json`` and
    ``processor_config.json``; atomically (a temporary sibling renamed at the end). Raises
    ``ValueError`` for a native ``src`` ("already in the transformers layout"), for another
    layout, for an unmapped key or a key/shape the target model does not expect.
    """
    src, dst = Path(src), Path(dst)
    layout = checkpoint_layout(src)
    if layout == "native":
        raise ValueError(f"{src} ({NATIVE_ARCH}) is already in the transformers layout, load it directly")
    cfg = _read_json(src / "config.json")
    llm_cfg, vis_cfg = dict(cfg.get("llm_config") or {}), dict(cfg.get("vision_config") or {})
    if not llm_cfg or not vis_cfg:
        raise ValueError(f"{src / 'config.json'}: {OPENGVLAB_ARCH} config without llm_config / vision_config")
    if cfg.get("ps_version", "v2") != "v2":
        raise ValueError(f"{src / 'config.json'}: ps_version {cfg.get('ps_version')!r}; only 'v2' pixel shuffle converts")
    out_dtype = _resolve_dtype(dtype)

    tok = convert_tokenizer(src, str(cfg.get("template", "internvl2_5")))
    fast = tok.tokenizer
    image_token_id = fast.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"])

    weights = _Weights(src)
    try:
        internlm2 = _is_internlm2(llm_cfg)
        heads = int(llm_cfg.get("num_attention_heads", 0))
        text_rules = _internlm2_rules(heads, int(llm_cfg.get("num_key_value_heads", heads))) if internlm2 else _HF_TEXT_RULES
        plan = _map_keys(weights.keys(), _VISION_RULES + text_rules)
        by_target = {t: (s, fn) for s, t, fn in plan}
        emb_key = _LM + "embed_tokens.weight"
        if emb_key not in by_target:
            raise ValueError(f"{src}: no input embedding among the checkpoint keys")
        emb_src = by_target[emb_key][0]
        rows = weights.shape(emb_src)[0]
        vocab = max(rows, len(fast))
        emb = weights.get(emb_src)
        tied = "lm_head.weight" not in by_target or torch.equal(emb, weights.get(by_target["lm_head.weight"][0]))
        emb_dtype = out_dtype or emb.dtype
        del emb
        if tied and "lm_head.weight" in by_target:
            del by_target["lm_head.weight"]  # the same matrix: stored once, tied on load
        for key in [emb_key, "lm_head.weight"]:
            if key in by_target and vocab > rows:
                s, fn = by_target[key]
                by_target[key] = (s, _then(fn, _grow_rows(vocab)))

        vision = vision_config(vis_cfg, cfg.get("force_image_size"))
        text = text_config(llm_cfg, vocab, tied)
        side = int(vision.image_size[0]) // int(vision.patch_size[0])
        downsample = float(cfg.get("downsample_ratio", 0.5))
        if (side * downsample) % 1:
            raise ValueError(f"patch grid {side} is not divisible by 1 / downsample_ratio {downsample}")
        config = InternVLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=image_token_id,
            image_seq_length=int(round(side * side * downsample**2)),
            downsample_ratio=downsample,
            projector_hidden_act="gelu",
            vision_feature_layer=int(cfg.get("select_layer", -1)),
            vision_feature_select_strategy="default",
            tie_word_embeddings=tied,
        )
        config.architectures = [NATIVE_ARCH]

        expected = _expected_shapes(config)
        _check_plan(by_target, expected, weights, tied, vocab, rows)
        config.dtype = emb_dtype
        config.text_config.dtype = emb_dtype
        config.vision_config.dtype = emb_dtype

        tmp = _prepare_dst(dst)
        try:
            _write_weights(tmp, by_target, weights, expected, out_dtype, max_shard_bytes, progress)
            config.save_pretrained(tmp)
            _write_generation_config(tmp, src, fast, tok.turn_end, text)
            fast.save_pretrained(str(tmp))
            _write_processor_configs(tmp, cfg, config)
            fsync_tree(tmp)
            if dst.exists():
                dst.rmdir()
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        weights.close()
    log.info("converted %s -> %s (%d tensors, tied head: %s)", src, dst, len(by_target), tied)
    return dst


def _expected_shapes(config: InternVLConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_plan(by_target, expected, weights: _Weights, tied: bool, vocab: int, rows: int) -> None:
    produced = set(by_target)
    missing = sorted(set(expected) - produced - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(produced - set(expected))
    if missing or unexpected:
        raise ValueError(f"conversion does not fill the target model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    bad = []
    for target, (source, fn) in by_target.items():
        shape = list(weights.shape(source))
        if fn is not None:  # split parts and grown rows: the shape after the transform
            shape = list(fn(torch.empty(shape, device="meta")).shape)
        if tuple(shape) != expected[target]:
            bad.append(f"{source} -> {target}: {tuple(shape)} vs {expected[target]}")
    if bad:
        raise ValueError(f"shape mismatch: {bad[:5]}")


def _write_weights(tmp, by_target, weights: _Weights, expected, out_dtype, max_shard_bytes, progress) -> None:
    """Stream the converted tensors into safetensors shards of at most ``max_shard_bytes``."""
    order = sorted(by_target, key=lambda t: (str(weights.files[by_target[t][0]]), by_target[t][0], t))

    def nbytes(target: str) -> int:
        size = weights.itemsize(by_target[target][0]) if out_dtype is None else out_dtype.itemsize
        return math.prod(expected[target]) * size

    shards: list[list[str]] = [[]]
    used = 0
    for target in order:
        n = nbytes(target)
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(target)
        used += n
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])  # fmt: skip
    weight_map, total = {}, 0
    bar = tqdm(total=len(order), desc="convert-internvl", unit="tensor", disable=not progress)
    for name, targets in zip(names, shards):
        tensors = {}
        for target in targets:
            source, fn = by_target[target]
            t = weights.get(source)
            t = fn(t) if fn is not None else t
            if out_dtype is not None and t.is_floating_point():
                t = t.to(out_dtype)
            tensors[hub_key(target)] = t.contiguous()
            total += t.numel() * t.element_size()
            bar.update(1)
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    bar.close()
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_generation_config(tmp: Path, src: Path, fast, turn_end: str, text) -> None:
    eos: list[int] = []
    src_gen = src / "generation_config.json"
    if src_gen.is_file():
        value = _read_json(src_gen).get("eos_token_id")
        eos += [int(i) for i in (value if isinstance(value, list) else [value]) if i is not None]
    for i in (fast.eos_token_id, fast.convert_tokens_to_ids(turn_end)):
        if i is not None and int(i) not in eos:
            eos.append(int(i))
    GenerationConfig(
        eos_token_id=eos,
        bos_token_id=fast.bos_token_id if fast.bos_token_id is not None else text.bos_token_id,
        pad_token_id=fast.pad_token_id if fast.pad_token_id is not None else text.pad_token_id,
    ).save_pretrained(str(tmp))


def _write_processor_configs(tmp: Path, cfg: dict[str, Any], config: InternVLConfig) -> None:
    """The checkpoint's dynamic tiling (``dynamic_image_size``, ``min/max_dynamic_patch``) as the
    processor files every InternVL of this project carries (:class:`TileProcessor`)."""
    dynamic = bool(cfg.get("dynamic_image_size", True))
    max_tiles = int(cfg.get("max_dynamic_patch", 12)) if dynamic else 1
    TileProcessor(
        tile_size=int(config.vision_config.image_size[0]),
        tokens_per_tile=int(config.image_seq_length),
        min_tiles=min(int(cfg.get("min_dynamic_patch", 1)), max_tiles),
        max_tiles=max_tiles,
    ).save_pretrained(tmp)


__all__ = [
    "CONVERT_COMMAND",
    "SentencePieceModel",
    "chat_template",
    "checkpoint_layout",
    "convert_internvl",
    "convert_tokenizer",
    "hub_key",
    "read_sentencepiece",
    "sentencepiece_tokenizer",
    "split_wqkv",
    "text_config",
    "vision_config",
]
