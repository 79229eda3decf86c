"""What every fit takes from its data and how fast: the learning-rate schedule of SPEC §4 (linear
warm-up over the first 5% of the steps, then cosine to zero) and the hold-out rule.

With T optimizer steps and W = :func:`warmup_steps` (T, fraction) warm-up steps, the multiplier of
the base learning rate used by optimizer step s (s = 0 .. T-1; step s is taken with the value the
scheduler holds after s calls of ``scheduler.step()``) is

    s <  W:  s / W                                   (0 at the first step, 1 at s = W)
    s >= W:  0.5 * (1 + cos(pi * (s - W) / (T - W)))  (1 at s = W, 0.5 half-way, 0 at s = T)

the convention of ``transformers.get_cosine_schedule_with_warmup``. A task may end the cosine at a
floor instead of 0 (:attr:`perceptio_core.training.trainer.TrainTask.final_lr_frac`: the VQ-VAE,
whose EMA codebook keeps moving to the last step, keeps its decoder learning with it). The schedule counts optimizer
steps (one ``scheduler.step()`` per optimizer update, after gradient accumulation), never
micro-batches or processes: the trainer builds ``Accelerator(step_scheduler_with_optimizer=False)``
and steps the scheduler itself, so the curve does not depend on how many processes run.

Hold-out: every fit (the depth teacher, the VQ-VAE, SAM2) keeps out the images whose sha256 digest
falls in the first ``fraction`` of the 32-bit range (:func:`holdout_by_digest`). The rule needs no
seed and does not depend on which other images are present, so an image is held out by every fit
that sees it, in every run, whatever the data set's size or order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch.optim.lr_scheduler import LambdaLR


def steps_for_epochs(epochs: float, samples: int, global_batch: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``samples`` at ``global_batch`` samples per step,
    rounded up (a started step is a step): the paper's mix of about 995K samples at 512 per step is
    1,944 steps an epoch."""
    if epochs <= 0 or samples < 1 or global_batch < 1:
        raise ValueError(f"need epochs > 0, samples >= 1 and global_batch >= 1, got {epochs}, {samples}, {global_batch}")
    return max(1, math.ceil(epochs * samples / global_batch))


def warmup_steps(total_steps: int, warmup_frac: float = 0.05) -> int:
    """W = ceil(warmup_frac * total_steps), at least 1 when warmup_frac > 0 (and at most T - 1)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    if warmup_frac == 0.0:
        return 0
    return min(max(1, math.ceil(warmup_frac * total_steps)), max(total_steps - 1, 0))


def warmup_cosine(total_steps: int, warmup: int, final: float = 0.0) -> Callable[[int], float]:
    """The multiplier ``f(s)`` above, for ``LambdaLR``, with the cosine ending at ``final`` instead of
    0 when given: ``final + (1 - final) * 0.5 * (1 + cos(...))`` after the warm-up; ``f(s) = final``
    for s >= T."""
    if warmup < 0 or (warmup > 0 and warmup >= total_steps):
        raise ValueError(f"warmup {warmup} must be in [0, total_steps)")
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final learning-rate fraction must be in [0, 1), got {final}")

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if step >= total_steps:
            return final
        progress = (step - warmup) / max(1, total_steps - warmup)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float = 0.05, final: float = 0.0
) -> LambdaLR:
    """``LambdaLR(optimizer, warmup_cosine(T, warmup_steps(T, warmup_frac), final))``."""
    return LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps(total_steps, warmup_frac), final))


T = TypeVar("T")


def holdout_by_digest(digest: str, fraction: float) -> bool:
    """True when the image of sha256 ``digest`` (hex) is held out: its first 32 bits, read as a
    number in [0, 1], are below ``fraction`` (so about ``fraction`` of all images are)."""
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def split_by_digest(
    items: Iterable[T], fraction: float, digest: Callable[[T], str] = str
) -> tuple[list[T], list[T]]:
    """``(train, holdout)`` of ``items`` by :func:`holdout_by_digest` of ``digest(item)`` (default:
    the items are the digests), each in the order of ``items``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    train: list[T] = []
    hold: list[T] = []
    for item in items:
        (hold if holdout_by_digest(digest(item), fraction) else train).append(item)
    return train, hold


__all__ = ["build_scheduler", "holdout_by_digest", "split_by_digest", "warmup_cosine", "warmup_steps"]
