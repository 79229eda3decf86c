"""The composite fine-tuning loss of SPEC §3, one function per term.

    L = L_llm + w_seg * (bce * L_bce + dice * L_dice)
        + w_dtok * (w_marker * L_marker + w_token * L_token + w_count * L_count) + w_rec * L_rec

Conventions shared by every sequence term:

* ``logits`` [B, T, V] and ``targets`` [B, T] are **aligned**: ``logits[:, t]`` is the prediction of
  ``targets[:, t]``. The model builds them from the input sequence with :func:`shift_for_next_token`
  (logits at input position t predict the token at t + 1), so no term below shifts again.
* ``targets`` holds :data:`IGNORE` (-100) where nothing is predicted (image, prompt, padding).
* For sample b, ``s_b`` is the first aligned index whose target is ``<d_start>`` and ``e_b`` the first
  index after ``s_b`` whose target is ``<d_end>`` (:func:`span_bounds`); so ``logits[b, s_b]`` is
  the logit vector that predicts the ``<d_start>`` marker, as SPEC §3 writes ``z_{b, s_b}``.
* A term with no sample to average over is an exact 0 that stays attached to ``logits``, so the
  total is always differentiable and every term can be logged for every batch.

L_count, exactly (SPEC §3 leaves its form to us). With P_t = sum_k softmax(z_t)[code_k] the
probability that position t emits a depth code, and the window W_b = {t : s_b < t <= s_b + N + 1,
targets[b, t] != IGNORE} (the N places of the codes and the place of ``<d_end>``):

    E_b = sum_{t in W_b} P_t,        L_count = mean_b |E_b - N| / N   over samples with a s_b.

Properties: 0 <= L_count <= 1 (the window has at most N + 1 places); for sharp (one-hot) predictions it is
|n_b - N| / N where n_b is the number of codes the model would put in the window, so it is 0 exactly
when a well-formed span of N codes is followed by a non-code, and 1/N for a span one code short (or
one too long). For soft predictions, missing code mass inside the span and code mass leaking onto
the ``<d_end>`` place can cancel; L_count is a length term only and relies on L_token / L_marker to
put the right token at each place. Its gradient is the sign of (E_b - N) times dP_t/dz_t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from perceptio_core.config import LossConfig
from perceptio_core.depth.codec import DepthCodec

IGNORE = -100
LOSS_KEYS = ("loss", "llm", "seg_bce", "seg_dice", "marker", "token", "count", "rec")


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align next-token predictions with their targets.

    Args:
        logits: [B, T, V], ``logits[:, t]`` computed at input position t.
        labels: [B, T], the label of input position t (IGNORE where none).

    Returns:
        ``(logits[:, :-1], labels[:, 1:])``: [B, T-1, V] and [B, T-1], aligned.
    """
    return logits[:, :-1], labels[:, 1:]


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """An exact 0 attached to ``logits`` (keeps the graph connected)."""
    return logits.sum() * 0.0


def llm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_llm: mean next-token NLL over every non-ignored target token of the batch.

    logits [B, T, V], targets [B, T] (aligned). Returns a scalar.
    """
    valid = targets != IGNORE
    if not bool(valid.any()):
        return _zero(logits)
    return F.cross_entropy(logits[valid].float(), targets[valid])


def span_bounds(
    targets: torch.Tensor, d_start_id: int, d_end_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The perception span of each sample, in aligned target indices.

    Args:
        targets: [B, T] aligned targets.

    Returns:
        ``(starts, ends)``, each [B] long: ``starts[b]`` = s_b, the first index with target
        ``<d_start>``, or -1; ``ends[b]`` = e_b, the first index > s_b with target ``<d_end>``, or -1
        (also -1 when s_b is absent).
    """
    b, t = targets.shape
    idx = torch.arange(t, device=targets.device).expand(b, t)
    big = torch.full_like(idx, t)
    is_start = targets == d_start_id
    starts = torch.where(is_start, idx, big).min(dim=1).values
    has_start = starts < t
    after = idx > starts[:, None]
    ends = torch.where((targets == d_end_id) & after, idx, big).min(dim=1).values
    has_end = has_start & (ends < t)
    minus = torch.full_like(starts, -1)
    return torch.where(has_start, starts, minus), torch.where(has_end, ends, minus)


