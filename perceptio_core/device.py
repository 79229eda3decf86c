"""Where and how the models run: device choice, autocast precision, seeding, and the one progress
callback type of every long loop (fits, teacher inference, evaluation).

``resolve_device("auto")`` gives CUDA when present, else the CPU. ``autocast(device, precision)`` is
the one mixed-precision context every forward of the teacher, the VQ-VAE and the tokenizer uses:
``"auto"`` is bf16 on CUDA (fp16 where the GPU has no bf16) and fp32 elsewhere. A progress callback
is ``fn(step, total, info)``; the Prefect tasks pass one that logs, the tests pass none.

CPU threads: :func:`cpu_thread_env`, called by the entry points (``perceptio``, ``flows.train_script``,
``flows.eval_script``) before torch is imported, gives torch half the cores this process may use
(one on 2 cores) and OpenMP a passive wait unless the environment says otherwise: on 2 cores a fit
of the tiny profile with one OpenMP team per core ran 7 to 14x slower than clean beside a competing
job, one thread 1.5 to 2x (``bench/bench_load.py``).
This module imports torch only inside the functions that use it, so the entry points may import it first.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ProgressFn = Callable[[int, int, dict[str, Any]], None]
"""``progress(step, total, info)``: called every few steps with the running metrics."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

CPU_THREAD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
"""What :func:`cpu_thread_env` sets where the environment has no value (bench/bench_load.py), besides
``OMP_NUM_THREADS`` (:func:`default_cpu_threads`)."""


def default_cpu_threads() -> int:
    """Half the cores this process may use, at least 1: one on a 2-core laptop (where a second
    OpenMP thread beside any other job made a fit 7 to 14x slower, bench/bench_load.py), four on an
    8-core one, so a bigger machine is not held to one core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def cpu_thread_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set in ``env`` (default ``os.environ``) each of :data:`CPU_THREAD_DEFAULTS` it lacks, before
    torch is imported (OpenMP reads them when it loads): torch's intra-op threads default to half the
    cores (:func:`default_cpu_threads`) and an idle OpenMP thread sleeps instead of spinning. A value already there wins (``OMP_NUM_THREADS=4
    perceptio run``), and so does ``run.torch_threads`` (``torch.set_num_threads`` at the run's start).
    Returns what it set."""
    env = os.environ if env is None else env
    wanted = {"OMP_NUM_THREADS": str(default_cpu_threads()), **CPU_THREAD_DEFAULTS}
    out = {k: v for k, v in wanted.items() if k not in env}
    env.update(out)
    return out


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given.

    Raises ``ValueError`` for a CUDA device on a machine without CUDA, naming what was asked.
    """
    import torch

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
    import torch

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
    import torch

    dtype = resolve_precision(precision, device)
    if dtype == torch.float32:
        yield dtype
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield dtype


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch (CPU and CUDA); return a CPU ``torch.Generator`` seeded the same,
    for samplers and shuffles that must not depend on other code drawing from the global stream."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so wall-clock timings mean what they say."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet_worker(_worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT. Ctrl-C reaches every process of
    the terminal's group; the main process stops the run and ends its workers, which would otherwise
    each print a KeyboardInterrupt traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
