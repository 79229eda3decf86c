"""The one training loop (STYLE rule 6; SPEC §4), shared by every fit (the depth teacher, the VQ-VAE,
the ``base`` and SAM2 stand-ins) and the ``finetune`` stage, in-process (Prefect task) or under
``accelerate launch`` (``flows.train_script``).

A stage describes itself as a :class:`TrainTask` (build the model, the dataset, the collate, the
loss, how to save the final artefacts); :class:`Trainer` does the rest with explicit steps:

    trainer = Trainer(task, loop_cfg, out_dir, device="auto", progress=fn)
    trainer.setup()          # Accelerator, seed, model, AdamW, warm-up + cosine LambdaLR, loader, prepare
    trainer.resume()         # latest complete checkpoint in <out>/checkpoints, if any
    metrics = trainer.train()  # steps, per-step JSONL history, checkpoints every N steps
    trainer.save_final()     # the task's save_pretrained into <out>/model (+ meta.json), plots

(:func:`run_training` does the four calls). Evaluation never runs here: it loads ``<out>/model``.

Set-up (SPEC §4): ``Accelerator(mixed_precision = bf16 on CUDA / no on CPU, cpu=True on CPU,
gradient accumulation = loop.grad_accum)``; AdamW (betas, eps, weight decay on >= 2-D trainable
tensors only); :func:`perceptio_core.training.schedule.build_scheduler` stepped once per optimizer update
(``step_scheduler_with_optimizer=False``: the schedule counts optimizer steps whatever the process
count); gradient clipping at ``max_grad_norm``. Trainable tensors stored in bf16/fp16 are upcast to
fp32 (master weights) before the optimizer sees them. One step = ``grad_accum`` micro-batches of
``batch_size`` per process; the global batch is ``batch_size * grad_accum * num_processes``. Under
several processes DDP averages the per-process losses' gradients (a per-process token mean for
L_llm, as the HF Trainer does by default).

Data order and exact resume: the dataset is map-style, ordered per epoch by
:class:`perceptio_core.training.sampler.EpochSampler` (a function of (seed, epoch)); the loader's own
generator is reseeded from (seed, epoch) (it seeds the workers), so nothing about the order depends
on the global RNG. After optimizer step k each process has consumed ``k * grad_accum`` micro-batches:
epoch ``e = k * A // L`` and position ``k * A % L`` (L = micro-batches per process per epoch), so a
resumed run skips exactly those (``accelerator.skip_first_batches``). The model/optimizer/scheduler
states and each process's RNG states (Python, numpy, torch, CUDA; dropout draws from them) come
back through ``accelerator.load_state``; so a resumed run's weights equal an uninterrupted run's.

Checkpoints (``<out>/checkpoints/step-%08d/``, every ``checkpoint_every`` steps and at the end):
``accelerator.save_state`` into ``.tmp-step-%08d`` (trainable tensors and the buffers the task names
in :meth:`TrainTask.trained_buffers` only, as ``model.safetensors``: the frozen base is rebuilt from
its artifact; optimizer/scheduler/RNG files as accelerate writes
them, read back with ``torch.load(weights_only=True)``), then ``meta.json`` (step, epoch, data
position, fingerprint, last metrics), then an atomic rename; the last ``keep_checkpoints`` are kept.
A directory without ``meta.json`` or still named ``.tmp-*`` is never trusted. Resuming with a
different configuration, dataset size or process count raises :class:`ResumeMismatchError`.

Sharded training (``configs/accelerate/``; the numbers in ``bench/memory_estimate.py``): launched with
``fsdp.yaml`` the loop runs under FSDP2 (``fully_shard``; accelerate's ``fsdp2_prepare_model``, one
shard group per decoder / vision layer class the model has, the rest in the root group): frozen
and trainable tensors are sharded alike, the gradients reduce-scattered (averaged, as under DDP:
the same numbers, tested against DDP on 2 CPU processes). accelerate enables FSDP only on
accelerator devices, so on the CPU (gloo, the tests) :func:`enable_fsdp_on_cpu` sets it as
accelerate would. A checkpoint keeps the layout above: ``model.safetensors`` holds the trainable
tensors gathered whole, ``optimizer.bin`` AdamW's state gathered whole and keyed by parameter name
(``get_optimizer_state_dict(full_state_dict=True)``), read back on process 0 and broadcast, then
resharded; scheduler and RNG files through accelerate's ``save/load_accelerator_state``. The final
model: the full state gathered to process 0 and loaded into the task's model built afresh there,
which ``save_final`` writes. Under DeepSpeed (``deepspeed_zero{2,3}.yaml``; untested here, see
``bench/gpu_check_deepspeed.sh``) the checkpoints are the engine's (``exclude_frozen_parameters``)
and the final model takes the fp32 master values of the trainable tensors. The fingerprint records
the sharding (``fsdp2``, ``deepspeed-zero<k>``; DDP's fingerprint is unchanged), so a checkpoint
resumes only under the scheme that wrote it.

Outputs: ``<out>/history.jsonl`` (one line per optimizer step: step, epoch, lr, grad_norm, every
loss term, tokens (attention-mask sum over the global batch), step and data-wait seconds), ``<out>/plots/loss_<term>.png``, ``<out>/metrics.json``,
``<out>/model/`` (the task's final save + ``meta.json``). Metrics: ``loss_first`` / ``loss_last``
(means over the first / last W = max(1, min(100, steps // 10)) steps) and ``<term>_first`` /
``<term>_last`` for every term, plus throughput and data-wait share.

Tracking (issue 21; :mod:`perceptio_core.training.tracking`): given a
:class:`~perceptio_core.training.tracking.TrackingSpec` (the ``tracking`` argument, else the one
current in this context, which the runner sets for the stage it runs), the loop hands its trackers
to the ``Accelerator`` (``log_with``, ``project_dir`` = ``<workdir>/tracking``), logs the resolved
config, the loop's own settings, the run id and the stage's key as hyper-parameters
(``init_trackers``), and each optimizer step's history row as scalars at that step: ``train/<term>``
for every loss term, ``train/lr``, ``train/grad_norm``, ``train/samples_per_s``, ``train/tokens_per_s``
(when the batches carry an attention mask) and ``train/data_wait_frac``. A resumed loop first logs
the history rows it kept, so its run shows the whole curve. Only process 0 writes (accelerate's
trackers run on the main process only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset

from perceptio_core.atomic_io import fsync_dir, fsync_tree, write_json
from perceptio_core.device import ProgressFn, quiet_worker
from perceptio_core.config import TrainLoopConfig, canonical_json, to_dict
from perceptio_core.training.schedule import build_scheduler, steps_for_epochs, warmup_steps
from perceptio_core.training.tracking import TrackingSpec, current_tracking
from perceptio_core.training.sharding import (
    configure_deepspeed,
    enable_fsdp_on_cpu,
    fsdp_requested,
    full_tensor,
    keep_present_layer_classes,
)
from perceptio_core.training.sampler import EpochSampler

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
FINAL = "model"
META = "meta.json"
_STEP_FMT = "step-{:08d}"


class ResumeMismatchError(RuntimeError):
    """A checkpoint in the output directory belongs to a different run (config, data or world size)."""


# --------------------------------------------------------------------------------------------
# What a stage gives the loop
# --------------------------------------------------------------------------------------------


class TrainTask(ABC):
    """A stage's side of the loop. Build methods are called once, in every process, after the
    ``Accelerator`` exists and the seed is set (so random initialisations agree across processes)."""

    name: str = "train"
    # The learning rate the cosine ends at, as a fraction of the peak (0: SPEC §4's cosine to zero).
    # A task whose model keeps changing outside the optimizer to the last step (an EMA codebook)
    # keeps its weights learning with it.
    final_lr_frac: float = 0.0
    # A stage that runs several loops (the two-phase SAM2 fit) names each, so that each is tracked
    # in a run of its own (``<run_id>/<stage>/<tracking_run>``); "": the stage's run.
    tracking_run: str = ""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The module to train; trainable tensors have ``requires_grad``, the rest is frozen."""

    @abstractmethod
    def build_dataset(self) -> Dataset:
        """A map-style dataset; ``dataset[i]`` is what :meth:`collate` takes a list of."""

    @abstractmethod
    def build_collate(self) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        """``collate(items) -> batch``; runs in loader workers, so it must be picklable on its own
        (not a bound method of an object that holds the model). Called after :meth:`build_model`."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scalar tensors: ``"loss"`` (what is back-propagated) and any other terms to log."""

    @abstractmethod
    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """Write the final artefacts of the unwrapped ``model`` into ``out_dir`` (save_pretrained)."""

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (beyond the loop config and data size)."""
        return {}

    def trained_buffers(self, model: nn.Module) -> list[str]:
        """Names (as in ``model.named_buffers()``, ``model`` as :meth:`build_model` returned it) of
        the buffers training moves without the optimizer (an EMA codebook). Checkpoints keep them
        with the trainable tensors, so a resumed run goes on from their values. Default: none."""
        return []

    def shard_sizes(self) -> Sequence[int] | None:
        """Samples per shard, in dataset order, for shard-local shuffling (None: global shuffle)."""
        return None


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def history_window(steps: int) -> int:
    """W = max(1, min(100, steps // 10)): the steps averaged by ``*_first`` / ``*_last``."""
    return max(1, min(100, steps // 10))


def summarize_history(rows: Sequence[dict[str, Any]], terms: Sequence[str]) -> dict[str, float]:
    """``<term>_first`` / ``<term>_last`` (means over the first / last W steps) for each term, with
    ``loss_*`` for the total."""
    out: dict[str, float] = {}
    if not rows:
        return out
    w = history_window(len(rows))
    for t in terms:
        vals = [float(r[t]) for r in rows if t in r]
        if not vals:
            continue
        out[f"{t}_first"] = sum(vals[:w]) / len(vals[:w])
        out[f"{t}_last"] = sum(vals[-w:]) / len(vals[-w:])
    return out


def read_history(path: Path, max_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of a history JSONL (one per step, steps 1..), cut at ``max_step``; a torn last line
    (killed writer) is ignored."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if max_step is not None and row["step"] > max_step:
            break
        rows.append(row)
    return rows


def plot_history(rows: Sequence[dict[str, Any]], terms: Sequence[str], out_dir: Path) -> list[Path]:
    """One PNG per term (raw and a moving average against the step); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    steps = [r["step"] for r in rows]
    for t in terms:
        vals = [float(r.get(t, float("nan"))) for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
        ax.plot(steps, vals, lw=0.8, alpha=0.5, label=t)
        w = history_window(len(vals))
        if len(vals) >= 2 * w and w > 1:
            ma = [sum(vals[i - w + 1 : i + 1]) / w for i in range(w - 1, len(vals))]
            ax.plot(steps[w - 1 :], ma, lw=1.5, label=f"mean of {w}")
        ax.set_xlabel("step")
        ax.set_ylabel(t)
        ax.set_title("loss (total)" if t == "loss" else t)
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        p = out_dir / f"loss_{t}.png"
        tmp = p.with_name(f".{p.name}.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, p)
        paths.append(p)
    return paths


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step in ``<out>/checkpoints`` (one whose
    ``meta.json`` exists and says ``complete``), or None."""
    root = Path(out_dir) / CHECKPOINTS
    best, best_step = None, -1
    if not root.is_dir():
        return None
    for p in root.iterdir():
        if not (p.is_dir() and p.name.startswith("step-")):
            continue
        try:
            meta = json.loads((p / META).read_text())
        except (OSError, ValueError):
            continue
        if meta.get("complete") and int(meta.get("step", -1)) > best_step:
            best, best_step = p, int(meta["step"])
    return best


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on ``device``, or this process's peak resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def mixed_precision_for(precision: str, device_type: str) -> str:
    """``loop.precision`` -> accelerate's ``mixed_precision``: "auto" is bf16 on CUDA (fp16 where the
    GPU lacks bf16) and "no" on the CPU."""
    if precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r} (auto, no, bf16, fp16)")
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Position:
    step: int = 0  # optimizer steps done


class Trainer:
    """The loop; see the module docstring. ``device``: "auto", "cpu" or "cuda".

    ``grad_dump_dir``: process 0 writes the synchronised (DDP-averaged, pre-clipping) gradients of
    the first ``grad_dump_steps`` optimizer steps there as ``grads-step-%08d.safetensors``
    (debugging, and the 2-process equivalence test).

    ``tracking``: where the curves go (module docstring); None: the spec current in this context
    (:func:`~perceptio_core.training.tracking.current_tracking`), if any.
    """

    def __init__(
        self,
        task: TrainTask,
        cfg: TrainLoopConfig,
        out_dir: str | os.PathLike[str],
        *,
        device: str = "auto",
        progress: ProgressFn | None = None,
        parents: dict[str, str] | None = None,
        grad_dump_dir: str | os.PathLike[str] | None = None,
        grad_dump_steps: int = 1,
        tracking: TrackingSpec | None = None,
    ) -> None:
        self.task = task
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.device_name = device
        self.progress = progress
        self.parents = dict(parents or {})
        self.grad_dump_dir = Path(grad_dump_dir) if grad_dump_dir is not None else None
        self.grad_dump_steps = grad_dump_steps
        self.pos = _Position()
        self.accelerator: Any = None
        self.terms: list[str] = []
        self.fsdp = False  # sharded with FSDP2 (set by setup)
        self.deepspeed = False  # sharded with DeepSpeed ZeRO (set by setup)
        self.tracking = tracking if tracking is not None else current_tracking()
        self._tracking_on = False  # trackers started (set by setup)
        self._setup_done = False

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Accelerator, seed, model, optimizer, scheduler, data loader, ``accelerator.prepare``."""
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed

        cfg = self.cfg
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ValueError("loop steps, batch_size and grad_accum must be >= 1")
        name = (self.device_name or "auto").lower()
        cpu = name == "cpu" or (name == "auto" and not torch.cuda.is_available())
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device_name!r} asked for, but CUDA is not available here")
        spec = self.tracking if self.tracking is not None and self.tracking.enabled else None
        trackers = spec.build(self.task.tracking_run) if spec is not None else None  # a missing package raises here
        self.accelerator = acc = Accelerator(
            cpu=cpu,
            mixed_precision=mixed_precision_for(cfg.precision, "cpu" if cpu else "cuda"),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.grad_accum, sync_with_dataloader=False
            ),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
            log_with=trackers,
            project_dir=spec.root if spec is not None else None,
        )
        if fsdp_requested() and acc.distributed_type == DistributedType.MULTI_CPU:
            enable_fsdp_on_cpu(acc)
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        if self.fsdp and not acc.is_fsdp2:
            raise ValueError("the trainer shards with FSDP2 only: set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            configure_deepspeed(acc.state.deepspeed_plugin, cfg)
        set_seed(cfg.seed)
        model = self.task.build_model()
        for p in model.parameters():  # fp32 master weights for whatever is trained
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{self.task.name}: the model has no trainable parameters")
        self.n_trainable = sum(p.numel() for _, p in trainable)
        self.n_params = sum(p.numel() for p in model.parameters())
        decay = [p for _, p in trainable if p.ndim >= 2]
        no_decay = [p for _, p in trainable if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        self.dataset = self.task.build_dataset()
        if cfg.epochs > 0:  # steps from the data and the process count (loop.epochs)
            global_batch = cfg.batch_size * cfg.grad_accum * acc.num_processes
            self.cfg = cfg = replace(cfg, steps=steps_for_epochs(cfg.epochs, len(self.dataset), global_batch))
        scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_frac, self.task.final_lr_frac)

        self.sampler = EpochSampler(
            len(self.dataset),
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            shard_sizes=self.task.shard_sizes(),
            window_shards=cfg.shuffle_window_shards,
        )
        self._loader_gen = torch.Generator()
        self._loader_gen.manual_seed(cfg.seed)
        loader = DataLoader(
            self.dataset,
            batch_sampler=BatchSampler(self.sampler, cfg.batch_size, drop_last=True),
            collate_fn=self.task.build_collate(),
            num_workers=cfg.num_workers,
            pin_memory=not cpu,
            generator=self._loader_gen,
            worker_init_fn=quiet_worker,  # Ctrl-C: the main process stops, the workers stay silent
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
            persistent_workers=cfg.num_workers > 0,  # no re-fork at each epoch (the order comes
            # from the sampler in this process, so nothing in the workers depends on the epoch)
        )
        if self.fsdp:
            keep_present_layer_classes(acc.state.fsdp_plugin, model)
        self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(model, optimizer, loader, scheduler)
        self.batches_per_epoch = len(self.loader)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{self.task.name}: {len(self.dataset)} samples do not fill one batch of {cfg.batch_size} "
                f"on each of {acc.num_processes} processes"
            )
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        acc.register_save_state_pre_hook(self._save_trainable_only)
        self._setup_done = True
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / CHECKPOINTS).mkdir(exist_ok=True)
            for p in (self.out_dir / CHECKPOINTS).glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)  # a killed save: never trusted
        acc.wait_for_everyone()
        if spec is not None:
            self._start_tracking(spec)
        log.info(
            "%s: %d processes, %s, %d/%d trainable parameters, %d samples, %d micro-batches per "
            "process per epoch, global batch %d, %d steps (warm-up %d)",
            self.task.name, acc.num_processes, acc.device, self.n_trainable, self.n_params,
            len(self.dataset), self.batches_per_epoch, self.global_batch, cfg.steps,
            warmup_steps(cfg.steps, cfg.warmup_frac),
        )  # fmt: skip

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes

    def _checkpointed_names(self, model: nn.Module) -> set[str]:
        """State-dict keys of ``model`` (as prepared, so DDP's ``module.`` prefix included) a
        checkpoint keeps: its trainable tensors and the task's trained buffers."""
        inner = self.accelerator.unwrap_model(model)
        own = dict(inner.named_buffers())
        moved = {id(own[n]) for n in self.task.trained_buffers(inner)}
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return names | {n for n, b in model.named_buffers() if id(b) in moved}

    def _save_trainable_only(self, models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        """save_state pre-hook: keep only trainable tensors and trained buffers in the checkpoint's
        model.safetensors."""
        for i, m in enumerate(models[: len(weights)]):  # DeepSpeed saves its engines itself (no weights)
            names = self._checkpointed_names(m)
            weights[i] = {k: v.contiguous() for k, v in weights[i].items() if k in names}

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        loop = to_dict(self.cfg)
        for k in ("checkpoint_every", "keep_checkpoints", "num_workers", "prefetch_factor"):
            loop.pop(k, None)  # these may change between a run and its resumption without changing
            # its result (the data order does not depend on the worker count); ``steps`` may not:
            # the cosine schedule depends on it
        fp = {
            "task": self.task.name,
            "loop": loop,
            "final_lr_frac": self.task.final_lr_frac,
            "task_fingerprint": self.task.fingerprint(),
            "dataset_size": len(self.dataset),
            "num_processes": self.accelerator.num_processes,
        }
        if self.fsdp:  # its optimizer file is not DDP's; absent under DDP (their digests stay as they were)
            fp["sharding"] = "fsdp2"
        elif self.deepspeed:
            fp["sharding"] = f"deepspeed-zero{self.accelerator.state.deepspeed_plugin.zero_stage}"
        fp["digest"] = hashlib.sha256(canonical_json(fp).encode()).hexdigest()[:16]
        return fp

    # ---- tracking ------------------------------------------------------------------------
    def _start_tracking(self, spec: TrackingSpec) -> None:
        """``init_trackers`` (main process only) with the hyper-parameters: the resolved config and
        tags of ``spec``, the loop's settings as this task runs them, the task and the world size."""
        acc = self.accelerator
        extra = {"loop": to_dict(self.cfg), "task": self.task.name, "num_processes": acc.num_processes,
                 "global_batch": self.global_batch}  # fmt: skip
        acc.init_trackers(spec.run_name(self.task.tracking_run), config=spec.config(extra))
        self._tracking_on = True
        log.info("%s: tracking with %s into %s", self.task.name, ", ".join(spec.trackers),
                 spec.logdir(self.task.tracking_run))  # fmt: skip

    def _track(self, row: dict[str, Any]) -> None:
        """One history row to the trackers, at its step (every process calls; process 0 writes)."""
        if not self._tracking_on:
            return
        step_time = float(row.get("step_time") or 0.0)
        values = {f"train/{k}": float(row[k]) for k in self.terms if k in row}
        values["train/lr"] = float(row["lr"])
        if math.isfinite(float(row.get("grad_norm", float("nan")))):
            values["train/grad_norm"] = float(row["grad_norm"])
        if step_time > 0:
            values["train/samples_per_s"] = self.global_batch / step_time
            values["train/data_wait_frac"] = float(row.get("data_time", 0.0)) / step_time
            if row.get("tokens"):
                values["train/tokens_per_s"] = float(row["tokens"]) / step_time
        self.accelerator.log(values, step=int(row["step"]))

    def end_tracking(self) -> None:
        """Close the trackers (flush, finish the run). Not ``accelerator.end_training``, which
        also tears down the process group a caller may still use."""
        if self._tracking_on:
            for t in self.accelerator.trackers:
                t.finish()
            self.accelerator.trackers = []
            self._tracking_on = False

    # ---- resume --------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the latest complete checkpoint of ``<out>/checkpoints`` if any; returns its step (0
        when starting fresh). Raises :class:`ResumeMismatchError` if it belongs to another run."""
        self._need_setup()
        acc = self.accelerator
        ck = latest_checkpoint(self.out_dir)
        if ck is None:
            if acc.is_main_process:
                (self.out_dir / HISTORY).unlink(missing_ok=True)
            acc.wait_for_everyone()
            return 0
        meta = json.loads((ck / META).read_text())
        fp = self.fingerprint()
        if meta.get("fingerprint", {}).get("digest") != fp["digest"]:
            raise ResumeMismatchError(
                f"{ck} was written by a different run (config, data size or process count differ: "
                f"{meta.get('fingerprint')} vs {fp}); use a fresh output directory"
            )
        if self.fsdp:
            self._check_checkpoint_keys(ck)
            self._load_state_sharded(ck)
        elif self.deepspeed:  # the engine's own checkpoint (trainable tensors only: see save_checkpoint)
            acc.load_state(str(ck), load_module_strict=False)
        else:
            self._check_checkpoint_keys(ck)
            acc.load_state(str(ck), strict=False)
        self.pos.step = int(meta["step"])
        self.terms = list(meta.get("terms", []))
        if acc.is_main_process:  # drop history lines of steps after the checkpoint
            rows = read_history(self.out_dir / HISTORY, max_step=self.pos.step)
            tmp = self.out_dir / f".{HISTORY}.tmp"
            with open(tmp, "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, self.out_dir / HISTORY)
            for r in rows if self._tracking_on else []:  # the run's curve from step 1
                self._track(r)
        acc.wait_for_everyone()
        log.info("%s: resumed from %s (step %d)", self.task.name, ck, self.pos.step)
        return self.pos.step

    def _check_checkpoint_keys(self, ck: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(ck / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        missing = sorted(self._checkpointed_names(self.model) - keys)
        if missing:
            raise ResumeMismatchError(f"{ck} lacks trainable tensors {missing[:3]}...; use a fresh output directory")

    # ---- train ---------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> dict[str, float]:
        """Run optimizer steps up to ``loop.steps`` (or ``stop_at``, for tests that stop a run
        after a checkpoint as a kill would). Returns the metrics of the whole history so far."""
        self._need_setup()
        acc, cfg = self.accelerator, self.cfg
        total = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        A, L = cfg.grad_accum, self.batches_per_epoch
        epoch, skip = divmod(self.pos.step * A, L)
        self.model.train()
        hist_f = open(self.out_dir / HISTORY, "a") if acc.is_main_process else None
        sums: torch.Tensor | None = None
        data_time = tokens = 0.0
        t_step = time.perf_counter()
        t_run = time.perf_counter()
        steps_run = 0
        self._wait_total = 0.0
        self._time_total = 0.0
        self._tokens_total = 0
        try:
            while self.pos.step < total:
                self._loader_gen.manual_seed(int(cfg.seed) * 1_000_003 + epoch)
                self.loader.set_epoch(epoch)
                dl = acc.skip_first_batches(self.loader, skip) if skip else self.loader
                if skip:
                    dl.set_epoch(epoch)
                it = iter(dl)
                while self.pos.step < total:
                    t0 = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        break
                    data_time += time.perf_counter() - t0
                    if isinstance(batch, dict) and "attention_mask" in batch:
                        tokens += float(batch["attention_mask"].sum())
                    with acc.accumulate(self.model):
                        out = self.task.loss(self.model, batch)
                        if not self.terms:
                            self.terms = ["loss"] + [k for k in out if k != "loss"]
                        acc.backward(out["loss"])
                        vec = torch.stack([out[k].detach().float().reshape(()) for k in self.terms])
                        sums = vec if sums is None else sums + vec
                        grad_norm = None
                        if acc.sync_gradients:
                            if self.grad_dump_dir is not None and self.pos.step < self.grad_dump_steps:
                                self._dump_grads(self.pos.step + 1)
                            grad_norm = acc.clip_grad_norm_(self._params, cfg.max_grad_norm)
                            lr = float(self.scheduler.get_last_lr()[0])
                        self.optimizer.step()
                        if acc.sync_gradients:
                            self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    if not acc.sync_gradients:
                        continue
                    # ---- one optimizer step done
                    self.pos.step += 1
                    steps_run += 1
                    assert sums is not None
                    extra = torch.tensor([data_time, tokens], dtype=torch.float32, device=sums.device)
                    reduced = acc.reduce(torch.cat([sums / A, extra]), reduction="mean").cpu().tolist()
                    mean_terms, waited = reduced[:-2], float(reduced[-2])
                    step_tokens = int(round(reduced[-1] * acc.num_processes))
                    sums, tokens = None, 0.0
                    now = time.perf_counter()
                    step_time, t_step = now - t_step, now
                    self._wait_total += waited
                    self._time_total += step_time
                    self._tokens_total += step_tokens
                    data_time = 0.0
                    row = {
                        "step": self.pos.step,
                        "epoch": epoch,
                        "lr": lr,
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        **{k: float(v) for k, v in zip(self.terms, mean_terms)},
                        "tokens": step_tokens,
                        "step_time": step_time,
                        "data_time": waited,
                    }
                    if not all(math.isfinite(row[k]) for k in self.terms):
                        raise FloatingPointError(f"{self.task.name}: non-finite loss at step {self.pos.step}: {row}")
                    if hist_f is not None:
                        hist_f.write(json.dumps(row) + "\n")
                        hist_f.flush()
                    self._track(row)
                    if self.progress is not None and acc.is_main_process:
                        self.progress(self.pos.step, cfg.steps, {k: row[k] for k in self.terms[:1]} | {"lr": lr})
                    if self.pos.step % cfg.checkpoint_every == 0 or self.pos.step == cfg.steps:
                        self.save_checkpoint(epoch, row)
                        t_step = time.perf_counter()  # the save is not step time
                epoch += 1
                skip = 0
        finally:
            if hist_f is not None:
                hist_f.close()
        acc.wait_for_everyone()
        self._run_seconds = time.perf_counter() - t_run
        self._steps_run = steps_run
        return self.metrics()

    def _dump_grads(self, step: int) -> None:
        from safetensors.torch import save_file

        acc = self.accelerator
        if self.fsdp or self.deepspeed:  # sharded gradients: every process takes part in gathering them
            if self.deepspeed:
                from deepspeed.utils import safe_get_full_grad

                named = [(n, safe_get_full_grad(p)) for n, p in self.model.module.named_parameters() if p.requires_grad]
            else:
                named = [(n, full_tensor(p.grad)) for n, p in self.model.named_parameters()
                         if p.requires_grad and p.grad is not None]  # fmt: skip
            grads = {n: g.detach().float().cpu().contiguous() for n, g in named if g is not None}
            if acc.is_main_process:
                self.grad_dump_dir.mkdir(parents=True, exist_ok=True)
                save_file(grads, str(self.grad_dump_dir / f"grads-step-{step:08d}.safetensors"))
            return
        if acc.is_main_process:
            self.grad_dump_dir.mkdir(parents=True, exist_ok=True)
            grads = {
                n: p.grad.detach().float().cpu().contiguous()
                for n, p in acc.unwrap_model(self.model).named_parameters()
                if p.requires_grad and p.grad is not None
            }
            save_file(grads, str(self.grad_dump_dir / f"grads-step-{step:08d}.safetensors"))

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, epoch: int | None = None, last: dict[str, Any] | None = None) -> Path:
        """Write ``<out>/checkpoints/step-%08d`` atomically (all processes must call it)."""
        self._need_setup()
        acc = self.accelerator
        root = self.out_dir / CHECKPOINTS
        final = root / _STEP_FMT.format(self.pos.step)
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.fsdp:
            self._save_state_sharded(tmp)
        elif self.deepspeed:  # ZeRO partitions in <tmp>/pytorch_model/, frozen base left out
            acc.save_state(str(tmp), exclude_frozen_parameters=True)
        else:
            acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            A, L = self.cfg.grad_accum, self.batches_per_epoch
            e, b = divmod(self.pos.step * A, L)
            meta = {
                "complete": True,
                "step": self.pos.step,
                "epoch": e if epoch is None else epoch,
                "data_position": {"epoch": e, "batch_in_epoch": b, "batches_per_epoch": L,
                                  "micro_batches_done_per_process": self.pos.step * A},
                "fingerprint": self.fingerprint(),
                "terms": self.terms,
                "last": last or {},
                "parents": self.parents,
                "time": time.time(),
            }  # fmt: skip
            (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            self._prune(root)
        acc.wait_for_everyone()
        return final

    def _prune(self, root: Path) -> None:
        done = []
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and (p / META).is_file():
                done.append((int(p.name.split("-")[1]), p))
        done.sort()
        for _, p in done[: max(0, len(done) - max(1, self.cfg.keep_checkpoints))]:
            shutil.rmtree(p, ignore_errors=True)

    # ---- checkpoints and final model when sharded ------------------------------------------------------------
    def _trainable_full_state(self) -> dict[str, torch.Tensor]:
        """The checkpointed tensors (trainable parameters, trained buffers) whole, on the CPU of
        process 0 (empty elsewhere); every process must call it (one gather per sharded tensor)."""
        names = self._checkpointed_names(self.model)
        main = self.accelerator.is_main_process
        state: dict[str, torch.Tensor] = {}
        for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if n in names and n not in state:
                whole = full_tensor(t.detach())
                if main:
                    state[n] = whole.cpu().contiguous()
        return state if main else {}

    def _save_state_sharded(self, out: Path) -> None:
        """``save_state`` under FSDP, in the same layout as under DDP: ``model.safetensors`` (the
        trainable tensors, gathered whole), ``optimizer.bin`` (AdamW's state gathered whole, keyed
        by parameter name: ``get_optimizer_state_dict(full_state_dict=True)``), ``scheduler.bin`` and
        ``random_states_<rank>.pkl`` through accelerate's ``save_accelerator_state``."""
        from accelerate.checkpointing import save_accelerator_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        acc = self.accelerator
        weights = self._trainable_full_state()
        optim = get_optimizer_state_dict(
            self.model, self.optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if acc.is_main_process:
            torch.save(optim, out / "optimizer.bin")
        del optim
        save_accelerator_state(
            str(out), [weights], [], acc._schedulers, acc._dataloaders, acc.process_index, acc.step, acc.scaler,
            save_on_each_node=acc.project_configuration.save_on_each_node, safe_serialization=True,
        )  # fmt: skip

    def _load_state_sharded(self, ck: Path) -> None:
        """``load_state`` under FSDP (the files of :meth:`_save_state_sharded`): each process
        reads the trainable tensors and keeps its shards; process 0 reads the optimizer state and
        broadcasts it; scheduler, RNG states and accelerate's step counter as ``load_state``."""
        from accelerate.checkpointing import load_accelerator_state
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        acc = self.accelerator
        weights = load_file(str(ck / "model.safetensors"))
        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        optim = torch.load(ck / "optimizer.bin", map_location="cpu", weights_only=True) if acc.is_main_process else {}
        set_optimizer_state_dict(
            self.model, self.optimizer.optimizer, optim,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )  # fmt: skip
        over = load_accelerator_state(
            str(ck), [], [], acc._schedulers, acc._dataloaders, acc.process_index, acc.scaler, map_location="cpu"
        )
        if "step" in over:
            acc.step = over["step"]

    def _gathered_model(self) -> nn.Module | None:
        """Under FSDP or DeepSpeed, the trained model whole on process 0 (None elsewhere), for the
        task's ``save_final``, built afresh there by the task (as :meth:`setup` built it, without
        touching this process's random state) and loaded with the gathered state: under FSDP every
        parameter and persistent buffer (gathered to process 0's CPU, loaded strictly); under
        DeepSpeed the fp32 master values of the trainable tensors (``safe_get_full_fp32_param``) and
        the trained buffers, the frozen rest being the base as built. Every process must call it."""
        import random

        import numpy as np
        from accelerate.utils import set_seed

        acc = self.accelerator
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            inner = self.model.module
            names = self._checkpointed_names(inner)
            full = {n: safe_get_full_fp32_param(p).detach().cpu()
                    for n, p in inner.named_parameters() if p.requires_grad}  # fmt: skip
            full.update({n: b.detach().cpu() for n, b in inner.named_buffers() if n in names})
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not acc.is_main_process:
            return None
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            set_seed(self.cfg.seed)
            model = self.task.build_model()
        random.setstate(py)
        np.random.set_state(npy)
        for p in model.parameters():  # the fp32 master weights of setup
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        result = model.load_state_dict(full, strict=False)
        persistent = set(model.state_dict()) if self.fsdp else set(full)
        missing = [k for k in result.missing_keys if k in persistent]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{self.task.name}: the gathered sharded state does not fit a fresh model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        return model

    # ---- final artefacts -------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Loss summaries of the whole history (also across a resume) plus run figures."""
        rows = read_history(self.out_dir / HISTORY)
        m: dict[str, float] = summarize_history(rows, self.terms)
        m["steps"] = float(self.pos.step)
        m["global_batch"] = float(self.global_batch)
        m["num_processes"] = float(self.accelerator.num_processes)
        m["trainable_parameters"] = float(self.n_trainable)
        m["parameters"] = float(self.n_params)
        if getattr(self, "_time_total", 0.0) > 0:
            m["samples_per_s"] = self._steps_run * self.global_batch / self._time_total
            m["data_wait_frac"] = self._wait_total / self._time_total
            m["tokens_per_s"] = self._tokens_total / self._time_total
        m["peak_memory_bytes"] = float(peak_memory_bytes(self.accelerator.device))
        if self.fsdp:
            m["fsdp"] = 1.0
        return m

    def save_final(self) -> Path:
        """The task's final artefacts into ``<out>/model`` (written to a temp dir, then renamed),
        ``meta.json`` beside them, ``metrics.json`` and the loss plots. Process 0 writes."""
        self._need_setup()
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out_dir / FINAL
        metrics = self.metrics()
        plain = self._gathered_model() if self.fsdp or self.deepspeed else None  # collective: all take part
        if acc.is_main_process:
            tmp = self.out_dir / f".tmp-{FINAL}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.task.save_final(plain if plain is not None else acc.unwrap_model(self.model), tmp)
            del plain
            meta = {
                "stage": self.task.name,
                "step": self.pos.step,
                "metrics": metrics,
                "parents": self.parents,
                "fingerprint": self.fingerprint(),
            }
            (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.out_dir)
            rows = read_history(self.out_dir / HISTORY)
            plot_history(rows, self.terms, self.out_dir / "plots")
            write_json(self.out_dir / METRICS, metrics, indent=1)
        acc.wait_for_everyone()
        return final

    def _need_setup(self) -> None:
        if not self._setup_done:
            raise RuntimeError("call Trainer.setup() first")


def run_training(
    task: TrainTask,
    cfg: TrainLoopConfig,
    out_dir: str | os.PathLike[str],
    *,
    device: str = "auto",
    resume: bool = True,
    progress: ProgressFn | None = None,
    parents: dict[str, str] | None = None,
    grad_dump_dir: str | os.PathLike[str] | None = None,
    tracking: TrackingSpec | None = None,
) -> dict[str, float]:
    """setup -> resume (when ``resume``; otherwise earlier checkpoints are removed) -> train ->
    save_final, tracked into ``tracking`` (None: the spec current in this context, if any). Returns
    the metrics (see the module docstring)."""
    trainer = Trainer(task, cfg, out_dir, device=device, progress=progress, parents=parents,
                      grad_dump_dir=grad_dump_dir, tracking=tracking)  # fmt: skip
    trainer.setup()
    try:
        if not resume and trainer.accelerator.is_main_process:
            shutil.rmtree(Path(out_dir) / CHECKPOINTS, ignore_errors=True)
            (Path(out_dir) / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        trainer.accelerator.wait_for_everyone()
        trainer.resume()
        metrics = trainer.train()
        trainer.save_final()
    finally:
        trainer.end_tracking()
    return metrics


__all__ = [
    "ResumeMismatchError",
    "TrainTask",
    "Trainer",
    "configure_deepspeed",
    "enable_fsdp_on_cpu",
    "fsdp_requested",
    "full_tensor",
    "history_window",
    "keep_present_layer_classes",
    "latest_checkpoint",
    "plot_history",
    "read_history",
    "run_training",
    "summarize_history",
]
