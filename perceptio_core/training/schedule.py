"""The learning-rate schedule of SPEC §4: linear warm-up over the first 5% of the steps, then cosine
to zero.

With T optimizer steps and W = :func:`warmup_steps` (T, fraction) warm-up steps, the multiplier of
the base learning rate used by optimizer step s (s = 0 .. T-1; step s is taken with the value the
scheduler holds after s calls of ``scheduler.step()``) is

    s <  W:  s / W                                   (0 at the first step, 1 at s = W)
    s >= W:  0.5 * (1 + cos(pi * (s - W) / (T - W)))  (1 at s = W, 0.5 half-way, 0 at s = T)

the convention of ``transformers.get_cosine_schedule_with_warmup``. The schedule counts optimizer
steps (one ``scheduler.step()`` per optimizer update, after gradient accumulation), never
micro-batches or processes: the trainer builds ``Accelerator(step_scheduler_with_optimizer=False)``
and steps the scheduler itself, so the curve does not depend on how many processes run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(total_steps: int, warmup_frac: float = 0.05) -> int:
    """W = ceil(warmup_frac * total_steps), at least 1 when warmup_frac > 0 (and at most T - 1)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    if warmup_frac == 0.0:
        return 0
    return min(max(1, math.ceil(warmup_frac * total_steps)), max(total_steps - 1, 0))


def warmup_cosine(total_steps: int, warmup: int) -> Callable[[int], float]:
    """The multiplier ``f(s)`` above, for ``LambdaLR``; ``f(s) = 0`` for s >= T."""
    if warmup < 0 or (warmup > 0 and warmup >= total_steps):
        raise ValueError(f"warmup {warmup} must be in [0, total_steps)")

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if step >= total_steps:
            return 0.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float = 0.05) -> LambdaLR:
    """``LambdaLR(optimizer, warmup_cosine(T, warmup_steps(T, warmup_frac)))``."""
    return LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps(total_steps, warmup_frac)))


__all__ = ["build_scheduler", "warmup_cosine", "warmup_steps"]
