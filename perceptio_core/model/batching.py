"""Examples -> padded training batches for the Perceptio model (SPEC §1 sequence, §3 masking).

The sequence of one example is

    prompt part: [chat template] <img> <IMG_CONTEXT> x (L x tiles) </img> \\n prompt [assistant turn]
    target part: target text (``[SEG]<d_start><d_i>...<d_end> answer``) + turn end

``labels`` copy ``input_ids`` on the target part and are -100 on the prompt part (image tokens
included) and on padding, so L_llm is the teacher-forced NLL of the target only (SPEC §3).
Sequences are right-padded; a sequence longer than ``max_length`` loses the end of its target (the
prompt, image tokens included, is never cut). The target ends with the chat template's turn-end
token (``<|im_end|>`` for InternVL; :func:`perceptio_core.model.internvl.turn_end_id`), the token
generation stops on.

The image goes through the checkpoint's processor (:class:`perceptio_core.model.processor.TileProcessor`):
1 to ``max_tiles`` aspect-matched tiles plus a thumbnail, L context tokens per tile, so the number
of ``<IMG_CONTEXT>`` tokens follows the image's aspect ratio. The prompt part uses the tokenizer's
chat template when it has one (the released InternVL tokenizers and the tiny one do), with the
expanded image string in front of the user text; without one it is the plain layout above.
:func:`encode_prompt` is shared with generation, so training and inference see the same prompt
tokens.

A batch (``dict`` of tensors) is:

    input_ids        [B, T] long      attention_mask   [B, T] long (1 = token, 0 = pad)
    labels           [B, T] long      (-100 on image, prompt and padding)
    pixel_values     [P, 3, S, S]     the InternVL tiles of every example, in example order
                                      (P = sum of num_tiles; S = vision image_size), ImageNet-normalised
    num_tiles        [B] long         tiles of each example
    sam2_pixel_values[B, 3, S2, S2]   SAM2 input (S2 = SAM2 image_size); zeros where no mask
    masks            [B, S2, S2]      ground-truth mask resized (nearest) to the SAM2 frame, 0/1
    has_mask         [B] bool
    depth_maps       [B, D, D]        teacher map resized (bilinear) to the VQ-VAE input size D
    has_depth_map    [B] bool
    seg_positions    [B] long         input index of the first [SEG] of the target, -1 if none
    d_start_positions[B] long         input index of the first <d_start> of the target, -1 if none
    d_end_positions  [B] long         input index of the first <d_end> after it, -1 if none

:func:`select_examples` takes a sub-batch (rows and their tiles) out of a batch.

SAM2 sees the image squashed to a square (as ``SAM2Transforms`` does), so the mask is resized the
same way and the loss is computed in that frame; at inference the predicted logits are resized back
to the image's own size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from perceptio_core.data.masks import decode_mask, resize_nearest
from perceptio_core.model.internvl import PerceptionTokenIds, image_tokens, to_pil_rgb, turn_end_id
from perceptio_core.model.losses import IGNORE
from perceptio_core.model.processor import TileProcessor
from perceptio_core.model.sam2_decoder import sam2_pixel_values


@dataclass
class TrainExample:
    """One example as the collator takes it.

    image: PIL image, encoded bytes (JPEG/PNG/WebP) or an [H, W, 3] uint8 array.
    prompt: the user text (no image placeholder).
    target: the full target text, perception block first (``perception_format.format_target``).
    mask: [H, W] uint8/bool ground-truth mask at the image's size, or None.
    depth_tokens: the N code indices of the image (informational; the target text carries them).
    depth_map: [h, w] float teacher depth map (min-max normalised, larger = nearer), or None.
    """

    image: Any
    prompt: str
    target: str
    mask: np.ndarray | None = None
    depth_tokens: list[int] | None = None
    depth_map: np.ndarray | None = None


def example_from_sample(sample: Any, depth_map: np.ndarray | None = None) -> TrainExample:
    """A :class:`perceptio_core.curation.sample.Sample` (mask as COCO RLE) -> :class:`TrainExample`, with
    the image's teacher map (looked up by the caller from ``sample.image_digest``) when given."""
    mask = decode_mask(sample.mask_rle).astype(np.uint8) if sample.mask_rle is not None else None
    return TrainExample(
        image=sample.image,
        prompt=sample.prompt,
        target=sample.target,
        mask=mask,
        depth_tokens=list(sample.depth_tokens) if sample.depth_tokens is not None else None,
        depth_map=depth_map,
    )


