"""Generation for Perceptio (SPEC §1): greedy and beam search with a KV cache, constrained
perception decoding, and the decoding of the mask and the depth map from what was generated.

Constrained perception decoding (:class:`PerceptionConstraint`, on by default): once ``<d_start>``
has been emitted (or forced through ``response_prefix``) and until ``<d_end>``, the next token is
restricted to the K code ids for exactly N steps, then ``<d_end>`` is forced. Outside a block the
code ids and ``<d_end>`` are never allowed (they mean nothing there: a model whose block "should"
have been longer would otherwise go on emitting codes after the forced ``<d_end>`` and lose the start
of its answer, as the tiny default model did on HardBLINK); ``forbid_stray=False`` restricts inside
blocks only, as SPEC §1 states the minimum. It is a ``transformers.LogitsProcessor`` as well, so it
plugs into ``model.generate`` unchanged.

After decoding, the perception block is parsed by :func:`perceptio_core.format.target.parse_generation`
(the parser the evaluators use): ``depth_indices`` is set only for a well-formed block (exactly N
codes between the markers), and only then is ``depth_map`` decoded. **Every** ``[SEG]`` that was
emitted (one per object, SPEC §1: a grounded caption or a question about several objects) gives a
hidden state (the last-layer state at that [SEG] token's own position, from one pass over the
prompt and the response up to and including the last [SEG]: the states the cached decoding
computed when it fed each [SEG], and the ones training reads) and, when asked, a mask: SAM2 on
the image (encoded once), one prompt per [SEG], logits upsampled to the image's size,
``sigmoid > mask_threshold``. :class:`GenerationResult` lists them in ``masks`` (response order);
``mask`` / ``mask_logits`` / ``seg_hidden`` are the first ones, for one-object callers (refer
evaluation asks one expression per prompt and scores ``mask``).
SAM2 and the VQ-VAE decoder run only when a mask or a depth map is asked for (SPEC §1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from perceptio_core.model.batching import encode_image, encode_prompt
from perceptio_core.model.internvl import PerceptionTokenIds, stop_token_ids
from perceptio_core.format.target import Parsed, ParseStatus, parse_generation
from perceptio_core.model.sam2_decoder import sam2_pixel_values


class PerceptionConstraint(LogitsProcessor):
    """Force well-formed depth blocks: after ``<d_start>``, only codes for N steps, then ``<d_end>``;
    outside a block (``forbid_stray``), no codes and no ``<d_end>``.

    ``__call__(input_ids [B, L], scores [B, V]) -> scores [B, V]``: rows inside an open block get
    -inf everywhere but the allowed ids; other rows get -inf on the code ids and ``<d_end>``.
    ``input_ids`` should hold the response so far (prompt tokens may be included: a block is open
    when the last ``<d_start>`` has no ``<d_end>`` after it). A block that already holds N or more
    tokens (possible only through a forced prefix) is closed.
    """

    def __init__(self, token_ids: PerceptionTokenIds, num_tokens: int, forbid_stray: bool = True) -> None:
        self.token_ids = token_ids
        self.num_tokens = int(num_tokens)
        self.forbid_stray = bool(forbid_stray)
        self._codes = torch.tensor(token_ids.codes, dtype=torch.long)
        self._stray = torch.tensor([*token_ids.codes, token_ids.d_end], dtype=torch.long)

    def open_count(self, ids: Sequence[int]) -> int | None:
        """Tokens emitted since the last ``<d_start>`` of ``ids`` if that block is still open,
        else None."""
        ids = list(ids)
        tid = self.token_ids
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] == tid.d_end:
                return None
            if ids[i] == tid.d_start:
                return len(ids) - 1 - i
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores
        for row in range(scores.shape[0]):
            n = self.open_count(input_ids[row].tolist())
            if n is None and not self.forbid_stray:
                continue
            if out is scores:
                out = scores.clone()
            if n is None:
                out[row, self._stray.to(scores.device)] = float("-inf")
                continue
            keep = self._codes.to(scores.device) if n < self.num_tokens else torch.tensor(
                [self.token_ids.d_end], device=scores.device
            )
            masked = torch.full_like(scores[row], float("-inf"))
            masked[keep] = scores[row, keep]
            out[row] = masked
        return out


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    text: the answer text (perception tokens removed, trimmed).
    raw_text: the whole response as decoded, perception tokens included (eos excluded).
    token_ids: the response ids (forced prefix included, eos excluded).
    status: how well formed the perception block is (:class:`ParseStatus`).
    seg_hidden: [d] last-layer hidden state at the first [SEG] of the response, or None.
    seg_hiddens: [n_seg, d] the states at every [SEG] of the response, in order, or None.
    masks: one [H, W] bool mask per [SEG] of the response, in order, when asked (else []).
    masks_logits: the [H, W] float32 logits behind each of ``masks``.
    mask: ``masks[0]`` (the first [SEG]'s mask), or None.
    mask_logits: ``masks_logits[0]``, or None.
    depth_indices: the N code indices of a well-formed block, else None.
    depth_map: [h, w] float32 map decoded from ``depth_indices`` when asked, else None.
    score: sum of the log-probabilities of the generated tokens (after constraints).
    """

    text: str
    raw_text: str
    token_ids: list[int]
    status: ParseStatus
    seg_hidden: torch.Tensor | None = None
    seg_hiddens: torch.Tensor | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    masks_logits: list[np.ndarray] = field(default_factory=list)
    mask: np.ndarray | None = None
    mask_logits: np.ndarray | None = None
    depth_indices: list[int] | None = None
    depth_map: np.ndarray | None = None
    score: float = 0.0
    parsed: Parsed | None = field(default=None, repr=False)


