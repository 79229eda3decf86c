"""The ``train_vqvae`` stage's fit (SPEC §2): the depth VQ-VAE of :mod:`perceptio_core.depth.vqvae`
trained on the teacher's maps, on the one training loop (:mod:`perceptio_core.training.trainer`).

Loss: ``MSE(recon, map) + vqvae.commitment * commitment`` on maps resized to ``vqvae.input_size``
and flipped horizontally with probability 1/2 (drawn from the global torch RNG, which a checkpoint
restores). The encoder and decoder learn by AdamW (no weight decay) with the loop's warm-up (3% of
the steps) + cosine schedule, ending at 10% of the peak learning rate rather than 0, and gradient clipping at
1.0, in fp32. The codebook has no gradient: the quantiser's training forward moves it by
exponential moving averages and restarts dead codes to the last step
(:class:`~perceptio_core.depth.vqvae.EMAVectorQuantizer`), so the decoder keeps learning to follow
it (the default world's teacher maps, means of 3 seeds: held-out delta1 0.985 with the cosine to 0,
0.988 with the floor; AbsRel 0.043 and 0.040). Its buffers are the task's
``trained_buffers``, saved in every checkpoint with the trainable weights, so a resumed fit goes on
with the codebook the interrupted one had. Under several processes the quantiser sums its
assignment statistics over them, so the codebook follows the global batch.

The maps are split by the caller with the rule of every fit
(:func:`perceptio_core.training.schedule.split_by_digest` of the images' digests); the held-out
maps are only scored.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from perceptio_core.atomic_io import write_json
from perceptio_core.config import TrainLoopConfig, VQVAEConfig, to_dict
from perceptio_core.depth.metrics import map_metrics
from perceptio_core.depth.vqvae import VQVAE, code_statistics, prepare_maps, reconstruct
from perceptio_core.device import ProgressFn
from perceptio_core.training.trainer import FINAL, HISTORY, METRICS, TrainTask, read_history, run_training


class MapDataset(Dataset):
    """``ds[i]`` -> map ``i`` of ``maps`` [N, 1, S, S] (float32 in [0, 1], held in memory)."""

    def __init__(self, maps: torch.Tensor) -> None:
        self.maps = maps

    def __len__(self) -> int:
        return self.maps.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.maps[i]


def collate_maps(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"maps": [B, 1, S, S]}``."""
    return {"maps": torch.stack(items)}


class VQVAEFitModule(nn.Module):
    """The VQ-VAE under training with its loss in ``forward`` (what the loop's DDP wrapper calls)."""

    def __init__(self, vqvae: VQVAE) -> None:
        super().__init__()
        self.vqvae = vqvae

    def forward(self, maps: torch.Tensor) -> dict[str, torch.Tensor]:
        """maps [B, 1, S, S] -> scalar terms: ``loss``, ``mse``, ``commit`` (unweighted), and the
        batch's code usage and perplexity (``batch_usage``, ``batch_perplexity``) and the dead codes
        restarted in this step (``restarts``), logged, not trained."""
        flip = (torch.rand(maps.shape[0]) < 0.5).to(maps.device)  # [B]
        x = torch.where(flip[:, None, None, None], maps.flip(-1), maps)
        q = self.vqvae.quantizer
        restarts = q.restarts
        recon, idx, commit = self.vqvae(x)
        mse = F.mse_loss(recon.float(), x)
        stats = code_statistics(idx, q.codebook_size)
        logged = {"batch_usage": stats["usage"], "batch_perplexity": stats["perplexity"],
                  "restarts": float(q.restarts - restarts)}  # fmt: skip
        return {
            "loss": mse + self.vqvae.cfg.commitment * commit,
            "mse": mse,
            "commit": commit,
            **{k: torch.tensor(v, device=mse.device) for k, v in logged.items()},
        }


def vqvae_loop(cfg: VQVAEConfig, train_maps: int) -> TrainLoopConfig:
    """The loop settings of the VQ-VAE fit: ``cfg.steps`` AdamW steps (``cfg.lr``, no weight decay)
    on batches of ``cfg.batch_size`` maps (at most ``train_maps``), the loop's warm-up (3% of the
    steps) + cosine schedule (to :attr:`VQVAEFitTask.final_lr_frac` of the peak) and clipping at 1.0, fp32 (the nearest-code search is not run in bf16), the data in
    this process (it is in memory)."""
    return TrainLoopConfig(
        steps=cfg.steps,
        batch_size=min(cfg.batch_size, train_maps),
        lr=cfg.lr,
        weight_decay=0.0,
        warmup_frac=0.03,
        precision="no",
        num_workers=0,
        seed=cfg.seed,
    )