def image_placeholder(tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> str:
    """``<img>`` + ``<IMG_CONTEXT>`` x ``num_image_tokens`` + ``</img>`` in the tokenizer's spelling."""
    start, context, end = image_tokens(tokenizer)
    return start + context * num_image_tokens + end


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, num_image_tokens: int) -> str:
    """The prompt part as text (see the module docstring): chat template when the tokenizer has
    one (user turn = image string + newline + prompt, generation prompt added), else plain."""
    content = image_placeholder(tokenizer, num_image_tokens) + "\n" + prompt.strip()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content + "\n"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, num_image_tokens: int) -> list[int]:
    """Token ids of the prompt part; checks that exactly ``num_image_tokens`` context tokens came
    out (``TileProcessor.num_image_tokens`` of the image)."""
    text = prompt_text(tokenizer, prompt, num_image_tokens)
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
    _, context, _ = image_tokens(tokenizer)
    ctx_id = tokenizer.convert_tokens_to_ids(context)
    n = sum(1 for i in ids if i == ctx_id)
    if n != num_image_tokens:
        raise ValueError(f"prompt has {n} image context tokens, expected {num_image_tokens}")
    return list(ids)


def encode_target(tokenizer: PreTrainedTokenizerBase, target: str, end_id: int | None = None) -> list[int]:
    """Token ids of the target text + the turn end (``end_id``; default
    :func:`~perceptio_core.model.internvl.turn_end_id` of the tokenizer)."""
    ids = list(tokenizer(target, add_special_tokens=False).input_ids)
    ids.append(int(turn_end_id(tokenizer) if end_id is None else end_id))
    return ids


def encode_image(processor: TileProcessor, image: Any) -> tuple[Any, torch.Tensor]:
    """``(RGB PIL image, its tiles [n, 3, S, S])``: the image decoded once, for InternVL and SAM2."""
    pil = to_pil_rgb(image)
    return pil, processor(pil)


