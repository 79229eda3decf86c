"""Where and how the models run: device choice, autocast precision, seeding, and the one progress
callback type of every long loop (fits, teacher inference, evaluation).

``resolve_device("auto")`` gives CUDA when present, else the CPU. ``autocast(device, precision)`` is
the one mixed-precision context every forward of the teacher, the VQ-VAE and the tokenizer uses:
``"auto"`` is bf16 on CUDA (fp16 where the GPU has no bf16) and fp32 elsewhere. A progress callback
is ``fn(step, total, info)``; the Prefect tasks pass one that logs, the tests pass none.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

ProgressFn = Callable[[int, int, dict[str, Any]], None]
"""``progress(step, total, info)``: called every few steps with the running metrics."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given.

    Raises ``ValueError`` for a CUDA device on a machine without CUDA, naming what was asked.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = (device or "auto").strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"unknown device {device!r} (use 'auto', 'cpu' or 'cuda[:i]')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r} (use 'auto', 'cpu' or 'cuda[:i]')")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``.

    ``"auto"``: bf16 on CUDA when supported, else fp16 there; fp32 on the CPU. ``"bf16"`` and
    ``"fp16"`` are honoured on either device (CPU autocast supports both); ``"fp32"`` disables autocast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "auto") -> Iterator[torch.dtype]:
    """Context manager: ``torch.autocast`` at the dtype ``resolve_precision`` picks, or nothing for fp32.

    Yields the dtype in force, so callers can record it.
    """
    dtype = resolve_precision(precision, device)
    if dtype == torch.float32:
        yield dtype
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield dtype


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch (CPU and CUDA); return a CPU ``torch.Generator`` seeded the same,
    for samplers and shuffles that must not depend on other code drawing from the global stream."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so wall-clock timings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
