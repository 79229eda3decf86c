"""Examples -> padded training batches for the Perceptio model (SPEC §1 sequence, §3 masking).

The sequence of one example is a conversation of one or more rounds (SPEC §5: a REFER image's
expressions, a LLaVA conversation), rendered by the tokenizer's chat template:

    round 1 user:      [template] <img> <IMG_CONTEXT> x (L x tiles) </img> \\n prompt [assistant turn]
    round 1 assistant: target (``[SEG]<d_start><d_i>...<d_end> answer``) + turn end
    round i user:      [template between turns] prompt_i [assistant turn]
    round i assistant: target_i (``[SEG] answer_i``) + turn end

``labels`` copy ``input_ids`` on every assistant part (target + turn end) and are -100 on every user
part (image tokens included), on the template's text between turns and on padding, so L_llm is the
teacher-forced NLL of the targets only (SPEC §3). Each user part after the first is the text the
chat template renders for the conversation so far minus what is already encoded (the template
must render a conversation as the concatenation of its turns, as InternVL's does), so a one-round
example is encoded exactly as before. Sequences are right-padded; a sequence longer than
``max_length`` loses its end (the first user part, image tokens included, is never cut; a cut
[SEG] loses its mask pair). Every target ends with the chat template's turn-end token
(``<|im_end|>`` for InternVL; :func:`perceptio_core.model.internvl.turn_end_id`), the token
generation stops on.

Text-only examples (``image`` None or ``b""``; LLaVA conversations without an image) have no image
part and no tiles. They mix freely with image examples in one batch: ``pixel_values`` holds only
the image examples' tiles, which InternVL scatters into the ``<IMG_CONTEXT>`` places in order, and
a batch of text-only examples carries ``pixel_values`` of shape [0, 3, S, S] (the model passes
None to InternVL then).

The image goes through the checkpoint's processor (:class:`perceptio_core.model.processor.TileProcessor`):
1 to ``max_tiles`` aspect-matched tiles plus a thumbnail, L context tokens per tile, so the number
of ``<IMG_CONTEXT>`` tokens follows the image's aspect ratio. The prompt part uses the tokenizer's
chat template when it has one (the released InternVL tokenizers and the tiny one do), with the
expanded image string in front of the user text; without one it is the plain layout above.
:func:`encode_prompt` is shared with generation, so training and inference see the same prompt
tokens (generation and evaluation ask one question: a one-round prompt).

A batch (``dict`` of tensors) is, with B examples and S ``[SEG]``/mask pairs in the batch:

    input_ids        [B, T] long      attention_mask   [B, T] long (1 = token, 0 = pad)
    labels           [B, T] long      (-100 on image, user turns and padding)
    pixel_values     [P, 3, S, S]     the InternVL tiles of every image example, in example order
                                      (P = sum of num_tiles, 0 when no example has an image;
                                      S = vision image_size), ImageNet-normalised
    num_tiles        [B] long         tiles of each example (0 for a text-only one)
    sam2_pixel_values[B, 3, S2, S2]   SAM2 input (S2 = SAM2 image_size); zeros where no mask
    masks            [S, S2, S2]      ground-truth mask of each pair resized (nearest) to the SAM2
                                      frame, 0/1
    seg_positions    [S] long         input index of the pair's [SEG] token (in a target)
    seg_batch        [S] long         which example the pair belongs to (non-decreasing)
    has_mask         [B] bool         the example has at least one pair
    depth_maps       [B, D, D]        teacher map resized (bilinear) to the VQ-VAE input size D
    has_depth_map    [B] bool
    d_start_positions[B] long         input index of the first <d_start> of the targets, -1 if none
    d_end_positions  [B] long         input index of the first <d_end> after it, -1 if none

Pairs: the k-th ``[SEG]`` of an example's targets (in sequence order) goes with its k-th mask;
an example contributes min(#[SEG], #masks) pairs (a [SEG] without a mask, e.g. cut by
``max_length``, gets no mask loss). :func:`select_examples` takes a sub-batch (rows, their tiles
and their pairs) out of a batch.

SAM2 sees the image squashed to a square (as ``SAM2Transforms`` does), so the mask is resized the
same way and the loss is computed in that frame; at inference the predicted logits are resized back
to the image's own size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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

    image: PIL image, encoded bytes (JPEG/PNG/WebP) or an [H, W, 3] uint8 array; None or ``b""``
        for a text-only example.
    prompt: the first round's user text (no image placeholder).
    target: the first round's target text, perception block first (``format.target.format_target``).
    mask: [H, W] uint8/bool ground-truth mask at the image's size, or None: the one mask of a
        one-[SEG] example (shorthand for ``masks=[mask]``).
    depth_tokens: the N code indices of the image (informational; the target text carries them).
    depth_map: [h, w] float teacher depth map (min-max normalised, larger = nearer), or None.
    masks: the masks of the example's ``[SEG]`` tokens in order, each [H, W]; None: ``[mask]`` or [].
    rounds: the later rounds as ``(prompt, target)`` pairs.
    """

    image: Any
    prompt: str
    target: str
    mask: np.ndarray | None = None
    depth_tokens: list[int] | None = None
    depth_map: np.ndarray | None = None
    masks: list[np.ndarray] | None = None
    rounds: list[tuple[str, str]] = field(default_factory=list)

    def all_masks(self) -> list[np.ndarray]:
        """The example's masks in ``[SEG]`` order."""
        if self.masks is not None:
            return list(self.masks)
        return [self.mask] if self.mask is not None else []

    @property
    def has_image(self) -> bool:
        return not (self.image is None or (isinstance(self.image, (bytes, bytearray)) and not self.image))