def select_examples(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The examples ``rows`` of a collated batch: every per-example tensor sliced, and
    ``pixel_values`` cut to those examples' tiles (by ``num_tiles``)."""
    tiles = batch["num_tiles"]
    idx = range(len(tiles))[rows]
    if idx.step != 1:
        raise ValueError("select_examples takes a contiguous slice")
    bounds = torch.cat([tiles.new_zeros(1), tiles.cumsum(0)])
    lo, hi = (int(bounds[idx.start]), int(bounds[idx.stop])) if len(idx) else (0, 0)
    return {k: (v[lo:hi] if k == "pixel_values" else v[rows]) for k, v in batch.items()}


def _first(ids: Sequence[int], token: int, start: int = 0) -> int:
    for i in range(start, len(ids)):
        if ids[i] == token:
            return i
    return -1


def resize_map(depth: np.ndarray, size: int) -> torch.Tensor:
    """Teacher map [h, w] -> float32 tensor [size, size] (bilinear, align_corners False)."""
    t = torch.as_tensor(np.asarray(depth, dtype=np.float32))
    if t.ndim != 2:
        raise ValueError(f"depth map must be 2-D, got shape {tuple(t.shape)}")
    if tuple(t.shape) == (size, size):
        return t
    return F.interpolate(t[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]


class PerceptioCollator:
    """Callable ``collate(examples) -> batch`` (see the module docstring for the batch layout).

    Args:
        tokenizer: the extended tokenizer (perception tokens added).
        token_ids: ids of the perception tokens in ``tokenizer``.
        processor: the checkpoint's image processor (tiles, tokens per tile).
        sam2_image_size: SAM2 input side S2; depth_size: VQ-VAE input side D.
        max_length: tokens per sequence at most.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        token_ids: PerceptionTokenIds,
        processor: TileProcessor,
        sam2_image_size: int,
        depth_size: int,
        max_length: int = 8192,
    ) -> None:
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.processor = processor
        self.sam2_image_size = sam2_image_size
        self.depth_size = depth_size
        self.max_length = max_length
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token")
        self.pad_id = int(tokenizer.pad_token_id)
        self.end_id = turn_end_id(tokenizer)

    def encode(self, example: TrainExample, num_tiles: int) -> tuple[list[int], list[int], int]:
        """(input ids, labels, index where the target starts) of one example whose image is
        ``num_tiles`` tiles, cut to max_length."""
        prompt_ids = encode_prompt(self.tokenizer, example.prompt, self.processor.tokens_per_tile * num_tiles)
        target_ids = encode_target(self.tokenizer, example.target, self.end_id)
        if len(prompt_ids) >= self.max_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_length {self.max_length}")
        ids = (prompt_ids + target_ids)[: self.max_length]
        labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
        return ids, labels, len(prompt_ids)

    def __call__(self, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        images = [encode_image(self.processor, e.image) for e in examples]
        encoded = [self.encode(e, len(tiles)) for e, (_, tiles) in zip(examples, images)]
        b = len(examples)
        t = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        seg = torch.full((b,), -1, dtype=torch.long)
        d_start = torch.full((b,), -1, dtype=torch.long)
        d_end = torch.full((b,), -1, dtype=torch.long)
        tid = self.token_ids
        for i, (ids, lab, target_from) in enumerate(encoded):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(lab, dtype=torch.long)
            seg[i] = _first(ids, tid.seg, target_from)
            d_start[i] = _first(ids, tid.d_start, target_from)
            if d_start[i] >= 0:
                d_end[i] = _first(ids, tid.d_end, int(d_start[i]) + 1)

        s2 = self.sam2_image_size
        pixel_values = torch.cat([tiles for _, tiles in images])
        num_tiles = torch.tensor([len(tiles) for _, tiles in images], dtype=torch.long)
        sam2_pixels = torch.zeros((b, 3, s2, s2), dtype=torch.float32)
        masks = torch.zeros((b, s2, s2), dtype=torch.float32)
        has_mask = torch.zeros((b,), dtype=torch.bool)
        depth_maps = torch.zeros((b, self.depth_size, self.depth_size), dtype=torch.float32)
        has_depth = torch.zeros((b,), dtype=torch.bool)
        for i, (e, (image, _)) in enumerate(zip(examples, images)):
            if e.mask is not None:
                m = np.asarray(e.mask)
                if m.shape[:2] != (image.height, image.width):
                    raise ValueError(
                        f"mask {m.shape[:2]} does not match image {(image.height, image.width)}"
                    )
                sam2_pixels[i] = sam2_pixel_values(image, s2)
                masks[i] = torch.from_numpy(resize_nearest((m > 0).astype(np.float32), s2, s2))
                has_mask[i] = True
            if e.depth_map is not None:
                depth_maps[i] = resize_map(e.depth_map, self.depth_size)
                has_depth[i] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "num_tiles": num_tiles,
            "sam2_pixel_values": sam2_pixels,
            "masks": masks,
            "has_mask": has_mask,
            "depth_maps": depth_maps,
            "has_depth_map": has_depth,
            "seg_positions": seg,
            "d_start_positions": d_start,
            "d_end_positions": d_end,
        }


__all__ = [
    "PerceptioCollator",
    "TrainExample",
    "encode_image",
    "encode_prompt",
    "encode_target",
    "example_from_sample",
    "image_placeholder",
    "prompt_text",
    "resize_map",
    "select_examples",
]
