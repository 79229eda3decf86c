"""The InternVL side of Perceptio (SPEC §1, §4): base model, tokenizer, perception tokens, LoRA.

* :func:`train_tokenizer`: a byte-level BPE tokenizer for the tiny offline base, wrapped as a
  transformers fast tokenizer with pad/bos/eos and InternVL's image tokens (``<img>``,
  ``<IMG_CONTEXT>``, ``</img>``, ``<video>``) declared the way the released "-hf" tokenizers declare
  them (``extra_special_tokens``: ``start_image_token``, ``context_image_token``, ...), so it saves
  with ``save_pretrained`` and loads through ``AutoTokenizer`` like the real one.
* :func:`build_tiny_internvl` / :func:`load_internvl`: ``InternVLForConditionalGeneration`` from a
  tiny ``InternVLConfig`` (InternVL vision tower + Qwen2 text model) or ``from_pretrained``.
* :func:`add_perception_tokens` + :func:`init_new_token_rows`: the K + 3 tokens of SPEC §1 become
  special added tokens; the input embeddings and the LM head grow, new rows set to the mean of the
  existing rows.
* :func:`apply_lora`: PEFT LoRA on the language model's linear layers only, and the new tokens'
  rows of the input embeddings and of the LM head trainable through PEFT's
  ``trainable_token_indices`` (a ``TrainableTokensWrapper`` holding only those rows as parameters;
  they are saved inside the adapter). We chose it over ``modules_to_save=["embed_tokens",
  "lm_head"]``, which would train and save two full V x d copies (about 1.1 G parameters for a
  152K x 3.5K vocabulary) to learn K + 3 rows. With tied embeddings PEFT ties the LM head to the
  same rows; untied (InternVL2.5-8B), both layers get their own trainable rows.

How InternVL takes the image (transformers 5, ``modeling_internvl.py``): the prompt holds
``<img>`` + ``<IMG_CONTEXT>`` x ``image_seq_length`` + ``</img>``; the vision tower's patch features
(CLS dropped) are pixel-shuffled by ``downsample_ratio`` (0.5) and projected, and
``masked_scatter`` puts them at the ``image_token_id`` (= ``<IMG_CONTEXT>``) positions. So
``image_seq_length = (image_size / patch_size)^2 * downsample_ratio^2`` per 448-px tile (256 for
the released models). An image is one or more tiles (dynamic tiling:
:mod:`perceptio_core.model.processor`).

Chat template and turn end: the tiny tokenizer carries an InternVL-style chat template
(``<|im_start|>role\n ... <|im_end|>\n``, :data:`CHAT_TEMPLATE`, saved as ``chat_template.jinja``
as the released "-hf" checkpoints ship it); a response ends with the template's turn-end token
(:func:`turn_end_id`: ``<|im_end|>``), which is what the targets end with and what generation stops
on, whatever the tokenizer's own eos (``</s>`` for InternVL2.5-8B).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from perceptio_core.config import ModelConfig, TinyVLMConfig
from perceptio_core.format.tokens import perception_tokens

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # InternVL's turn markers (Qwen2 / InternLM2 chat format)
# InternVL's "-hf" chat template, without a default system prompt (InternVL3's; InternVL2.5's adds
# one): a message's content is a string or a list of {"type": "image"} / {"type": "text", "text"}.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# InternVL's image tokens, under the attribute names transformers' InternVLProcessor reads.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
PEFT_ADAPTER = "default"  # PEFT's adapter name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` for the tiny base.

    ``vocab_size`` counts the byte alphabet (256), the merges and the 9 special tokens (pad, bos,
    eos, the two turn markers and the four InternVL image tokens). Byte-level: any text
    round-trips, no unknown token. The tokenizer carries :data:`CHAT_TEMPLATE`. With ``out_dir``
    it is also saved there (``AutoTokenizer.from_pretrained(out_dir)`` gives it back, image-token
    attributes and chat template included).
    """
    specials = [PAD, BOS, EOS, IM_START, IM_END, *IMAGE_TOKENS.values()]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet + specials ({256 + len(specials)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=dict(IMAGE_TOKENS),
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` (fast) of a directory or hub id."""
    return AutoTokenizer.from_pretrained(str(name_or_path))


def turn_end_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id a response ends with: the first token the chat template writes after an assistant
    message's content when that token is special (``<|im_end|>`` for InternVL), else (no template,
    or a template that ends turns with plain text) the tokenizer's eos."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        marker = "\x00PERCEPTIO\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        after = text.split(marker, 1)[1] if marker in text else ""
        ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
        if ids and int(ids[0]) in set(tokenizer.all_special_ids) | _added_special_ids(tokenizer):
            return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither a chat template with a special turn-end token nor an eos token")
    return int(tokenizer.eos_token_id)


def _added_special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}


def image_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str]:
    """``(start, context, end)`` image token strings of ``tokenizer`` (InternVL's defaults when the
    tokenizer does not declare them), each checked to be a single token of the vocabulary."""
    out = []
    for attr in ("start_image_token", "context_image_token", "end_image_token"):
        try:
            value = getattr(tokenizer, attr)
        except AttributeError:
            value = None
        value = str(value) if value else IMAGE_TOKENS[attr]
        ids = tokenizer.convert_tokens_to_ids([value])
        if ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {attr} {value!r}: not an InternVL tokenizer")
        out.append(value)
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class PerceptionTokenIds:
    """Token ids of the perception tokens in one tokenizer (SPEC §1).

    seg, d_start, d_end: ids of ``[SEG]``, ``<d_start>``, ``<d_end>``; codes: ids of ``<d_0>`` ...
    ``<d_{K-1}>`` in code order (``codes[k]`` is the id of code k).
    """

    seg: int
    d_start: int
    d_end: int
    codes: tuple[int, ...]

    @property
    def codebook_size(self) -> int:
        return len(self.codes)

    @property
    def all(self) -> list[int]:
        """Every added id, in the order :func:`perception_tokens` lists them."""
        return [self.seg, self.d_start, self.d_end, *self.codes]

    def codes_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``codes`` as a LongTensor [K]."""
        return torch.tensor(self.codes, dtype=torch.long, device=device)


def perception_token_ids(tokenizer: PreTrainedTokenizerBase, codebook_size: int) -> PerceptionTokenIds:
    """The ids of the K + 3 perception tokens; raises if the tokenizer lacks any of them."""
    names = perception_tokens(codebook_size)
    ids = tokenizer.convert_tokens_to_ids(names)
    unk = tokenizer.unk_token_id
    missing = [n for n, i in zip(names, ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"tokenizer lacks perception tokens {missing[:3]}... (run add_perception_tokens)")
    return PerceptionTokenIds(ids[0], ids[1], ids[2], tuple(ids[3:]))


def add_perception_tokens(tokenizer: PreTrainedTokenizerBase, codebook_size: int) -> PerceptionTokenIds:
    """Add ``[SEG]``, ``<d_start>``, ``<d_end>`` and ``<d_0>`` ... ``<d_{K-1}>`` (SPEC §1) as special
    added tokens (never split, not normalised, dropped by ``decode(skip_special_tokens=True)``).

    Idempotent: tokens already present are kept. The vocabulary grows by K + 3 on first call.
    """
    present = set(tokenizer.get_vocab())
    new = [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
        for t in perception_tokens(codebook_size)
        if t not in present
    ]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        log.info("added %d perception tokens (K = %d); vocabulary now %d", len(new), codebook_size, len(tokenizer))
    return perception_token_ids(tokenizer, codebook_size)


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------


def tiny_internvl_config(cfg: TinyVLMConfig, tokenizer: PreTrainedTokenizerBase) -> InternVLConfig:
    """A tiny ``InternVLConfig`` whose vocabulary is ``len(tokenizer)`` and whose ``image_token_id``
    is the tokenizer's ``<IMG_CONTEXT>``. Embeddings untied, as in InternVL2.5-8B."""
    if cfg.image_size % cfg.patch_size or (cfg.image_size // cfg.patch_size) % 2:
        raise ValueError("tiny.image_size / tiny.patch_size must be an even integer (pixel shuffle 0.5)")
    _, context, _ = image_tokens(tokenizer)
    grid = cfg.image_size // cfg.patch_size
    vision = InternVLVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        intermediate_size=4 * cfg.vision_hidden_size,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    text = Qwen2Config(
        hidden_size=cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        intermediate_size=cfg.text_intermediate_size,
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(context),
        image_seq_length=(grid // 2) ** 2,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def build_tiny_internvl(
    cfg: TinyVLMConfig, tokenizer: PreTrainedTokenizerBase, seed: int | None = 0
) -> InternVLForConditionalGeneration:
    """A freshly initialised tiny InternVL for ``tokenizer`` (seeded for reproducibility)."""
    config = tiny_internvl_config(cfg, tokenizer)
    if seed is None:
        return InternVLForConditionalGeneration(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InternVLForConditionalGeneration(config)


def load_internvl(name_or_path: str | Path, dtype: str = "float32") -> InternVLForConditionalGeneration:
    """``InternVLForConditionalGeneration.from_pretrained`` of a directory or hub id, in ``dtype``.

    A local folder in OpenGVLab's own layout (``InternVLChatModel``: InternVL2.5-8B as released)
    is refused with the command that converts it: loaded as it is it would become an InternVL with
    a default Qwen2 text model and random weights. A folder in neither layout is refused too."""
    from perceptio_core.model.convert import CONVERT_COMMAND, checkpoint_layout  # convert imports this module

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if (Path(name_or_path) / "config.json").is_file() and checkpoint_layout(name_or_path) == "opengvlab":
        raise ValueError(
            f"{name_or_path} is in OpenGVLab's InternVLChatModel layout (remote code); convert it to the "
            f"transformers layout first: {CONVERT_COMMAND}"
        )
    model = InternVLForConditionalGeneration.from_pretrained(str(name_or_path), dtype=DTYPES[dtype])
    keep_head_as_loaded(model)
    return model


def stop_token_ids(vlm: nn.Module, tokenizer: PreTrainedTokenizerBase, extra: Sequence[int] = ()) -> set[int]:
    """Every id that ends a response: the tokenizer's eos, its chat template's turn end
    (:func:`turn_end_id`) and every id of the checkpoint's ``generation_config.eos_token_id`` (an
    int or a list: InternVL2.5-8B's tokenizer eos is ``</s>`` while its turns end with
    ``<|im_end|>``), plus ``extra``."""
    ids = {int(i) for i in extra} | {turn_end_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(vlm, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids |= {int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])}
    return ids


def keep_head_as_loaded(model: InternVLForConditionalGeneration) -> bool:
    """Record in ``model.config`` (and its text config) whether the LM head IS the input embedding,
    as the checkpoint loaded it; returns that. A config without ``tie_word_embeddings`` (as
    transformers' InternVL conversion writes it, and as the hub ships several) defaults to tied, so
    a checkpoint whose ``lm_head.weight`` differs from its embeddings loads untied but would be tied
    by the next ``tie_weights()`` (``resize_token_embeddings`` calls it), silently replacing the
    output layer with the embeddings. After this call the config says what the weights are, and
    every later resize, save and reload keeps it."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = tied
    return tied


@functools.cache
def _cache_kwarg() -> str:
    """The name InternVLModel.forward takes the KV cache under: ``cache`` in recent transformers 5
    releases (``past_key_values`` is deprecated there and warns on every call), before that
    ``past_key_values``."""
    import inspect

    from transformers import InternVLModel

    return "cache" if "cache" in inspect.signature(InternVLModel.forward).parameters else "past_key_values"


def lm_pass(
    vlm: InternVLForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    cache: object = None,
    use_cache: bool = False,
    logits_from: int | None = -1,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """One pass of an InternVL (``vlm.model`` + ``vlm.lm_head``; a PEFT-wrapped one's inner model
    works alike) over ``input_ids`` [B, T] with an optional KV cache. ``pixel_values`` fill the
    ``<IMG_CONTEXT>`` places (prefill only). The LM head runs on ``hidden[:, logits_from:]`` (-1:
    the last position; None: no logits). ``position_ids`` [B, T] (None: the cache's next places)
    let left-padded rows count their positions from their first real token.
    Returns ``(hidden [B, T, d], logits, cache or None)``."""
    kw = _cache_kwarg()
    out = vlm.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                    position_ids=position_ids, use_cache=use_cache, **{kw: cache})  # fmt: skip
    hidden = out.last_hidden_state
    logits = vlm.lm_head(hidden[:, logits_from:]) if logits_from is not None else None
    new_cache = getattr(out, kw, None) if use_cache else None
    return hidden, logits, new_cache


def image_seq_length(model_config: InternVLConfig) -> int:
    """Image tokens per tile: ``(image_size / patch_size)^2 * downsample_ratio^2``."""
    vc = model_config.vision_config
    side = int(vc.image_size[0]) // int(vc.patch_size[0])
    return int(round(side * side * model_config.downsample_ratio**2))


def vision_image_size(model_config: InternVLConfig) -> int:
    """The InternVL tile side in pixels (448 for the released models)."""
    return int(model_config.vision_config.image_size[0])


def init_new_token_rows(
    model: InternVLForConditionalGeneration, vocab_size: int, new_ids: list[int], reference_rows: int
) -> None:
    """Make room for ``vocab_size`` tokens and set the rows ``new_ids`` of the input embeddings and
    of the LM head to the mean of their first ``reference_rows`` rows (the pre-existing vocabulary).

    Released Qwen2-based checkpoints pad their embedding matrices beyond the tokenizer (152064 rows
    for a ~151.7K vocabulary), so added tokens may land in existing but untrained rows: those are
    overwritten too, never left as they are. The matrices only grow.
    """
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    idx = torch.tensor(new_ids, dtype=torch.long, device=emb.weight.device)
    with torch.no_grad():
        mean = emb.weight[:reference_rows].float().mean(0)
        emb.weight[idx] = mean.to(emb.weight.dtype)
        if head is not None and head.weight is not emb.weight:
            head_mean = head.weight[:reference_rows].float().mean(0)
            head.weight[idx.to(head.weight.device)] = head_mean.to(head.weight.dtype)


def _rows_of(module: nn.Module, ids: list[int]) -> torch.Tensor:
    """Effective weight rows ``ids`` [n, d] of an embedding / LM head, PEFT-wrapped or not."""
    adapter = getattr(module, "token_adapter", None)
    if adapter is not None:
        name = PEFT_ADAPTER if PEFT_ADAPTER in adapter.token_indices else next(iter(adapter.token_indices))
        order = {int(t): i for i, t in enumerate(adapter.token_indices[name])}
        delta = adapter.trainable_tokens_delta[name]
        base_w = adapter.base_layer.weight
        return torch.stack([delta[order[i]] if i in order else base_w[i] for i in ids])
    return module.weight[torch.tensor(ids, dtype=torch.long, device=module.weight.device)]


def new_token_rows(model: InternVLForConditionalGeneration, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding rows [n, d], LM-head rows [n, d]) of ``ids``, as the model uses them now."""
    return _rows_of(model.get_input_embeddings(), ids), _rows_of(model.get_output_embeddings(), ids)


def set_token_rows(
    model: InternVLForConditionalGeneration, ids: list[int], embed: torch.Tensor, head: torch.Tensor
) -> None:
    """Write rows ``ids`` of the (unwrapped) input embeddings and LM head."""
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    idx = torch.tensor(ids, dtype=torch.long, device=emb.weight.device)
    with torch.no_grad():
        emb.weight[idx] = embed.to(emb.weight)
        if out is not None and out.weight is not emb.weight:
            out.weight[idx.to(out.weight.device)] = head.to(out.weight)


def lora_target_regex(module_names: Sequence[str]) -> str:
    """PEFT ``target_modules`` regex: the named linear layers inside ``language_model`` only (the
    vision tower has its own ``q_proj``/``k_proj``/``v_proj``, which must stay frozen)."""
    names = "|".join(sorted(set(module_names)))
    return rf".*language_model\..*\.({names})"


def apply_lora(
    model: InternVLForConditionalGeneration, cfg: ModelConfig, trainable_token_ids: Sequence[int]
):
    """Wrap ``model`` in a PEFT ``PeftModel``: LoRA (rank ``cfg.lora_rank``) on the language
    model's ``cfg.lora_target_modules``, the rows ``trainable_token_ids`` of the input embeddings
    and of the LM head trainable (``trainable_token_indices``); everything else frozen."""
    from peft import LoraConfig, get_peft_model

    ids = [int(i) for i in trainable_token_ids]
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_regex(cfg.lora_target_modules),
        trainable_token_indices={"embed_tokens": ids, "lm_head": ids} if ids else None,
        bias="none",
    )
    return get_peft_model(model, lora)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def to_pil_rgb(image: Image.Image | bytes | np.ndarray) -> Image.Image:
    """An image given as PIL, encoded bytes (JPEG/PNG/WebP) or an HxWx3 uint8 array -> RGB PIL."""
    if isinstance(image, (bytes, bytearray)):
        import io

        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        return Image.fromarray(arr).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"unsupported image type {type(image).__name__}")


def normalize_image(
    image: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """RGB PIL -> float tensor [3, size, size]: square resize, /255, (x - mean) / std."""
    im = image.resize((size, size), resample=resample)
    arr = np.asarray(im, dtype=np.float32) / 255.0  # [S, S, 3]
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))



__all__ = [
    "BOS",
    "EOS",
    "CHAT_TEMPLATE",
    "IMAGE_TOKENS",
    "IM_END",
    "IM_START",
    "PAD",
    "PerceptionTokenIds",
    "add_perception_tokens",
    "apply_lora",
    "build_tiny_internvl",
    "image_seq_length",
    "image_tokens",
    "load_internvl",
    "load_tokenizer",
    "lora_target_regex",
    "normalize_image",
    "perception_token_ids",
    "init_new_token_rows",
    "new_token_rows",
    "set_token_rows",
    "tiny_internvl_config",
    "to_pil_rgb",
    "train_tokenizer",
    "turn_end_id",
    "vision_image_size",
]