def example_from_sample(sample: Any, depth_map: np.ndarray | None = None) -> TrainExample:
    """A :class:`perceptio_core.curation.sample.Sample` (mask as COCO RLE) -> :class:`TrainExample`, with
    the image's teacher map (looked up by the caller from ``sample.image_digest``) when given."""
    masks = [decode_mask(r).astype(np.uint8) for r in sample.masks_rle]
    return TrainExample(
        image=sample.image if sample.image else None,
        prompt=sample.prompt,
        target=sample.target,
        depth_tokens=list(sample.depth_tokens) if sample.depth_tokens is not None else None,
        depth_map=depth_map,
        masks=masks,
        rounds=[(r["prompt"], r["target"]) for r in sample.rounds],
    )


def image_placeholder(tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> str:
    """``<img>`` + ``<IMG_CONTEXT>`` x ``num_image_tokens`` + ``</img>`` in the tokenizer's spelling."""
    start, context, end = image_tokens(tokenizer)
    return start + context * num_image_tokens + end


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, num_image_tokens: int) -> str:
    """The prompt part as text (see the module docstring): chat template when the tokenizer has
    one (user turn = image string + newline + prompt, generation prompt added), else plain.
    ``num_image_tokens == 0``: a text-only prompt (no image string)."""
    return conversation_text(tokenizer, [(prompt, None)], num_image_tokens)


def conversation_text(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[tuple[str, str | None]], num_image_tokens: int
) -> str:
    """A conversation as text: ``turns`` = ``[(prompt, target), ...]`` where the last target may be
    None (then the generation prompt is added). The image string opens the first user turn when
    ``num_image_tokens`` > 0. With the chat template: ``apply_chat_template``; without: each user
    turn + newline, each target + the turn-end token's text."""
    messages: list[dict[str, str]] = []
    for i, (prompt, target) in enumerate(turns):
        content = prompt.strip()
        if i == 0 and num_image_tokens > 0:
            content = image_placeholder(tokenizer, num_image_tokens) + "\n" + content
        messages.append({"role": "user", "content": content})
        if target is not None:
            messages.append({"role": "assistant", "content": target})
    open_turn = turns[-1][1] is None if turns else True
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
    end = tokenizer.decode([turn_end_id(tokenizer)], skip_special_tokens=False)
    return "".join(m["content"] + ("\n" if m["role"] == "user" else end) for m in messages)


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


PAIR_KEYS = ("masks", "seg_positions", "seg_batch")  # per-[SEG]/mask pair tensors of a batch