@dataclass
class _Beam:
    tokens: list[int]
    score: float
    finished: bool = False


def _process(scores: torch.Tensor, seqs: list[list[int]], constraint: PerceptionConstraint | None) -> torch.Tensor:
    """Apply the constraint to next-token scores [n, V] given the response so far of each row."""
    if constraint is None:
        return scores
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), max(width, 1)), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
    return constraint(ids, scores)


@torch.no_grad()
def generate_ids(
    model: Any,
    prompt_ids: Sequence[int],
    pixel_values: torch.Tensor,  # [n, 3, S, S]: the tiles of the one image
    max_new_tokens: int,
    stop_ids: set[int],
    constraint: PerceptionConstraint | None = None,
    num_beams: int = 1,
    use_cache: bool = True,
    response_prefix: Sequence[int] = (),
    length_penalty: float = 1.0,
) -> tuple[list[int], float]:
    """Decode after ``prompt_ids`` + ``response_prefix``; returns (response ids including the prefix
    and the stop token if one was emitted, summed log-probability of the generated tokens).

    Greedy when ``num_beams == 1``; else beam search over ``num_beams`` beams with length
    normalisation ``score / len ** length_penalty`` over the generated tokens, finished hypotheses
    kept until ``num_beams`` of them exist and no live beam can beat the worst. With ``use_cache``
    the prompt is encoded once and every step feeds only the new token (the cache is reordered
    along the beams); without, every step re-runs the whole sequence (the reference the cached
    path must equal).
    """
    device = pixel_values.device
    prefix = [int(t) for t in response_prefix]
    context = [int(t) for t in prompt_ids] + prefix
    nb = max(1, int(num_beams))
    beams = [_Beam(tokens=list(prefix), score=0.0)]
    finished: list[_Beam] = []
    cache = None

    def full_logits(seqs: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor([list(prompt_ids) + s for s in seqs], dtype=torch.long, device=device)
        pv = pixel_values.repeat(len(seqs), 1, 1, 1)  # every sequence's copy of the tiles
        return model.lm_forward(ids, pixel_values=pv, use_cache=False).logits[:, -1].float()

    # prefill
    ids0 = torch.tensor([context], dtype=torch.long, device=device)
    out = model.lm_forward(ids0, pixel_values=pixel_values, use_cache=use_cache)
    logits = out.logits[:, -1].float()  # [1, V]
    cache = out.past_key_values  # batch 1: one live beam so far

    for _step in range(max_new_tokens):
        live = [b for b in beams if not b.finished]
        if not live:
            break
        scores = _process(torch.log_softmax(logits, dim=-1), [b.tokens for b in live], constraint)  # [n, V]
        if nb == 1:
            tok = int(scores[0].argmax())
            b = live[0]
            b.tokens.append(tok)
            b.score += float(scores[0, tok])
            if tok in stop_ids:
                b.finished = True
                finished.append(b)
                break
            if _step == max_new_tokens - 1:
                break  # no step left to use the next logits
            if use_cache:
                out = model.lm_forward(
                    torch.tensor([[tok]], device=device), past_key_values=cache, use_cache=True
                )
                logits, cache = out.logits[:, -1].float(), out.past_key_values
            else:
                logits = full_logits([b.tokens])
            continue

        # beam search
        total = torch.tensor([b.score for b in live], device=scores.device)[:, None] + scores  # [n, V]
        flat = total.flatten()
        k = min(2 * nb, int(torch.isfinite(flat).sum()))
        top_scores, top_idx = flat.topk(k)
        vocab = scores.shape[1]
        new_beams: list[_Beam] = []
        parents: list[int] = []
        for rank, (sc, ix) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            parent, tok = divmod(ix, vocab)
            cand = _Beam(tokens=live[parent].tokens + [tok], score=sc)
            if tok in stop_ids:
                if rank < nb:
                    cand.finished = True
                    finished.append(cand)
                continue
            new_beams.append(cand)
            parents.append(parent)
            if len(new_beams) == nb:
                break
        gen_len = len(new_beams[0].tokens) - len(prefix) if new_beams else 1
        if len(finished) >= nb and new_beams:
            worst = min(_normalised(f, len(prefix), length_penalty) for f in finished)
            best_live = max(b.score for b in new_beams) / max(gen_len, 1) ** length_penalty
            if best_live <= worst:
                beams = []
                break
        beams = new_beams
        if not beams or _step == max_new_tokens - 1:
            break
        if use_cache:
            # row i of the cache becomes the cache of beam i's parent (a gather: it may repeat rows
            # and changes the batch size from len(live) to len(beams))
            cache.reorder_cache(torch.tensor(parents, dtype=torch.long, device=device))
            step_ids = torch.tensor([[b.tokens[-1]] for b in beams], dtype=torch.long, device=device)
            out = model.lm_forward(step_ids, past_key_values=cache, use_cache=True)
            logits, cache = out.logits[:, -1].float(), out.past_key_values
        else:
            logits = full_logits([b.tokens for b in beams])

    pool = finished + [b for b in beams if not b.finished]
    if nb == 1:
        best = pool[0]
    else:
        best = max(pool, key=lambda b: _normalised(b, len(prefix), length_penalty))
    return best.tokens, best.score


def _normalised(beam: _Beam, prefix_len: int, length_penalty: float) -> float:
    return beam.score / max(len(beam.tokens) - prefix_len, 1) ** length_penalty


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    image: Any,
    prompt: str,
    max_new_tokens: int = 160,
    constrained: bool = True,
    num_beams: int = 1,
    *,
    want_mask: bool = True,
    want_depth: bool = True,
    response_prefix: str = "",
    use_cache: bool = True,
    extra_stop_ids: Sequence[int] = (),
    length_penalty: float = 1.0,
    max_tiles: int | None = None,
) -> GenerationResult:
    """Answer ``prompt`` about ``image`` with a :class:`~perceptio_core.model.perceptio_model.PerceptioModel`.

    Args:
        model: the Perceptio model (eval mode is set here).
        tokenizer: its tokenizer (``model.tokenizer``).
        image: PIL image, encoded bytes or [H, W, 3] uint8 array.
        prompt: the user text (no image placeholder).
        max_new_tokens: generated tokens at most (after ``response_prefix``); N + 3 + the answer.
        constrained: constrained perception decoding (SPEC §1), on by default.
        num_beams: 1 = greedy, else beam search.
        want_mask: run SAM2 on the [SEG] state when one is emitted.
        want_depth: decode a well-formed depth block through the VQ-VAE decoder.
        response_prefix: text forced at the start of the response (e.g. ``"[SEG]<d_start>"``).
        use_cache: decode with the KV cache (identical output, faster).
        extra_stop_ids: ids that end the response besides the eos ids of the tokenizer and the
            checkpoint's generation config (:func:`~perceptio_core.model.internvl.stop_token_ids`).
        length_penalty: beam-score normalisation exponent.
        max_tiles: dynamic tiling bound for this image (None: the model's ``model.max_tiles``).
    """
    model.eval()
    device = next(model.parameters()).device
    processor = model.image_processor.with_max_tiles(max_tiles)
    pil, tiles = encode_image(processor, image)
    prompt_ids = encode_prompt(tokenizer, prompt, processor.tokens_per_tile * len(tiles))
    prefix_ids = tokenizer(response_prefix, add_special_tokens=False).input_ids if response_prefix else []
    pixel_values = tiles.to(device=device, dtype=model.base_model.dtype)
    stops = stop_token_ids(model.base_model, tokenizer, extra_stop_ids)
    constraint = PerceptionConstraint(model.token_ids, model.num_depth_tokens) if constrained else None
    tokens, score = generate_ids(
        model,
        prompt_ids,
        pixel_values,
        max_new_tokens,
        stops,
        constraint=constraint,
        num_beams=num_beams,
        use_cache=use_cache,
        response_prefix=prefix_ids,
        length_penalty=length_penalty,
    )
    return _finish(model, tokenizer, pil, prompt_ids, pixel_values, tokens, score, stops, want_mask, want_depth)