def marker_loss(
    logits: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """L_marker = (1/B) sum_b 1_b [CE(z_{b,s_b}, <d_start>) + CE(z_{b,e_b}, <d_end>)].

    1_b = 1 when both markers are present (``starts[b] >= 0`` and ``ends[b] >= 0``); B counts every
    sample of the batch, as SPEC §3 writes it. logits [B, T, V], targets [B, T], starts/ends [B].
    """
    present = (starts >= 0) & (ends >= 0)
    if not bool(present.any()):
        return _zero(logits)
    rows = torch.nonzero(present).squeeze(1)
    s, e = starts[rows], ends[rows]
    ce_s = F.cross_entropy(logits[rows, s].float(), targets[rows, s], reduction="sum")
    ce_e = F.cross_entropy(logits[rows, e].float(), targets[rows, e], reduction="sum")
    return (ce_s + ce_e) / targets.shape[0]


def _inside_span(targets: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: s_b < t < e_b for samples with both markers, and target not ignored."""
    t = torch.arange(targets.shape[1], device=targets.device)[None, :]
    present = ((starts >= 0) & (ends >= 0))[:, None]
    return present & (t > starts[:, None]) & (t < ends[:, None]) & (targets != IGNORE)


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """L_token: mean CE over every (b, t) with s_b < t < e_b (the code places), pooled over the batch."""
    inside = _inside_span(targets, starts, ends)
    if not bool(inside.any()):
        return _zero(logits)
    return F.cross_entropy(logits[inside].float(), targets[inside])


def code_probability(logits: torch.Tensor, code_ids: torch.Tensor) -> torch.Tensor:
    """P(next token is a depth code) = sum_k softmax(logits)[code_ids[k]], computed stably as
    exp(logsumexp(logits[..., codes]) - logsumexp(logits)). logits [..., V] -> [...]."""
    lf = logits.float()
    return torch.exp(torch.logsumexp(lf[..., code_ids], dim=-1) - torch.logsumexp(lf, dim=-1))


def count_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    starts: torch.Tensor,
    code_ids: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """L_count = mean over samples with a <d_start> of |E_b - N| / N (see the module docstring).

    Args:
        logits: [B, T, V]; targets: [B, T]; starts: [B] (s_b or -1); code_ids: [K] ids of the codes;
        num_tokens: N.
    """
    has = starts >= 0
    if not bool(has.any()):
        return _zero(logits)
    t = torch.arange(targets.shape[1], device=targets.device)[None, :]
    window = (t > starts[:, None]) & (t <= starts[:, None] + num_tokens + 1) & (targets != IGNORE)
    window = window & has[:, None]
    p_code = code_probability(logits, code_ids.to(logits.device))  # [B, T]
    expected = (p_code * window).sum(dim=1)  # [B]
    per_sample = (expected - num_tokens).abs() / num_tokens
    return per_sample[has].mean()


def span_code_logits(
    logits: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    code_ids: torch.Tensor,
    num_tokens: int,
    rows: torch.Tensor,
) -> torch.Tensor:
    """The logits of the K codes at the places inside each span, truncated or padded to N.

    Args:
        logits: [B, T, V]; starts, ends: [B]; code_ids: [K]; num_tokens: N;
        rows: [n] batch rows to take (each must have both markers).

    Returns:
        [n, N, K]. A span with fewer than N places is padded with zero logits (a uniform code
        distribution, i.e. the mean code embedding); a longer one keeps its first N places.
    """
    code_ids = code_ids.to(logits.device)
    k = code_ids.numel()
    out = []
    for r in rows.tolist():
        s, e = int(starts[r]), int(ends[r])
        z = logits[r, s + 1 : e][:, code_ids][:num_tokens]  # [n_b, K]
        if z.shape[0] < num_tokens:
            z = torch.cat([z, z.new_zeros(num_tokens - z.shape[0], k)], dim=0)
        out.append(z)
    return torch.stack(out, dim=0)


def rec_loss(
    logits: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    code_ids: torch.Tensor,
    num_tokens: int,
    depth_tokenizer: DepthCodec,
    teacher_maps: torch.Tensor,
    has_map: torch.Tensor,
    tau: float = 1.0,
) -> torch.Tensor:
    """L_rec: soft depth reconstruction MSE (SPEC §3).

    For each sample with both markers and a teacher map: the code logits inside the span
    (:func:`span_code_logits`, [n, N, K]) go through ``depth_tokenizer.soft_decode(code_logits,
    tau)`` (softmax(logits / tau) over the K codes, expected codebook vector, frozen VQ-VAE decoder;
    a :class:`perceptio_core.depth.codec.DepthCodec`) to maps
    [n, H, W]; the teacher maps [B, H', W'] are resized (bilinear) to H x W when they differ; the
    loss is the mean squared error over all their pixels. Gradients reach the LLM through the
    softmax only (the tokenizer is frozen).
    """
    rows = torch.nonzero((starts >= 0) & (ends >= 0) & has_map.to(starts.device)).squeeze(1)
    if rows.numel() == 0:
        return _zero(logits)
    code_logits = span_code_logits(logits, starts, ends, code_ids, num_tokens, rows).float()
    pred = depth_tokenizer.soft_decode(code_logits, tau)  # [n, H, W]
    target = teacher_maps[rows].to(device=pred.device, dtype=pred.dtype)
    if target.shape[-2:] != pred.shape[-2:]:
        target = F.interpolate(target[:, None], size=pred.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return F.mse_loss(pred, target)


def mask_bce_loss(mask_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-pixel sigmoid BCE, mean over pixels and masks. mask_logits, gt: [n, H, W] (gt in {0, 1})."""
    return F.binary_cross_entropy_with_logits(mask_logits.float(), gt.float())


def mask_dice_loss(mask_logits: torch.Tensor, gt: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, mean over masks: 1 - (2 sum(p g) + smooth) / (sum p + sum g + smooth), with
    p = sigmoid(logits) summed over each mask's pixels. mask_logits, gt: [n, H, W]."""
    p = torch.sigmoid(mask_logits.float()).flatten(1)
    g = gt.float().flatten(1)
    dice = (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return (1.0 - dice).mean()


def total_loss(terms: dict[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    """Combine the terms (keys ``llm``, ``seg_bce``, ``seg_dice``, ``marker``, ``token``, ``count``,
    ``rec``) with the weights of ``cfg`` into L (SPEC §3)."""
    seg = cfg.bce * terms["seg_bce"] + cfg.dice * terms["seg_dice"]
    dtok = cfg.w_marker * terms["marker"] + cfg.w_token * terms["token"] + cfg.w_count * terms["count"]
    return terms["llm"] + cfg.w_seg * seg + cfg.w_dtok * dtok + cfg.w_rec * terms["rec"]


def sequence_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    d_start_id: int,
    d_end_id: int,
    code_ids: torch.Tensor,
    num_tokens: int,
) -> dict[str, torch.Tensor]:
    """``llm``, ``marker``, ``token`` and ``count`` of aligned ``logits`` [B, T, V] / ``targets`` [B, T]."""
    starts, ends = span_bounds(targets, d_start_id, d_end_id)
    return {
        "llm": llm_loss(logits, targets),
        "marker": marker_loss(logits, targets, starts, ends),
        "token": token_loss(logits, targets, starts, ends),
        "count": count_loss(logits, targets, starts, code_ids, num_tokens),
    }


__all__ = [
    "IGNORE",
    "LOSS_KEYS",
    "code_probability",
    "count_loss",
    "llm_loss",
    "marker_loss",
    "mask_bce_loss",
    "mask_dice_loss",
    "rec_loss",
    "sequence_terms",
    "shift_for_next_token",
    "span_bounds",
    "span_code_logits",
    "token_loss",
    "total_loss",
]