class VQVAEFitTask(TrainTask):
    """``train_vqvae`` as a :class:`~perceptio_core.training.trainer.TrainTask` on ``maps``
    [N, 1, S, S] (:func:`~perceptio_core.depth.vqvae.prepare_maps`); the final save is the VQ-VAE's
    ``save_pretrained``."""

    name = "train_vqvae"
    final_lr_frac = 0.1  # the decoder keeps following the EMA codebook to the last step

    def __init__(self, maps: torch.Tensor, cfg: VQVAEConfig) -> None:
        self.maps = maps
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        return VQVAEFitModule(VQVAE(self.cfg))

    def build_dataset(self) -> Dataset:
        return MapDataset(self.maps)

    def build_collate(self) -> Any:
        return collate_maps

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model(batch["maps"])

    def trained_buffers(self, model: nn.Module) -> list[str]:
        return [f"vqvae.quantizer.{n}" for n, _ in model.vqvae.quantizer.named_buffers()]

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        model.vqvae.save_pretrained(out_dir)

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.maps.numpy().tobytes()).hexdigest()[:16]
        return {"maps": digest, "vqvae": to_dict(self.cfg)}


def train_vqvae(
    train_maps: np.ndarray,
    holdout_maps: np.ndarray,
    cfg: VQVAEConfig,
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    *,
    resume: bool = True,
    parents: dict[str, str] | None = None,
) -> dict[str, float]:
    """Train the depth VQ-VAE on teacher maps (module docstring).

    train_maps, holdout_maps: [N, H, W] and [M, H, W] float32 in [0, 1] (resized to
        ``cfg.input_size`` when H, W differ); both non-empty. The held-out maps are only scored.
    out_dir: a durable folder (checkpoints every 100 steps, ``history.jsonl``, loss plots,
        ``metrics.json``); a rerun with ``resume`` continues from its last checkpoint. The trained
        VQ-VAE is ``<out_dir>/model`` (``config.json`` + ``model.safetensors`` + the loop's
        ``meta.json``), loaded by :meth:`~perceptio_core.depth.vqvae.VQVAE.from_pretrained`.
    Returns the loop's metrics (``loss_first`` / ``loss_last``, ``mse_*``, ``commit_*``,
    ``batch_usage_*``, ``batch_perplexity_*``, ``steps``, ...) plus, from the saved model: on the
    held-out maps ``recon_mse``, ``recon_absrel`` and ``delta1`` against the teacher maps
    (:func:`~perceptio_core.depth.metrics.map_metrics`), ``train_recon_mse`` /
    ``train_recon_absrel`` / ``train_delta1`` alike on the training maps, ``code_usage`` (share of
    the K codes used) and ``perplexity`` over train + held-out maps
    (:func:`~perceptio_core.depth.vqvae.code_statistics`); ``restarts`` (dead codes restarted over
    the whole fit), ``train_maps``, ``holdout_maps`` and ``train_seconds``.
    """
    train = prepare_maps(train_maps, cfg.input_size)  # [N, 1, S, S]
    held = prepare_maps(holdout_maps, cfg.input_size)  # [M, 1, S, S]
    if train.shape[0] == 0 or held.shape[0] == 0:
        raise ValueError(f"train_vqvae: {train.shape[0]} training and {held.shape[0]} held-out maps; need both")
    t0 = time.perf_counter()
    metrics = run_training(
        VQVAEFitTask(train, cfg), vqvae_loop(cfg, train.shape[0]), out_dir, device=str(device), resume=resume,
        progress=progress, parents=parents,
    )  # fmt: skip
    out = Path(out_dir)
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics["train_maps"] = float(train.shape[0])
    metrics["holdout_maps"] = float(held.shape[0])
    metrics["restarts"] = float(sum(r.get("restarts", 0.0) for r in read_history(out / HISTORY)))
    model = VQVAE.from_pretrained(out / FINAL, device=device)
    names = {"mse": "recon_mse", "absrel": "recon_absrel", "delta1": "delta1"}
    rec_tr, idx_tr = reconstruct(model, train)
    rec_ho, idx_ho = reconstruct(model, held)
    metrics.update({f"train_{names[k]}": v for k, v in map_metrics(rec_tr[:, 0], train[:, 0]).items()})
    metrics.update({names[k]: v for k, v in map_metrics(rec_ho[:, 0], held[:, 0]).items()})
    stats = code_statistics(torch.cat([idx_tr.flatten(), idx_ho.flatten()]), cfg.codebook_size)
    metrics.update({"code_usage": stats["usage"], "perplexity": stats["perplexity"]})
    write_json(out / METRICS, metrics, indent=1)  # the loop's, with the scores
    return metrics


__all__ = ["MapDataset", "VQVAEFitModule", "VQVAEFitTask", "collate_maps", "train_vqvae", "vqvae_loop"]