def _finish(model: Any, tokenizer: Any, pil: Any, prompt_ids: list[int], pixel_values: torch.Tensor,
            tokens: list[int], score: float, stops: set[int], want_mask: bool, want_depth: bool) -> GenerationResult:
    """The :class:`GenerationResult` of one decoded response: parsed, and the masks and the depth
    map decoded when asked (module docstring)."""
    device = pixel_values.device
    response = [t for t in tokens if t not in stops]
    raw_text = tokenizer.decode(response, skip_special_tokens=False)
    parsed = parse_generation(raw_text, model.num_depth_tokens, model.codebook_size)
    result = GenerationResult(
        text=parsed.answer,
        raw_text=raw_text,
        token_ids=response,
        status=parsed.status,
        depth_indices=parsed.depth_indices,
        score=score,
        parsed=parsed,
    )

    tid: PerceptionTokenIds = model.token_ids
    at = [j for j, t in enumerate(response) if t == tid.seg]  # every [SEG] of the response
    if at:
        seq = torch.tensor([prompt_ids + response[: at[-1] + 1]], device=device)
        hidden = model.lm_forward(seq, pixel_values=pixel_values, logits_from=None).hidden
        pos = torch.tensor([len(prompt_ids) + j for j in at], device=device)  # the [SEG] tokens' own places
        states = hidden[0, pos]  # [n_seg, d]
        result.seg_hiddens = states.float().cpu()
        result.seg_hidden = result.seg_hiddens[0]
        if want_mask:
            sam_px = sam2_pixel_values(pil, model.sam2.image_size)[None].to(device)
            one_image = torch.zeros(len(at), dtype=torch.long, device=device)  # every [SEG] prompts it
            logits = model.predict_mask_logits(states, sam_px, (pil.height, pil.width), image_index=one_image)
            logits = logits[:, 0].float().cpu()  # [n_seg, H, W]
            thr = model.model_cfg.mask_threshold
            result.masks_logits = [lg.numpy() for lg in logits]
            result.masks = [(torch.sigmoid(lg) > thr).numpy() for lg in logits]
            result.mask_logits, result.mask = result.masks_logits[0], result.masks[0]
    if want_depth and result.depth_indices is not None:
        idx = torch.tensor([result.depth_indices], dtype=torch.long, device=device)
        result.depth_map = model.decode_depth(idx)[0].float().cpu().numpy()
    return result


