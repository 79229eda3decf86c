"""SAM2 for the ``[SEG]`` path (SPEC §1): image encoder, prompt encoder and mask decoder, no hydra.

The ``[SEG]`` hidden state, projected to the SAM2 prompt dimension, is appended to the (empty, no
points or boxes) sparse prompt embeddings; the mask decoder reads the frozen image encoder's
features of the image and returns one mask (``multimask_output=False``) as low-resolution logits,
which the caller upsamples to the size of the ground-truth mask or of the image.

Built from sam2's own modules (``Hiera`` + ``FpnNeck`` in ``ImageEncoder``, ``PromptEncoder``,
``MaskDecoder`` with a ``TwoWayTransformer``), exactly as ``SAM2Base`` wires them for a single image
(``SAM2ImagePredictor.set_image`` / ``_predict``):

* the encoder's FPN gives three levels (``scalp=1`` drops the lowest resolution): strides 4, 8 and
  16. The stride-16 level plus ``no_mem_embed`` (``directly_add_no_mem_embed``) is the image
  embedding; levels 0 and 1 go through the mask decoder's ``conv_s0`` / ``conv_s1`` and enter its
  upscaling path as high-resolution features (``use_high_res_features_in_sam: true`` in every
  sam2.1 Hiera config). ``conv_s0``/``conv_s1`` belong to the mask decoder, so they are applied in
  :meth:`SAM2Segmenter.decode_masks` (inside the trainable graph), not in the frozen encoder.
* the dense prompt is ``no_mask_embed`` broadcast; the positional encoding is the prompt encoder's
  ``get_dense_pe()``.
* ``dynamic_multimask_via_stability`` (the official predictor's post-processing fallback to the
  multimask tokens) is off: only the single-mask token is fine-tuned here.

Module attribute names equal ``SAM2Base``'s (``image_encoder``, ``sam_prompt_encoder``,
``sam_mask_decoder``, ``no_mem_embed``), so Meta's released checkpoints (``{"model": state_dict}``)
load by keeping the keys under those names and dropping the video parts (memory attention, memory
encoder, object pointers, ...): :func:`load_sam2_checkpoint`.

Preprocessing (:func:`sam2_pixel_values`) mirrors ``SAM2Transforms`` without torchvision: square
resize to ``image_size`` (1024 for the released models), /255, ImageNet mean/std.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from torch import nn

from perceptio_core.model.internvl import normalize_image, to_pil_rgb
from perceptio_core.model.processor import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

# The parts of a SAM2Base state dict that the [SEG] path uses (key prefixes in Meta's checkpoints).
SAM2_PARTS = ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder", "no_mem_embed")

_DECODER_RELEASED = {
    "transformer_depth": 2,
    "transformer_mlp_dim": 2048,
    "transformer_heads": 8,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "use_high_res_features": True,
    "iou_prediction_use_sigmoid": True,
    "pred_obj_scores": True,
    "pred_obj_scores_mlp": True,
    "use_multimask_token_for_obj_ptr": True,
}


def _released(trunk: dict[str, Any], channels: list[int]) -> dict[str, Any]:
    return {
        "image_size": 1024,
        "backbone_stride": 16,
        "scalp": 1,
        "mask_in_chans": 16,
        "trunk": trunk,
        "neck": {
            "d_model": 256,
            "backbone_channel_list": channels,
            "fpn_top_down_levels": [2, 3],
            "fpn_interp_model": "nearest",
        },
        "decoder": dict(_DECODER_RELEASED),
    }


# The sam2.1 Hiera configs (sam2/configs/sam2.1/*.yaml, the parts we build) as plain dicts; Hiera
# arguments not listed take Hiera's defaults, as in the YAML files.
SAM2_CONFIGS: dict[str, dict[str, Any]] = {
    "sam2.1_hiera_tiny": _released(
        {
            "embed_dim": 96,
            "num_heads": 1,
            "stages": [1, 2, 7, 2],
            "global_att_blocks": [5, 7, 9],
            "window_pos_embed_bkg_spatial_size": [7, 7],
        },
        [768, 384, 192, 96],
    ),
    "sam2.1_hiera_small": _released(
        {
            "embed_dim": 96,
            "num_heads": 1,
            "stages": [1, 2, 11, 2],
            "global_att_blocks": [7, 10, 13],
            "window_pos_embed_bkg_spatial_size": [7, 7],
        },
        [768, 384, 192, 96],
    ),
    "sam2.1_hiera_base_plus": _released({"embed_dim": 112, "num_heads": 2}, [896, 448, 224, 112]),
    "sam2.1_hiera_large": _released(
        {
            "embed_dim": 144,
            "num_heads": 2,
            "stages": [2, 6, 36, 4],
            "global_att_blocks": [23, 33, 43],
            "window_pos_embed_bkg_spatial_size": [7, 7],
            "window_spec": [8, 4, 16, 8],
        },
        [1152, 576, 288, 144],
    ),
    # The tests and the smoke profile: same wiring, 64 px input, 32-d prompts, 5 blocks.
    "tiny-test": {
        "image_size": 64,
        "backbone_stride": 16,
        "scalp": 1,
        "mask_in_chans": 8,
        "trunk": {
            "embed_dim": 8,
            "num_heads": 1,
            "stages": [1, 1, 2, 1],  # q-pool blocks (first of a stage) must be windowed
            "global_att_blocks": [3],
            "window_pos_embed_bkg_spatial_size": [4, 4],
            "window_spec": [4, 4, 2, 2],
        },
        "neck": {
            "d_model": 32,
            "backbone_channel_list": [64, 32, 16, 8],
            "fpn_top_down_levels": [2, 3],
            "fpn_interp_model": "nearest",
        },
        "decoder": {
            "transformer_depth": 2,
            "transformer_mlp_dim": 64,
            "transformer_heads": 2,
            "iou_head_depth": 3,
            "iou_head_hidden_dim": 32,
            "use_high_res_features": True,
            "iou_prediction_use_sigmoid": True,
            "pred_obj_scores": True,
            "pred_obj_scores_mlp": True,
            "use_multimask_token_for_obj_ptr": True,
        },
    },
    # The offline default profile: 128 px input (32 x 32 low-resolution masks), 64-d prompts,
    # 7 Hiera blocks; pre-trained by the fit_sam2 stage
    # (perceptio_core.training.sam2_fit).
    "tiny-128": {
        "image_size": 128,
        "backbone_stride": 16,
        "scalp": 1,
        "mask_in_chans": 16,
        "trunk": {
            "embed_dim": 16,
            "num_heads": 1,
            "stages": [1, 2, 3, 1],
            "global_att_blocks": [4, 5],  # stage 3 (8 x 8 tokens); q-pool blocks 1, 3, 6 windowed
            "window_pos_embed_bkg_spatial_size": [8, 8],
            "window_spec": [8, 4, 8, 4],
        },
        "neck": {
            "d_model": 64,
            "backbone_channel_list": [128, 64, 32, 16],
            "fpn_top_down_levels": [2, 3],
            "fpn_interp_model": "nearest",
        },
        "decoder": {
            "transformer_depth": 2,
            "transformer_mlp_dim": 128,
            "transformer_heads": 4,
            "iou_head_depth": 3,
            "iou_head_hidden_dim": 64,
            # as the released SAM2: the stride-4/8 features feed the upscaling path. Trained from
            # scratch with them, a small SAM2 ignores its prompts; fit_sam2 first trains with them
            # off (zero projections), then on (perceptio_core.training.sam2_fit)
            "use_high_res_features": True,
            "iou_prediction_use_sigmoid": True,
            "pred_obj_scores": True,
            "pred_obj_scores_mlp": True,
            "use_multimask_token_for_obj_ptr": True,
        },
    },
}


def sam2_config(variant: str) -> dict[str, Any]:
    """A deep copy of ``SAM2_CONFIGS[variant]``; raises ``KeyError`` naming the known variants."""
    if variant not in SAM2_CONFIGS:
        raise KeyError(f"unknown SAM2 variant {variant!r} (known: {', '.join(SAM2_CONFIGS)})")
    return copy.deepcopy(SAM2_CONFIGS[variant])


@dataclass
class SAM2Features:
    """The frozen image encoder's output for a batch of images.

    image_embed: [B, C, h, w], h = w = image_size / 16, ``no_mem_embed`` added.
    high_res: raw FPN levels 0 and 1, [B, C, 4h, 4w] and [B, C, 2h, 2w] (before the mask decoder's
        ``conv_s0`` / ``conv_s1``); empty when the decoder does not use high-resolution features.
    """

    image_embed: torch.Tensor
    high_res: tuple[torch.Tensor, ...]

    def select(self, index: torch.Tensor) -> SAM2Features:
        """The features of the images ``index`` [n] (a LongTensor of batch rows)."""
        return SAM2Features(self.image_embed[index], tuple(h[index] for h in self.high_res))


class SAM2Segmenter(nn.Module):
    """SAM2 image encoder + prompt encoder + mask decoder (see the module docstring).

    Args:
        config: one of :data:`SAM2_CONFIGS` (or a dict of the same shape).
        freeze_image_encoder: freeze the image encoder (SPEC §4) and run it without gradients.

    The prompt encoder and ``no_mem_embed`` are always frozen (only ``no_mask_embed`` and the dense
    positional encoding of the prompt encoder are used); the mask decoder is trainable except its
    IoU and object-score heads, whose outputs the single-mask path does not use.
    """

    def __init__(self, config: dict[str, Any], freeze_image_encoder: bool = True) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)
        trunk = Hiera(**_tuples(config["trunk"]))
        neck_cfg = config["neck"]
        d_model = int(neck_cfg["d_model"])
        neck = FpnNeck(
            position_encoding=PositionEmbeddingSine(
                num_pos_feats=d_model, normalize=True, scale=None, temperature=10000, warmup_cache=False
            ),
            d_model=d_model,
            backbone_channel_list=list(neck_cfg["backbone_channel_list"]),
            fpn_top_down_levels=list(neck_cfg["fpn_top_down_levels"]),
            fpn_interp_model=neck_cfg["fpn_interp_model"],
        )
        self.image_encoder = ImageEncoder(trunk=trunk, neck=neck, scalp=int(config["scalp"]))
        self.image_size = int(config["image_size"])
        self.embed_dim = d_model
        self.embedding_size = self.image_size // int(config["backbone_stride"])
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=d_model,
            image_embedding_size=(self.embedding_size, self.embedding_size),
            input_image_size=(self.image_size, self.image_size),
            mask_in_chans=int(config["mask_in_chans"]),
        )
        dec = config["decoder"]
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=int(dec["transformer_depth"]),
                embedding_dim=d_model,
                mlp_dim=int(dec["transformer_mlp_dim"]),
                num_heads=int(dec["transformer_heads"]),
            ),
            transformer_dim=d_model,
            iou_head_depth=int(dec["iou_head_depth"]),
            iou_head_hidden_dim=int(dec["iou_head_hidden_dim"]),
            use_high_res_features=bool(dec["use_high_res_features"]),
            iou_prediction_use_sigmoid=bool(dec["iou_prediction_use_sigmoid"]),
            pred_obj_scores=bool(dec["pred_obj_scores"]),
            pred_obj_scores_mlp=bool(dec["pred_obj_scores_mlp"]),
            use_multimask_token_for_obj_ptr=bool(dec["use_multimask_token_for_obj_ptr"]),
            dynamic_multimask_via_stability=False,
        )
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        self.freeze_image_encoder = freeze_image_encoder
        # Frozen: the prompt encoder, no_mem_embed, and the decoder heads the single-mask [SEG] path
        # never reads (IoU and object-score predictions): they would get no gradient at all.
        frozen = [
            self.sam_prompt_encoder,
            self.no_mem_embed,
            self.sam_mask_decoder.iou_prediction_head,
        ]
        if self.sam_mask_decoder.pred_obj_scores:
            frozen.append(self.sam_mask_decoder.pred_obj_score_head)
        if freeze_image_encoder:
            frozen.append(self.image_encoder)
        for part in frozen:
            for p in part.parameters() if isinstance(part, nn.Module) else [part]:
                p.requires_grad_(False)

    @property
    def uses_high_res(self) -> bool:
        return bool(self.sam_mask_decoder.use_high_res_features)

    def train(self, mode: bool = True) -> SAM2Segmenter:
        """Frozen parts stay in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.sam_prompt_encoder.eval()
        if self.freeze_image_encoder:
            self.image_encoder.eval()
        return self

    def encode_image(self, pixel_values: torch.Tensor) -> SAM2Features:
        """Image encoder features of ``pixel_values`` [B, 3, S, S] (S = ``image_size``; see
        :func:`sam2_pixel_values`). Without gradients when the encoder is frozen."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"SAM2 expects {self.image_size}x{self.image_size} input, got {tuple(pixel_values.shape[-2:])}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_image_encoder):
            out = self.image_encoder(pixel_values.to(self.no_mem_embed.dtype))
        fpn = out["backbone_fpn"]  # strides 4, 8, 16: [B, C, 4h, 4w], [B, C, 2h, 2w], [B, C, h, w]
        image_embed = fpn[-1] + self.no_mem_embed.view(1, -1, 1, 1)
        high_res = (fpn[0], fpn[1]) if self.uses_high_res else ()
        return SAM2Features(image_embed=image_embed, high_res=high_res)

    def decode_masks(self, features: SAM2Features, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """One mask per image from sparse prompts.

        Args:
            features: :meth:`encode_image` output for B images.
            prompt_embeddings: [B, n, C] sparse prompt embeddings (the projected ``[SEG]`` states;
                n = 1 for Perceptio), appended to the empty point/box prompts.

        Returns:
            low-resolution mask logits [B, 1, 4h, 4w] (256 x 256 for the released models).
        """
        b = prompt_embeddings.shape[0]
        image_embed = features.image_embed
        if image_embed.shape[0] != b:
            raise ValueError(f"{image_embed.shape[0]} images but {b} prompts")
        dtype = self.no_mem_embed.dtype
        sparse = prompt_embeddings.to(dtype)  # [B, n, C]: no points, no boxes
        dense = self.sam_prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            b, -1, self.embedding_size, self.embedding_size
        )
        return self.run_mask_decoder(features, sparse, dense)[0]  # [B, 1, 4h, 4w]

    def run_mask_decoder(
        self, features: SAM2Features, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder, single-mask output, on encoded images and prompt embeddings (sparse
        [B, n, C], dense [B, C, h, w]) as SAM2Base feeds it: one image per prompt set, the
        high-resolution levels through ``conv_s0`` / ``conv_s1``. Returns low-resolution mask logits
        [B, 1, 4h, 4w] and the IoU prediction [B, 1]."""
        high_res = None
        if self.uses_high_res:
            dec = self.sam_mask_decoder
            high_res = [dec.conv_s0(features.high_res[0]), dec.conv_s1(features.high_res[1])]
        masks, iou, _tokens, _obj = self.sam_mask_decoder(
            image_embeddings=features.image_embed,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=False,
            high_res_features=high_res,
        )
        return masks, iou

    def forward(
        self,
        pixel_values: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Mask logits [B, 1, H, W] for images [B, 3, S, S] and prompts [B, n, C]; upsampled
        (bilinear) to ``output_size`` when given, else the low-resolution [B, 1, 4h, 4w]."""
        logits = self.decode_masks(self.encode_image(pixel_values), prompt_embeddings)
        return upsample_logits(logits, output_size) if output_size is not None else logits


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of mask logits [B, 1, h, w] to [B, 1, *size] (as SAM2 post-processing)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def build_sam2(
    variant: str = "tiny-test",
    checkpoint: str | Path | None = None,
    freeze_image_encoder: bool = True,
    seed: int | None = 0,
) -> SAM2Segmenter:
    """A :class:`SAM2Segmenter` of ``variant`` (see :data:`SAM2_CONFIGS`); with ``checkpoint``,
    Meta's weights loaded through :func:`load_sam2_checkpoint`, else a seeded random init."""
    config = sam2_config(variant)
    if seed is None:
        model = SAM2Segmenter(config, freeze_image_encoder)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SAM2Segmenter(config, freeze_image_encoder)
    if checkpoint is not None:
        load_sam2_checkpoint(model, checkpoint)
    return model


def sam2_state_from_meta(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a SAM2Base state dict (Meta's key names) that :class:`SAM2Segmenter` has:
    keys under ``image_encoder.``, ``sam_prompt_encoder.``, ``sam_mask_decoder.`` and
    ``no_mem_embed``. Names are kept as they are: the module mirrors SAM2Base's attribute names."""
    return {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in SAM2_PARTS}


def load_sam2_checkpoint(model: SAM2Segmenter, path: str | Path) -> dict[str, int]:
    """Load Meta's released checkpoint ``{"model": state_dict}`` (``torch.load`` with
    ``weights_only=True``) into ``model``; strict on the kept parts, so a variant mismatch raises.

    Returns counts: ``{"loaded": n, "dropped": m}`` (m = video-only keys of SAM2Base).
    """
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    state = blob["model"] if isinstance(blob, dict) and "model" in blob else blob
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a SAM2 checkpoint (expected a state dict under 'model')")
    kept = sam2_state_from_meta(state)
    result = model.load_state_dict(kept, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: SAM2 checkpoint does not fit {model.config.get('trunk')}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    counts = {"loaded": len(kept), "dropped": len(state) - len(kept)}
    log.info("loaded SAM2 checkpoint %s: %s", path, counts)
    return counts


def sam2_pixel_values(image: Image.Image | bytes | np.ndarray, size: int) -> torch.Tensor:
    """SAM2 preprocessing of one image: bilinear square resize to ``size``, /255, ImageNet
    mean/std (``SAM2Transforms``). Returns [3, size, size] float32."""
    return normalize_image(to_pil_rgb(image), size, IMAGENET_MEAN, IMAGENET_STD, Image.Resampling.BILINEAR)


__all__ = [
    "SAM2_CONFIGS",
    "SAM2_PARTS",
    "SAM2Features",
    "SAM2Segmenter",
    "build_sam2",
    "load_sam2_checkpoint",
    "sam2_config",
    "sam2_pixel_values",
    "sam2_state_from_meta",
    "upsample_logits",
]
