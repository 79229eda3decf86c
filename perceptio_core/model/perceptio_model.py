"""The Perceptio model (SPEC §1, §3, §4): InternVL + LoRA, ``[SEG]`` -> SAM2, depth tokens.

Parts:

* ``vlm``: ``InternVLForConditionalGeneration`` wrapped in a PEFT ``PeftModel`` (LoRA on the
  language model, the K + 3 new token rows of the embeddings and of the LM head trainable; see
  :mod:`perceptio_core.model.internvl`).
* ``seg_projection``: Linear(d, d), ReLU, Linear(d, C) (C = 256, the SAM2 prompt dimension, for
  the released SAM2; 32 for the tiny one), applied to the last-layer hidden state **at the [SEG]
  token's own position** (the output of the final norm, the state the LM head reads there).
* ``sam2``: :class:`perceptio_core.model.sam2_decoder.SAM2Segmenter`: frozen image encoder, prompt
  encoder, fine-tuned mask decoder.
* ``depth_tokenizer``: the frozen depth codec, an ``nn.Module``
  :class:`~perceptio_core.depth.codec.DepthCodec` (``encode``/``decode``/``soft_decode``; in the
  pipeline the :class:`perceptio_core.depth.tokenizer.DepthTokenizer` of the ``train_vqvae``
  artifact). It is the model's only source of K and N (``codebook_size``, ``num_depth_tokens``,
  ``depth_spec``): they set the perception vocabulary, the losses and constrained decoding.

Training: ``forward(batch) -> {"loss", "llm", "seg_bce", "seg_dice", "marker", "token", "count",
"rec"}`` on a batch from :class:`perceptio_core.model.batching.PerceptioCollator`; ``loss`` carries the
gradient, the other entries are detached for logging. Optimise :meth:`PerceptioModel.trainable_parameters`
(LoRA, new token rows, the [SEG] projection, the SAM2 mask decoder). The LM head is applied only to
the positions from the first target token on (with 152K-entry vocabularies the full [B, T, V]
logits would dominate memory), and SAM2 runs only on the examples that have (``[SEG]``, mask)
pairs: one mask per pair, each prompted by its own ``[SEG]`` state (several per sequence in a
multi-round referring conversation or a grounded caption, SPEC §1), the image encoded once per
example; L_seg averages over pairs. A batch of text-only examples passes no ``pixel_values``.

Saving (:meth:`PerceptioModel.save_pretrained`) writes, never pickling:

    config.json            model and loss configs, the depth codec's numbers (``depth_codec``: K, grid,
                           N, map size; checked against the codec on loading), the perception
                           token ids, ``merged`` (LoRA merged into ``base/``), file list
    adapter/               the PEFT adapter (adapter_config.json + adapter_model.safetensors; it holds
                           the LoRA weights and the trained new-token rows); absent when merged
    heads.safetensors      seg_projection.*, sam2.sam_mask_decoder.* (and sam2.image_encoder.* when
                           it is trained), token_rows.embed / token_rows.lm_head: the effective rows
                           of the K + 3 added tokens
    sam2_frozen.safetensors the frozen SAM2 parts, only when no SAM2 checkpoint is configured
    sam2.safetensors       SAM2 whole, in a self-contained save (``perceptio export``) instead
    base/                  the base InternVL (config + safetensors), when ``model.base`` is unset
                           (a freshly built tiny base exists nowhere else), when merged, and in a
                           self-contained save
    tokenizer/             the extended tokenizer with its chat template, and the image
                           processor's ``preprocessor_config.json`` / ``processor_config.json``
                           (dynamic tiling, :mod:`perceptio_core.model.processor`)
    depth_tokenizer/       the depth tokenizer (the VQ-VAE), when it is a ``DepthTokenizer``
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerBase

from perceptio_core.config import LossConfig, ModelConfig, _build, to_dict
from perceptio_core.depth.codec import DepthCodec, DepthCodecSpec
from perceptio_core.depth.tokenizer import DepthTokenizer
from perceptio_core.model.batching import PerceptioCollator
from perceptio_core.model.internvl import (
    PerceptionTokenIds,
    add_perception_tokens,
    apply_lora,
    build_tiny_internvl,
    init_new_token_rows,
    lm_pass,
    load_internvl,
    load_tokenizer,
    new_token_rows,
    perception_token_ids,
    set_token_rows,
)
from perceptio_core.model.losses import (
    IGNORE,
    mask_bce_loss,
    mask_dice_loss,
    rec_loss,
    sequence_terms,
    span_bounds,
    total_loss,
)
from perceptio_core.model.processor import TileProcessor
from perceptio_core.model.sam2_decoder import SAM2Segmenter, build_sam2, upsample_logits

log = logging.getLogger(__name__)

FORMAT = "perceptio-model"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The depth codec seen from here
# --------------------------------------------------------------------------------------------


def check_depth_codec(depth_tokenizer: Any) -> DepthCodecSpec:
    """The K, grid and map size of ``depth_tokenizer``, which must be an ``nn.Module`` (so its
    frozen weights move with the model) and a :class:`~perceptio_core.depth.codec.DepthCodec`;
    ``TypeError`` otherwise."""
    if not isinstance(depth_tokenizer, nn.Module):
        raise TypeError(f"the depth tokenizer must be an nn.Module DepthCodec, got {type(depth_tokenizer).__name__}")
    return DepthCodecSpec.of(depth_tokenizer)


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class LMOutput:
    """One language-model pass.

    hidden: [B, T, d] last-layer hidden states (after the final norm).
    logits: [B, T', V] LM-head logits of the positions asked for (``logits_from``), or None.
    past_key_values: the KV cache when ``use_cache``, else None.
    """

    hidden: torch.Tensor
    logits: torch.Tensor | None
    past_key_values: Any


class PerceptioModel(nn.Module):
    """InternVL + LoRA with the ``[SEG]`` -> SAM2 path and the depth tokens (see module docstring).

    Build with :meth:`build` (fresh) or :meth:`from_pretrained` (saved); both give the same object.
    """

    def __init__(
        self,
        vlm: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        sam2: SAM2Segmenter,
        depth_tokenizer: DepthCodec,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        image_processor: TileProcessor | None = None,
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.depth_spec: DepthCodecSpec = check_depth_codec(depth_tokenizer)
        self.token_ids: PerceptionTokenIds = perception_token_ids(tokenizer, self.codebook_size)
        base = self.base_model
        # the checkpoint's processor (tile size, mean/std), tiled up to model.max_tiles
        self.image_processor = (image_processor or TileProcessor.for_model(base.config)).with_max_tiles(
            model_cfg.max_tiles
        )
        d = int(base.config.text_config.hidden_size)
        self.hidden_size = d
        self.seg_projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, sam2.embed_dim))
        self.sam2 = sam2
        # a submodule: ``.to(device)`` moves it; frozen and kept in eval mode (see ``train``)
        self.depth_tokenizer = depth_tokenizer
        _freeze(depth_tokenizer)
        self.register_buffer("code_ids", self.token_ids.codes_tensor(), persistent=False)

    # ---------------------------------------------------------------- construction

    @classmethod
    def build(
        cls,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        depth_tokenizer: DepthCodec,
        tokenizer: PreTrainedTokenizerBase | None = None,
        base_model: InternVLForConditionalGeneration | None = None,
        seed: int = 0,
    ) -> PerceptioModel:
        """A fresh model for fine-tuning (SPEC §4).

        The tokenizer is ``tokenizer``, else loaded from ``model_cfg.tokenizer`` or ``model_cfg.base``
        (a tiny base needs one passed: see :func:`perceptio_core.model.internvl.train_tokenizer`). The base
        is ``base_model``, else ``model_cfg.base`` loaded, else a tiny InternVL built from
        ``model_cfg.tiny``. ``depth_tokenizer`` is the frozen depth codec (an ``nn.Module``
        :class:`~perceptio_core.depth.codec.DepthCodec`, e.g. the ``train_vqvae`` artifact through
        ``DepthTokenizer.from_pretrained``): its K and N are the model's. The K + 3 perception tokens are added and their rows (embeddings and LM
        head) set to the mean of the rows of the pre-existing vocabulary; then LoRA is applied and
        the SAM2 parts are built (loading ``model_cfg.sam2_checkpoint`` when set). ``seed`` seeds
        every fresh initialisation (tiny base, LoRA A matrices, SAM2 without checkpoint, [SEG]
        projection), without touching the global random state.
        """
        if tokenizer is None:
            source = model_cfg.tokenizer or model_cfg.base
            if source is None:
                raise ValueError("a tiny base (model.base unset) needs a tokenizer: pass one (train_tokenizer)")
            tokenizer = load_tokenizer(source)
        k = check_depth_codec(depth_tokenizer).codebook_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # every fresh initialisation below, LoRA's included
            if base_model is None:
                if model_cfg.base is not None:
                    base_model = load_internvl(model_cfg.base, model_cfg.dtype)
                else:
                    base_model = build_tiny_internvl(model_cfg.tiny, tokenizer, seed=None)
            reference_rows = min(len(tokenizer), base_model.get_input_embeddings().weight.shape[0])
            ids = add_perception_tokens(tokenizer, k)
            init_new_token_rows(base_model, len(tokenizer), ids.all, reference_rows)
            if model_cfg.gradient_checkpointing:
                enable_checkpointing(base_model)
            vlm = apply_lora(base_model, model_cfg, ids.all)
            sam2 = build_sam2(
                model_cfg.sam2_variant, model_cfg.sam2_checkpoint, model_cfg.freeze_sam2_image_encoder, seed=None
            )
            folders = [f for f in (model_cfg.tokenizer, model_cfg.base) if f is not None and Path(f).is_dir()]
            processor = TileProcessor.for_model(base_model.config, folders)
            model = cls(vlm, tokenizer, sam2, depth_tokenizer, model_cfg, loss_cfg, processor)
        n_train = sum(p.numel() for p in model.trainable_parameters().values())
        n_all = sum(p.numel() for p in model.parameters())
        log.info("Perceptio model: %d of %d parameters trainable (K = %d, N = %d)", n_train, n_all,
                 model.codebook_size, model.num_depth_tokens)
        return model

    # ---------------------------------------------------------------- accessors

    @property
    def codebook_size(self) -> int:
        """K, the depth codec's."""
        return self.depth_spec.codebook_size

    @property
    def num_depth_tokens(self) -> int:
        """N, the depth codec's."""
        return self.depth_spec.num_tokens

    @property
    def base_model(self) -> InternVLForConditionalGeneration:
        """The InternVL model inside the PEFT wrapper (LoRA layers injected in place)."""
        get = getattr(self.vlm, "get_base_model", None)
        return get() if get is not None else self.vlm

    def collator(self, max_length: int | None = None) -> PerceptioCollator:
        """The batch builder for this model (tokenizer, image sizes, SAM2 and VQ-VAE sizes)."""
        return PerceptioCollator(
            tokenizer=self.tokenizer,
            token_ids=self.token_ids,
            processor=self.image_processor,
            sam2_image_size=self.sam2.image_size,
            depth_size=self.depth_spec.map_size,
            max_length=max_length or self.model_cfg.max_length,
        )

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of everything fine-tuning updates (SPEC §4): LoRA, the new token rows,
        the [SEG] projection and the SAM2 mask decoder (and SAM2's image encoder if unfrozen)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> PerceptioModel:
        """Frozen parts (the depth tokenizer here, SAM2's encoders in ``SAM2Segmenter.train``) stay in
        eval mode."""
        super().train(mode)
        self.depth_tokenizer.eval()
        return self

    # ---------------------------------------------------------------- language model

    def lm_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_from: int | None = -1,
        position_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """One pass of InternVL (with LoRA) over ``input_ids`` [B, T].

        ``pixel_values`` [tiles, 3, S, S] (every image's tiles, in batch order) fill the
        ``<IMG_CONTEXT>`` places (prefill only; None when decoding with a cache).
        ``logits_from``: the LM head runs on ``hidden[:, logits_from:]``
        (-1: the last position; None: no logits); ``position_ids`` [B, T] for left-padded batches.
        """
        hidden, logits, cache = lm_pass(self.base_model, input_ids, attention_mask, pixel_values,
                                        past_key_values, use_cache, logits_from, position_ids)  # fmt: skip
        return LMOutput(hidden=hidden, logits=logits, past_key_values=cache)

    # ---------------------------------------------------------------- heads

    def seg_prompt(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[n, d] [SEG] hidden states -> [n, 1, C] SAM2 sparse prompt embeddings."""
        w = self.seg_projection[0].weight
        return self.seg_projection(seg_hidden.to(w.dtype))[:, None, :]

    def predict_mask_logits(
        self,
        seg_hidden: torch.Tensor,
        sam2_pixel_values: torch.Tensor,
        output_size: tuple[int, int] | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask logits [n, 1, H, W] from [SEG] states [n, d] and SAM2 inputs [m, 3, S2, S2]: state
        i prompts image ``image_index[i]`` (default: image i, m = n), each image encoded once;
        low resolution (S2 / 4) unless ``output_size`` is given (bilinear upsampling)."""
        features = self.sam2.encode_image(sam2_pixel_values.to(self.sam2.no_mem_embed.dtype))
        if image_index is not None:
            features = features.select(image_index)
        logits = self.sam2.decode_masks(features, self.seg_prompt(seg_hidden))
        return upsample_logits(logits, output_size) if output_size is not None else logits

    @torch.no_grad()
    def decode_depth(self, indices: torch.Tensor) -> torch.Tensor:
        """Depth code indices [n, N] -> maps [n, H, W] through the frozen VQ-VAE decoder."""
        return self.depth_tokenizer.decode(indices)

    def _seg_anchor(self) -> torch.Tensor:
        """An exact 0 touching every trainable SAM2/[SEG] parameter: a batch without masks still
        gives them (zero) gradients, so DDP needs no ``find_unused_parameters``."""
        params = [p for p in self.seg_projection.parameters()] + [
            p for p in self.sam2.parameters() if p.requires_grad
        ]
        return sum(p.reshape(-1)[0] for p in params) * 0.0

    # ---------------------------------------------------------------- training forward

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The composite loss of SPEC §3 on a collated batch.

        Returns ``{"loss", "llm", "seg_bce", "seg_dice", "marker", "token", "count", "rec"}``,
        scalars; ``loss`` = :func:`perceptio_core.model.losses.total_loss` (with gradient), the others
        detached. Terms a batch has no sample for are 0.
        """
        input_ids = batch["input_ids"]
        labels = batch["labels"]
        pixel_values = batch["pixel_values"]
        out = self.lm_forward(
            input_ids,
            attention_mask=batch["attention_mask"],
            pixel_values=pixel_values if pixel_values.shape[0] > 0 else None,  # all text-only: no images
            logits_from=None,
        )
        hidden = out.hidden  # [B, T, d]

        # LM head from the position predicting the first target token on (targets aligned).
        valid = labels != IGNORE  # [B, T]
        if bool(valid.any()):
            first = torch.where(valid.any(1), valid.float().argmax(1), labels.new_full((), labels.shape[1]))
            t0 = max(int(first.min()) - 1, 0)
        else:
            t0 = labels.shape[1] - 1
        logits = self.base_model.lm_head(hidden[:, t0:-1])  # [B, T - 1 - t0, V]
        targets = labels[:, t0 + 1 :]  # [B, T - 1 - t0]

        tid = self.token_ids
        terms = sequence_terms(logits, targets, tid.d_start, tid.d_end, self.code_ids, self.num_depth_tokens)
        starts, ends = span_bounds(targets, tid.d_start, tid.d_end)
        terms["rec"] = rec_loss(
            logits,
            starts,
            ends,
            self.code_ids,
            self.num_depth_tokens,
            self.depth_tokenizer,
            batch["depth_maps"],
            batch["has_depth_map"],
            tau=self.loss_cfg.rec_tau,
        )
        terms.update(self._seg_terms(hidden, batch))
        loss = total_loss(terms, self.loss_cfg)
        result = {"loss": loss}
        result.update({k: v.detach() for k, v in terms.items()})
        return result

    def seg_hidden_states(
        self, hidden: torch.Tensor, seg_positions: torch.Tensor, seg_batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The [SEG] states of a batch: ``hidden`` [B, T, d] at the pairs' ``seg_positions`` [S]
        (the input index of each [SEG] token itself) in rows ``seg_batch`` [S]. Returns
        (rows [S], states [S, d])."""
        return seg_batch, hidden[seg_batch, seg_positions]

    def _seg_terms(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``seg_bce`` and ``seg_dice`` over every (``[SEG]``, mask) pair of the batch: each pair's
        [SEG] state prompts SAM2 on its example's image; BCE is the mean over the pairs' pixels
        and Dice the mean over pairs (:func:`~perceptio_core.model.losses.mask_bce_loss`,
        :func:`~perceptio_core.model.losses.mask_dice_loss`), so every pair weighs the same. The
        SAM2 image encoder runs once per example that has pairs."""
        rows, states = self.seg_hidden_states(hidden, batch["seg_positions"], batch["seg_batch"])
        if rows.numel() == 0:
            zero = self._seg_anchor()
            return {"seg_bce": zero, "seg_dice": zero.clone()}
        gt = batch["masks"]  # [S, S2, S2]
        images, which = torch.unique(rows, return_inverse=True)  # examples with pairs; pair -> index
        logits = self.predict_mask_logits(states, batch["sam2_pixel_values"][images], tuple(gt.shape[-2:]),
                                          image_index=which)[:, 0]  # [S, S2, S2]
        return {"seg_bce": mask_bce_loss(logits, gt), "seg_dice": mask_dice_loss(logits, gt)}

    # ---------------------------------------------------------------- save / load

    def save_pretrained(self, out_dir: str | Path, *, self_contained: bool = False) -> Path:
        """Write the model to ``out_dir`` (layout in the module docstring). Returns the path.

        ``self_contained``: the folder needs nothing outside it (``perceptio export``,
        :mod:`perceptio_core.model.export`): the base is stored in ``base/`` whatever ``model.base``
        says, SAM2 whole in ``sam2.safetensors`` (frozen parts and trained decoder, even when a
        ``model.sam2_checkpoint`` was used), and ``model.base``, ``model.tokenizer`` and
        ``model.sam2_checkpoint`` are recorded unset in ``config.json`` (the paths it came from
        belong to the export's own record). A model whose LoRA is merged (``vlm`` is a plain
        InternVL, no PEFT wrapper: :func:`perceptio_core.model.export.merge_lora`) is saved without
        ``adapter/``, its merged base in ``base/``, and ``"merged": true``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        merged = not _is_peft(self.vlm)
        files = ["heads.safetensors", "tokenizer"]
        if not merged:
            self.vlm.save_pretrained(str(out / "adapter"), save_embedding_layers=False)
            files.append("adapter")
        save_file(self._heads_state(sam2=not self_contained), str(out / "heads.safetensors"))
        if self_contained:
            whole = {k: v.detach().contiguous().cpu() for k, v in self.sam2.state_dict().items()}
            save_file(whole, str(out / "sam2.safetensors"))
            files.append("sam2.safetensors")
        elif self.model_cfg.sam2_checkpoint is None:
            frozen = {
                k: v.detach().contiguous().cpu()
                for k, v in self.sam2.state_dict().items()
                if not k.startswith("sam_mask_decoder.")
                and not (k.startswith("image_encoder.") and not self.sam2.freeze_image_encoder)
            }
            save_file(frozen, str(out / "sam2_frozen.safetensors"))
            files.append("sam2_frozen.safetensors")
        if self_contained or merged or self.model_cfg.base is None:
            _plain_base(self.vlm).save_pretrained(str(out / "base"))
            files.append("base")
        self.tokenizer.save_pretrained(str(out / "tokenizer"))
        self.image_processor.save_pretrained(out / "tokenizer")  # the processor files, as "-hf" ships them
        if isinstance(self.depth_tokenizer, DepthTokenizer):  # another codec (a test stand-in) is not stored
            self.depth_tokenizer.save_pretrained(str(out / "depth_tokenizer"))
            files.append("depth_tokenizer")
        model_section = to_dict(self.model_cfg)
        if self_contained:
            model_section.update(base=None, tokenizer=None, sam2_checkpoint=None)
        tid = self.token_ids
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model_section,
            "loss": to_dict(self.loss_cfg),
            "depth_codec": self.depth_spec.to_dict(),
            "token_ids": {"seg": tid.seg, "d_start": tid.d_start, "d_end": tid.d_end, "codes": list(tid.codes)},
            "hidden_size": self.hidden_size,
            "sam2_embed_dim": self.sam2.embed_dim,
            "merged": merged,
            "files": sorted(files),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out

    def _heads_state(self, sam2: bool = True) -> dict[str, torch.Tensor]:
        """seg_projection.*, the trained SAM2 parts as ``sam2.*`` (with ``sam2``; left out when SAM2
        is stored whole) and token_rows.embed / token_rows.lm_head (the K + 3 rows as the model uses
        them), detached, contiguous, on the CPU."""
        state: dict[str, torch.Tensor] = {}
        for k, v in self.seg_projection.state_dict().items():
            state[f"seg_projection.{k}"] = v
        for k, v in self.sam2.state_dict().items() if sam2 else ():
            if k.startswith("sam_mask_decoder.") or (
                k.startswith("image_encoder.") and not self.sam2.freeze_image_encoder
            ):
                state[f"sam2.{k}"] = v
        embed, head = new_token_rows(self.base_model, self.token_ids.all)
        state["token_rows.embed"] = embed
        state["token_rows.lm_head"] = head
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: str | Path | InternVLForConditionalGeneration | None = None,
        depth_tokenizer: Any = None,
        sam2_checkpoint: str | Path | None = None,
        trainable: bool = False,
        verify: bool = True,
    ) -> PerceptioModel:
        """Load a model written by :meth:`save_pretrained`, or an export
        (:func:`perceptio_core.model.export.export_model`, merged or not).

        Args:
            path: the directory.
            base: the base InternVL (path, hub id or model) when it is not stored in ``path/base``;
                default: the ``model.base`` recorded in ``config.json``. A merged model carries its
                own (merged) base: giving one raises ``ValueError``.
            depth_tokenizer: the frozen depth codec; default: ``path/depth_tokenizer`` through
                ``DepthTokenizer.from_pretrained`` (a model trained with another codec stored none:
                then it must be given). Its K, grid and map size must be the ones recorded in
                ``config.json`` (``depth_codec``), else ``ValueError``.
            sam2_checkpoint: Meta's SAM2 checkpoint when the saved model used one and it has moved
                (unused when SAM2 is stored whole, ``sam2.safetensors``).
            trainable: keep LoRA / token rows / heads trainable (to continue fine-tuning). A merged
                model has no LoRA left to train: ``ValueError``.
            verify: for an export (``export.json`` beside ``config.json``), check first that every
                file is the one its manifest lists (sha256): a tampered, missing or extra file
                raises :class:`~perceptio_core.model.export.ExportError` naming it.

        A merged model is loaded as its plain base (no PEFT wrapper), frozen, in eval mode.
        """
        root = Path(path)
        meta = json.loads((root / "config.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{root}: not a Perceptio model (format {meta.get('format')!r})")
        if verify:
            from perceptio_core.model.export import EXPORT_JSON, verify_export

            if (root / EXPORT_JSON).is_file():
                verify_export(root)
        merged = bool(meta.get("merged", False))
        if merged and trainable:
            raise ValueError(f"{root}: LoRA is merged into the base weights (an inference export): it cannot be "
                             f"trained further; fine-tune from the run's model folder or an unmerged export")
        if merged and base is not None:
            raise ValueError(f"{root}: a merged model carries its own merged base; do not pass base=")
        # checked like a profile section: an unknown key or a wrong type raises ConfigError
        model_cfg: ModelConfig = _build(ModelConfig, meta["model"], "model")
        loss_cfg: LossConfig = _build(LossConfig, meta["loss"], "loss")
        sam2_whole = "sam2.safetensors" in meta["files"]
        if sam2_checkpoint is not None and not sam2_whole:
            model_cfg.sam2_checkpoint = str(sam2_checkpoint)
        saved_codec = DepthCodecSpec.from_dict(meta["depth_codec"], source=f"{root / 'config.json'} (depth_codec)")
        if depth_tokenizer is None:
            if "depth_tokenizer" not in meta["files"]:
                raise ValueError(f"{root}: saved without its depth tokenizer (trained with a codec that is not "
                                 f"a DepthTokenizer); pass depth_tokenizer= a codec with K = "
                                 f"{saved_codec.codebook_size}, N = {saved_codec.num_tokens}")
            depth_tokenizer = DepthTokenizer.from_pretrained(root / "depth_tokenizer")
        saved_codec.check_matches(check_depth_codec(depth_tokenizer))
        tokenizer = load_tokenizer(root / "tokenizer")
        if isinstance(base, nn.Module):
            base_model = base
        elif base is not None:
            base_model = load_internvl(base, model_cfg.dtype)
        elif (root / "base").is_dir():
            base_model = load_internvl(root / "base", model_cfg.dtype)
        elif merged:
            raise ValueError(f"{root}: a merged model without its base/ folder")
        elif model_cfg.base is not None:
            base_model = load_internvl(model_cfg.base, model_cfg.dtype)
        else:
            raise ValueError(f"{root}: no base stored and none recorded or given")
        ids = perception_token_ids(tokenizer, saved_codec.codebook_size)
        heads = load_file(str(root / "heads.safetensors"))
        rows = max(len(tokenizer), base_model.get_input_embeddings().weight.shape[0])
        if base_model.get_input_embeddings().weight.shape[0] < rows:
            base_model.resize_token_embeddings(rows, mean_resizing=False)
        # a merged base holds these rows already (the same values): written for the unmerged case
        set_token_rows(base_model, ids.all, heads["token_rows.embed"], heads["token_rows.lm_head"])

        if merged:
            vlm = base_model
        else:
            from peft import PeftModel

            vlm = PeftModel.from_pretrained(base_model, str(root / "adapter"), is_trainable=trainable)
        sam2 = build_sam2(model_cfg.sam2_variant, None, model_cfg.freeze_sam2_image_encoder, seed=None)
        if sam2_whole:
            _load_exact(sam2, load_file(str(root / "sam2.safetensors")), strict=True)
        elif model_cfg.sam2_checkpoint is not None:
            from perceptio_core.model.sam2_decoder import load_sam2_checkpoint

            load_sam2_checkpoint(sam2, model_cfg.sam2_checkpoint)
        else:
            _load_exact(sam2, load_file(str(root / "sam2_frozen.safetensors")), strict=False)
        processor = TileProcessor.for_model(base_model.config, [root / "tokenizer"])
        model = cls(vlm, tokenizer, sam2, depth_tokenizer, model_cfg, loss_cfg, processor)
        _load_exact(model, {k: v for k, v in heads.items() if not k.startswith("token_rows.")}, strict=False)
        if not trainable:
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
        return model


def _is_peft(vlm: nn.Module) -> bool:
    """True when ``vlm`` is PEFT-wrapped (LoRA not merged)."""
    return hasattr(vlm, "get_base_model")


# --------------------------------------------------------------------------------------------
# Token rows and plain base
# --------------------------------------------------------------------------------------------


def enable_checkpointing(model: InternVLForConditionalGeneration) -> None:
    """Activation (gradient) checkpointing on the decoder layers, non-reentrant (LoRA-friendly:
    no need for inputs that require grad). ``activation_checkpointing_enable`` where transformers
    has it, else the older ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _plain_base(vlm: nn.Module) -> InternVLForConditionalGeneration:
    """The base InternVL without any PEFT layer (LoRA and token adapters left out: the base's own
    weights, as before fine-tuning), sharing the live tensors (built on the meta device)."""
    base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
    clean: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or "trainable_tokens_" in key or ".original_module." in key:
            continue
        name = key.replace(".base_layer.", ".").replace(".token_adapter.", ".")
        clean[name] = value
    with torch.device("meta"):  # no second copy of the weights: the live tensors are assigned
        plain = InternVLForConditionalGeneration(base.config)
    result = plain.load_state_dict(clean, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"base state does not fit: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return plain


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> list[str]:
    """``load_state_dict`` that raises on unexpected keys; with ``strict`` also on missing ones.
    Returns the missing keys."""
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys or (strict and result.missing_keys):
        raise ValueError(
            f"state does not fit {type(module).__name__}: unexpected {result.unexpected_keys[:5]}, "
            f"missing {result.missing_keys[:5] if strict else []}"
        )
    return list(result.missing_keys)


__all__ = [
    "LMOutput",
    "PerceptioModel",
    "check_depth_codec",
]