def pad_token_id(tokenizer: Any, stop_ids: set[int]) -> int:
    """The id left padding fills a batch with: the tokenizer's pad token, else a stop id (masked out
    either way; it only has to be a valid id)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids))


@torch.no_grad()
def generate_ids_batch(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    pixel_values: torch.Tensor,  # every row's tiles, in row order
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    constraint: PerceptionConstraint | None = None,
    response_prefix: Sequence[int] = (),
) -> list[tuple[list[int], float]]:
    """Greedy :func:`generate_ids` of several prompts at once (``model.lm_forward`` with
    ``attention_mask`` and ``position_ids``): the contexts left-padded with ``pad_id``, each row's
    positions counted from its first real token, one KV cache; per row the constraint, its own stop
    (a finished row is fed ``pad_id`` and its further tokens dropped). Returns per row what
    :func:`generate_ids` returns: (response ids with the prefix and the stop token if one was
    emitted, summed log-probability of the generated tokens)."""
    device = pixel_values.device
    prefix = [int(t) for t in response_prefix]
    contexts = [[int(t) for t in ids] + prefix for ids in prompt_ids]
    b, width = len(contexts), max(len(c) for c in contexts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, width - len(c):] = torch.tensor(c, dtype=torch.long)
        mask[i, width - len(c):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.lm_forward(ids, attention_mask=mask, pixel_values=pixel_values, use_cache=True,
                           position_ids=positions)
    logits, cache = out.logits[:, -1].float(), out.past_key_values
    tokens = [list(prefix) for _ in range(b)]
    scores = [0.0] * b
    done = [False] * b
    last = positions[:, -1:]
    for step in range(max_new_tokens):
        live = [i for i in range(b) if not done[i]]
        logp = _process(torch.log_softmax(logits[live], dim=-1), [tokens[i] for i in live], constraint)
        picked = logp.argmax(-1).tolist()
        step_ids = torch.full((b, 1), pad_id, dtype=torch.long)
        for row, i in enumerate(live):
            tok = int(picked[row])
            tokens[i].append(tok)
            scores[i] += float(logp[row, tok])
            step_ids[i, 0] = tok
            done[i] = tok in stop_ids
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        last = last + 1
        out = model.lm_forward(step_ids.to(device), attention_mask=mask, past_key_values=cache, use_cache=True,
                               position_ids=last)
        logits, cache = out.logits[:, -1].float(), out.past_key_values
    return list(zip(tokens, scores))


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    max_new_tokens: int = 160,
    constrained: bool = True,
    *,
    want_mask: bool = True,
    want_depth: bool = True,
    response_prefix: str = "",
    extra_stop_ids: Sequence[int] = (),
    max_tiles: int | None = None,
) -> list[GenerationResult]:
    """Greedy :func:`generate` of several (image, prompt) pairs at once: one left-padded batch with
    the KV cache (every row's positions counted from its first real token, padding masked out),
    the perception constraint applied per row (a row inside its depth block is held to the codes,
    the others are not), and each row stopping on its own stop token (a finished row's later
    tokens are discarded). Each result equals ``generate(...)`` of its pair alone, token for token
    (tested); the masks and the depth map are decoded per row exactly as :func:`generate` does."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if not prompts:
        return []
    model.eval()
    device = next(model.parameters()).device
    processor = model.image_processor.with_max_tiles(max_tiles)
    dtype = model.base_model.dtype
    encoded = [encode_image(processor, im) for im in images]
    prompt_ids = [encode_prompt(tokenizer, pr, processor.tokens_per_tile * len(t))
                  for pr, (_, t) in zip(prompts, encoded)]
    prefix = tokenizer(response_prefix, add_special_tokens=False).input_ids if response_prefix else []
    stops = stop_token_ids(model.base_model, tokenizer, extra_stop_ids)
    constraint = PerceptionConstraint(model.token_ids, model.num_depth_tokens) if constrained else None
    pixel_values = torch.cat([t for _, t in encoded]).to(device=device, dtype=dtype)
    decoded = generate_ids_batch(model, prompt_ids, pixel_values, max_new_tokens, stops,
                                 pad_token_id(tokenizer, stops), constraint=constraint, response_prefix=prefix)
    results = []
    offsets = np.cumsum([0] + [len(t) for _, t in encoded])
    for i, ((pil, _), (tokens, score)) in enumerate(zip(encoded, decoded)):
        px = pixel_values[offsets[i]:offsets[i + 1]]
        results.append(_finish(model, tokenizer, pil, prompt_ids[i], px, tokens, score, stops, want_mask, want_depth))
    return results


__all__ = ["GenerationResult", "PerceptionConstraint", "generate", "generate_batch", "generate_ids",
           "generate_ids_batch", "pad_token_id"]
