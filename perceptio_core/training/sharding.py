"""Sharded training for the one training loop (SPEC §4 scale-out; ``configs/accelerate/``): what
the :class:`~perceptio_core.training.trainer.Trainer` needs beyond accelerate to run under FSDP2 on
CPU process groups, to fill DeepSpeed's ``"auto"`` clipping from the loop config, to wrap only the
layer classes a model has, and to gather sharded tensors. The trainer's checkpoints, resume and
final save under FSDP are in the trainer itself."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from perceptio_core.config import TrainLoopConfig

log = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch --config_file configs/accelerate/fsdp.yaml``
    sets ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables the plugin reads)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def enable_fsdp_on_cpu(acc: Any) -> None:
    """Turn a multi-process CPU (gloo) ``Accelerator`` into an FSDP one, with the plugin the launch
    configured (the ``FSDP_*`` environment).

    accelerate 1.16 switches ``distributed_type`` to FSDP only for accelerator devices: in
    ``AcceleratorState.__init__`` (accelerate/state.py) the ``ACCELERATE_USE_FSDP`` test sits inside
    the ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`` branch, so a CPU
    process group stays ``MULTI_CPU`` and ``prepare`` would wrap the model in DDP. torch's FSDP2
    (``fully_shard``) itself runs on a CPU device mesh over gloo, and accelerate's FSDP2 code paths
    the trainer uses (``fsdp2_prepare_model``, ``no_sync``, the DTensor-aware gradient clipping) have
    nothing CUDA-specific; so the state is set here as accelerate would set it on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def configure_deepspeed(plugin: Any, cfg: TrainLoopConfig) -> None:
    """Fill the DeepSpeed config's ``"auto"`` gradient clipping with ``loop.max_grad_norm`` (accelerate
    would put 1.0); gradient accumulation (``loop.grad_accum``), the micro-batch and bf16 come from
    the ``Accelerator`` and the loader at ``prepare``. An explicit value that differs is logged: the
    config file wins there. (``configs/accelerate/deepspeed_zero*.yaml``; not run here: no
    DeepSpeed on the CPU machines, see ``bench/gpu_check_deepspeed.sh``.)"""
    ds = plugin.deepspeed_config
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(cfg.max_grad_norm)
    elif float(ds["gradient_clipping"]) != float(cfg.max_grad_norm):
        log.warning("DeepSpeed config clips at %s, the loop config at %s: DeepSpeed's value is used",
                    ds["gradient_clipping"], cfg.max_grad_norm)


def keep_present_layer_classes(plugin: Any, model: nn.Module) -> list[str]:
    """Keep, of the plugin's ``transformer_cls_names_to_wrap``, the classes ``model`` has (one config
    names the decoder layers of every base we train: Qwen2, Llama, the InternVL vision tower;
    accelerate raises on a class the model lacks). Returns the kept names; with none left, only the
    root is sharded (one unit: no memory saved), which is logged."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    if not names:
        return []
    kept = [n for n in names if get_module_class_from_name(model, n) is not None]
    if len(kept) < len(names):
        log.info("FSDP: sharding units %s (absent from this model: %s)", kept, sorted(set(names) - set(kept)))
    if not kept:
        log.warning("FSDP: none of the layer classes %s is in the model: it is sharded as one unit", names)
    plugin.transformer_cls_names_to_wrap = kept
    return kept


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (sharded) DTensor, gathered (a collective: every process calls it, in
    the same order); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


__all__ = ["configure_deepspeed", "enable_fsdp_on_cpu", "fsdp_requested", "full_tensor", "keep_present_layer_classes"]