def select_examples(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The examples ``rows`` of a collated batch: every per-example tensor sliced,
    ``pixel_values`` cut to those examples' tiles (by ``num_tiles``) and the pair tensors
    (``masks``, ``seg_positions``, ``seg_batch``) to those examples' pairs, ``seg_batch``
    renumbered from 0."""
    tiles = batch["num_tiles"]
    idx = range(len(tiles))[rows]
    if idx.step != 1:
        raise ValueError("select_examples takes a contiguous slice")
    bounds = torch.cat([tiles.new_zeros(1), tiles.cumsum(0)])
    lo, hi = (int(bounds[idx.start]), int(bounds[idx.stop])) if len(idx) else (0, 0)
    out = {k: (v[lo:hi] if k == "pixel_values" else v[rows]) for k, v in batch.items() if k not in PAIR_KEYS}
    if "seg_batch" in batch:
        sb = batch["seg_batch"]
        keep = (sb >= idx.start) & (sb < idx.stop) if len(idx) else torch.zeros_like(sb, dtype=torch.bool)
        for k in PAIR_KEYS:
            out[k] = batch[k][keep]
        out["seg_batch"] = out["seg_batch"] - (idx.start if len(idx) else 0)
    return out


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
        self.end_text = tokenizer.decode([self.end_id], skip_special_tokens=False)

    def encode(self, example: TrainExample, num_tiles: int) -> tuple[list[int], list[int], int]:
        """(input ids, labels, index where the first target starts) of one example whose image is
        ``num_tiles`` tiles (0: text-only), cut to max_length. Labels are set on every round's
        target + turn end, -100 elsewhere (see the module docstring)."""
        tok = self.tokenizer
        n_img = self.processor.tokens_per_tile * num_tiles
        turns = [(example.prompt, example.target)] + [(p, t) for p, t in example.rounds]
        ids = encode_prompt(tok, example.prompt, n_img)
        if len(ids) >= self.max_length:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_length {self.max_length}")
        labels = [IGNORE] * len(ids)
        target_from = len(ids)
        # the text the ids so far encode (rendered only for multi-round examples)
        covered = prompt_text(tok, example.prompt, n_img) if example.rounds else ""
        for i, (_, target) in enumerate(turns):
            if i > 0:
                full = conversation_text(tok, [*turns[:i], (turns[i][0], None)], n_img)
                if not full.startswith(covered):
                    raise ValueError("the chat template does not render a conversation as the concatenation "
                                     "of its turns; multi-round examples need one that does")
                user = list(tok(full[len(covered):], add_special_tokens=False).input_ids)
                ids += user
                labels += [IGNORE] * len(user)
                covered = full
            tgt = encode_target(tok, target, self.end_id)
            ids += tgt
            labels += tgt
            covered += target + self.end_text
            if len(ids) >= self.max_length:
                break
        return ids[: self.max_length], labels[: self.max_length], target_from

    def __call__(self, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        images = [encode_image(self.processor, e.image) if e.has_image else (None, None) for e in examples]
        encoded = [self.encode(e, len(tiles) if tiles is not None else 0) for e, (_, tiles) in zip(examples, images)]
        b = len(examples)
        t = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        d_start = torch.full((b,), -1, dtype=torch.long)
        d_end = torch.full((b,), -1, dtype=torch.long)
        tid = self.token_ids
        seg_lists: list[list[int]] = []
        for i, (ids, lab, target_from) in enumerate(encoded):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(lab, dtype=torch.long)
            # [SEG] tokens of the targets (labelled places), in order
            seg_lists.append([j for j in range(target_from, n) if ids[j] == tid.seg and lab[j] != IGNORE])
            d_start[i] = _first(ids, tid.d_start, target_from)
            if d_start[i] >= 0:
                d_end[i] = _first(ids, tid.d_end, int(d_start[i]) + 1)

        s2 = self.sam2_image_size
        tiles_all = [tiles for _, tiles in images if tiles is not None]
        pixel_values = (torch.cat(tiles_all) if tiles_all else
                        torch.zeros((0, 3, self.processor.tile_size, self.processor.tile_size)))
        num_tiles = torch.tensor([len(tiles) if tiles is not None else 0 for _, tiles in images], dtype=torch.long)
        sam2_pixels = torch.zeros((b, 3, s2, s2), dtype=torch.float32)
        pair_masks: list[torch.Tensor] = []
        seg_pos: list[int] = []
        seg_batch: list[int] = []
        has_mask = torch.zeros((b,), dtype=torch.bool)
        depth_maps = torch.zeros((b, self.depth_size, self.depth_size), dtype=torch.float32)
        has_depth = torch.zeros((b,), dtype=torch.bool)
        for i, (e, (image, _)) in enumerate(zip(examples, images)):
            masks = e.all_masks()
            if masks and image is None:
                raise ValueError("a text-only example cannot carry masks")
            for m in masks:
                m = np.asarray(m)
                if m.shape[:2] != (image.height, image.width):
                    raise ValueError(f"mask {m.shape[:2]} does not match image {(image.height, image.width)}")
            n_pairs = min(len(masks), len(seg_lists[i]))
            if n_pairs:
                sam2_pixels[i] = sam2_pixel_values(image, s2)
                has_mask[i] = True
            for k in range(n_pairs):
                m = (np.asarray(masks[k]) > 0).astype(np.float32)
                pair_masks.append(torch.from_numpy(resize_nearest(m, s2, s2)))
                seg_pos.append(seg_lists[i][k])
                seg_batch.append(i)
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
            "masks": torch.stack(pair_masks) if pair_masks else torch.zeros((0, s2, s2), dtype=torch.float32),
            "has_mask": has_mask,
            "depth_maps": depth_maps,
            "has_depth_map": has_depth,
            "seg_positions": torch.tensor(seg_pos, dtype=torch.long),
            "seg_batch": torch.tensor(seg_batch, dtype=torch.long),
            "d_start_positions": d_start,
            "d_end_positions": d_end,
        }


__all__ = [
    "PerceptioCollator",
    "PAIR_KEYS",
    "TrainExample",
    "conversation_text",
    "encode_image",
    "encode_prompt",
    "encode_target",
    "example_from_sample",
    "image_placeholder",
    "prompt_text",
    "resize_map",
    "select_examples",
]
