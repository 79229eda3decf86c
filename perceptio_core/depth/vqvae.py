"""The depth VQ-VAE (SPEC §2): [0, 1] depth maps <-> a grid x grid lattice of K codebook indices.

Encoder: stride-2 conv stages (``floor(log2(input_size / grid))`` of them; a factor that is not a
power of two is completed by a final area pooling to the grid), residual blocks, a 1x1 projection to
``code_dim``. Quantiser: :class:`EMAVectorQuantizer`, nearest-neighbour against K codes, codebook
moved by exponential moving averages of the assigned encoder outputs (no codebook gradient), dead
codes restarted from random encoder outputs of the batch, straight-through estimator, commitment
term returned unweighted (the caller weights it: ``vqvae.commitment``). Decoder: the mirror image
(transposed-conv stages, a final resize when needed) ending in a straight-through clamp to [0, 1]
(:class:`Decoder`), so maps stay in [0, 1] and the soft decoding of
:mod:`perceptio_core.depth.tokenizer` has a gradient everywhere.

AURORA's public depth VQ-VAE is the reference: 320 px, downsampling 32 to 10 x 10 = 100 tokens,
K = 128, EMA codebook, MSE. Our default world uses 80 px maps (x8). A saved model is ``config.json``
(the :class:`~perceptio_core.config.VQVAEConfig`) + ``model.safetensors``; loading reads safetensors
only, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from perceptio_core.config import VQVAEConfig
from perceptio_core.depth.metrics import map_metrics
from perceptio_core.device import ProgressFn, resolve_device, seed_everything

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# --------------------------------------------------------------------------------------------
# Quantiser
# --------------------------------------------------------------------------------------------


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantisation with an EMA codebook and dead-code restarts.

    Buffers: ``embed`` [K, D] (the codebook), ``cluster_size`` [K] (EMA of the number of vectors each
    code gets per batch), ``embed_avg`` [K, D] (EMA of their sum), ``initted``. The codebook is set
    from random encoder outputs of the first training batch (cluster sizes to
    ``dead_code_threshold``). Each training forward then moves the EMAs with ``decay``, sets
    ``embed = embed_avg / cluster_size`` (Laplace-smoothed), and restarts every code whose EMA
    cluster size fell below ``dead_code_threshold`` at a random encoder output of the batch. In eval
    mode nothing moves.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.decay, self.threshold, self.eps = decay, dead_code_threshold, eps
        self.register_buffer("embed", torch.randn(codebook_size, code_dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_avg", self.embed.clone())
        self.register_buffer("initted", torch.tensor(False))
        self.restarts = 0  # codes restarted since construction (not saved)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        idx = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        self.embed.copy_(flat[idx])
        self.cluster_size.fill_(max(self.threshold, 1.0))
        self.embed_avg.copy_(self.embed * self.cluster_size[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        flat = flat.to(self.embed.dtype)
        counts = torch.bincount(indices, minlength=self.codebook_size).to(flat.dtype)  # [K]
        sums = torch.zeros_like(self.embed).index_add_(0, indices, flat)  # [K, D]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        dead = self.cluster_size < self.threshold
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
            self.embed[dead] = flat[pick]
            self.cluster_size[dead] = max(self.threshold, 1.0)
            self.embed_avg[dead] = self.embed[dead] * self.cluster_size[dead][:, None]
            self.restarts += n_dead

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices [M] of the nearest codes (squared Euclidean) of vectors ``flat`` [M, D]."""
        e = self.embed.float()
        flat = flat.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # [M, K]
        return dist.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: [B, D, h, w] encoder output -> ``(quantized [B, D, h, w], indices [B, h, w], aux_loss)``.

        ``quantized`` carries the straight-through gradient to ``z``; ``aux_loss`` is the unweighted
        commitment term ``mean (z - sg(quantized))^2``.
        """
        b, d, h, w = z.shape
        zf = z.float()
        flat = zf.permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D]
        if self.training and not bool(self.initted):
            self._init_from(flat.detach())
        indices = self.nearest(flat.detach())
        # the codes the indices were chosen against (before this step's EMA update moves them)
        q = self.embed[indices].float().view(b, h, w, d).permute(0, 3, 1, 2)  # [B, D, h, w]
        if self.training:
            self._ema_update(flat.detach(), indices)
        aux = F.mse_loss(zf, q.detach())
        quantized = zf + (q - zf).detach()
        return quantized.to(z.dtype), indices.view(b, h, w), aux

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> codes [B, D, h, w] (the exact quantised latents)."""
        return self.embed[indices].permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """``x + conv3x3(relu(conv3x3(relu(x))))`` at constant width; [B, C, H, W] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def num_stages(input_size: int, grid: int) -> int:
    """Number of stride-2 stages: ``floor(log2(input_size / grid))``. A factor that is not a power of
    two leaves the encoder output larger than the grid; it is area-pooled to it (and the decoder
    output resized to ``input_size``). Raises ``ValueError`` below a factor of 2."""
    if grid <= 0 or input_size % grid or input_size // grid < 2:
        raise ValueError(
            f"vqvae.input_size ({input_size}) must be a multiple of vqvae.grid ({grid}) at least twice it"
        )
    return (input_size // grid).bit_length() - 1


def stage_widths(hidden: int, stages: int) -> list[int]:
    """Channel width after each downsampling stage: halving from ``hidden`` at the grid, at least 16."""
    return [max(16, hidden // 2 ** (stages - 1 - k)) for k in range(stages)]


class Encoder(nn.Module):
    """[B, 1, S, S] map -> [B, code_dim, grid, grid]."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = num_stages(cfg.input_size, cfg.grid)
        widths = stage_widths(cfg.hidden, n)
        layers: list[nn.Module] = []
        c_in = 1
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU(), ResBlock(c)]
            c_in = c
        layers += [ResBlock(c_in), nn.ReLU(), nn.Conv2d(c_in, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)
        self.grid = cfg.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        if z.shape[-2:] != (self.grid, self.grid):
            z = F.adaptive_avg_pool2d(z, self.grid)
        return z


class Decoder(nn.Module):
    """[B, code_dim, grid, grid] -> [B, 1, S, S] map in [0, 1].

    The last convolution's output is clamped to [0, 1] with a straight-through gradient (the forward
    value is clamped, the backward pass is the identity): unlike a sigmoid it does not flatten the
    gradient near 0 and 1, where most of a min-max normalised map lies (sky, far wall, nearest
    ground), and unlike a plain clamp it still passes a gradient from out-of-range pixels to the soft
    decoding of SPEC §3 L_rec.
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = num_stages(cfg.input_size, cfg.grid)
        widths = stage_widths(cfg.hidden, n)[::-1]  # from the grid outwards
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[0], 3, padding=1), ResBlock(widths[0])]
        for k, c in enumerate(widths):
            c_out = widths[k + 1] if k + 1 < n else max(16, c // 2)
            layers += [ResBlock(c), nn.ReLU(), nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(c_out, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.size = cfg.input_size

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        y = self.net(q)
        if y.shape[-1] != self.size or y.shape[-2] != self.size:
            y = F.interpolate(y, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return y + (y.clamp(0.0, 1.0) - y).detach()  # clamped values, identity gradient


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _arch_dict(cfg: VQVAEConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


class VQVAE(nn.Module):
    """Depth VQ-VAE: ``encode`` -> ``quantize`` -> ``decode``. Maps are [B, 1, S, S] in [0, 1] with
    S = ``cfg.input_size``; latents [B, code_dim, grid, grid]; indices [B, grid, grid]."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = EMAVectorQuantizer(
            cfg.codebook_size, cfg.code_dim, decay=cfg.ema_decay, dead_code_threshold=cfg.dead_code_threshold
        )
        self.decoder = Decoder(cfg)

    @property
    def codebook(self) -> torch.Tensor:
        """The codebook [K, D]."""
        return self.quantizer.embed

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the encoder/decoder weights (inputs are cast to it)."""
        return self.decoder.net[0].weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, S, S] -> encoder output [B, D, grid, grid] (before quantisation)."""
        return self.encoder(x.to(self.dtype))

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, S, S] -> nearest-code indices [B, grid, grid]. Never moves the codebook, whatever
        the module's train/eval mode (a parent's ``.train()`` does not reach the EMA here)."""
        z = self.encode(x)  # [B, D, g, g]
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, g, g] -> ``(quantized [B, D, g, g], indices [B, g, g], aux_loss)``."""
        return self.quantizer(z)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, D, g, g] -> map [B, 1, S, S] in [0, 1]."""
        return self.decoder(q.to(self.dtype))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, g, g] -> map [B, 1, S, S]."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, 1, S, S] -> ``(recon [B, 1, S, S], indices [B, g, g], aux_loss)``."""
        q, idx, aux = self.quantize(self.encode(x))
        return self.decode(q), idx, aux

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (the VQVAEConfig) and ``model.safetensors`` (weights and codebook EMAs)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt", "model": "perceptio-depth-vqvae"})
        (d / CONFIG_NAME).write_text(json.dumps(_arch_dict(self.cfg), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VQVAE:
        """Load a model saved by :meth:`save_pretrained` (safetensors only), in eval mode on ``device``."""
        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"VQ-VAE checkpoint incomplete: {str(p)!r} not found")
        raw = json.loads(cfg_path.read_text())
        known = {f.name for f in dataclasses.fields(VQVAEConfig) if f.init}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{str(cfg_path)!r}: unknown VQ-VAE config keys {unknown}")
        model = cls(VQVAEConfig(**raw))
        model.load_state_dict(load_file(str(w_path)), strict=True)
        return model.to(resolve_device(device)).eval()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _as_maps(maps: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W] (or [N, 1, H, W]) in [0, 1] -> float32 tensor [N, 1, size, size] (bilinear resize)."""
    t = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).float()
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"maps must be [N, H, W] or [N, 1, H, W], got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("maps contain NaN or inf")
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.clamp(0.0, 1.0)


def code_statistics(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Code usage (share of the K codes that occur) and perplexity ``exp(entropy)`` of the code
    histogram of ``indices`` (any shape)."""
    counts = torch.bincount(indices.flatten().cpu(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    return {
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
    }


@torch.no_grad()
def reconstruct(
    model: VQVAE, maps: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """maps [N, 1, S, S] -> ``(recon [N, 1, S, S] on CPU, indices [N, g, g])`` in eval mode."""
    model.eval()
    dev = next(model.parameters()).device
    recs, idxs = [], []
    for i in range(0, maps.shape[0], batch_size):
        r, idx, _ = model(maps[i : i + batch_size].to(dev))
        recs.append(r.float().cpu())
        idxs.append(idx.cpu())
    return torch.cat(recs), torch.cat(idxs)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_vqvae(
    maps: np.ndarray,
    cfg: VQVAEConfig,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    holdout: np.ndarray | None = None,
) -> tuple[VQVAE, dict[str, float], list[dict[str, float]]]:
    """Train the depth VQ-VAE on teacher maps.

    maps: [N, H, W] float32 in [0, 1] (resized to ``cfg.input_size`` when H, W differ).
    holdout: [M, H, W] maps for the metrics; ``None``: a seeded ``cfg.holdout_fraction`` of ``maps`` is
        held out (never trained on).
    Training: ``cfg.steps`` AdamW steps on batches of ``cfg.batch_size`` maps (random horizontal flips),
    loss ``MSE(recon, map) + cfg.commitment * commitment``, EMA codebook (``cfg.ema_decay``) with
    dead-code restarts (``cfg.dead_code_threshold``), warm-up then cosine to 10% of ``cfg.lr``,
    gradient clipping at 1.0.
    Returns ``(model in eval mode, metrics, history)``. metrics: on the held-out maps ``recon_mse``,
    ``recon_absrel`` and ``delta1`` against the teacher maps
    (:func:`~perceptio_core.depth.metrics.map_metrics`), ``train_recon_mse`` /
    ``train_recon_absrel`` / ``train_delta1`` alike on the training maps, ``code_usage`` (share of
    the K codes used) and ``perplexity`` over train + held-out maps, ``restarts`` (dead codes
    restarted), ``train_maps``, ``holdout_maps``, ``steps`` and ``train_seconds``.
    history: one dict per logged step (``step``, ``loss``, ``mse``, ``commit``, ``batch_usage``,
    ``batch_perplexity``, ``restarts``, ``lr``).
    """
    dev = resolve_device(device)
    t0 = time.perf_counter()
    gen = seed_everything(cfg.seed)
    data = _as_maps(maps, cfg.input_size)
    if holdout is None:
        n = data.shape[0]
        k = int(round(n * cfg.holdout_fraction))
        if cfg.holdout_fraction > 0 and n >= 2:
            k = max(k, 1)
        perm = torch.from_numpy(np.random.default_rng(cfg.seed).permutation(n))
        train, held = data[perm[k:]], data[perm[:k]]
    else:
        train, held = data, _as_maps(holdout, cfg.input_size)
    if train.shape[0] == 0:
        raise ValueError("train_vqvae: no training maps")

    model = VQVAE(cfg).to(dev).train()
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, int(0.03 * cfg.steps))
    bs = min(cfg.batch_size, train.shape[0])
    history: list[dict[str, float]] = []
    log_every = max(1, cfg.steps // 30)
    order, pos = torch.randperm(train.shape[0], generator=gen), 0
    for step in range(cfg.steps):
        if pos + bs > train.shape[0]:
            order, pos = torch.randperm(train.shape[0], generator=gen), 0
        x = train[order[pos : pos + bs]]
        pos += bs
        flip = torch.rand(bs, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(dev)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.steps, cfg.lr, warmup)
        recon, idx, commit = model(x)
        mse = F.mse_loss(recon.float(), x)
        loss = mse + cfg.commitment * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            stats = code_statistics(idx, cfg.codebook_size)
            row = {
                "step": float(step + 1),
                "loss": float(loss.detach()),
                "mse": float(mse.detach()),
                "commit": float(commit.detach()),
                "batch_usage": stats["usage"],
                "batch_perplexity": stats["perplexity"],
                "restarts": float(model.quantizer.restarts),
                "lr": opt.param_groups[0]["lr"],
            }
            history.append(row)
            if progress is not None:
                progress(step + 1, cfg.steps, row)
    train_seconds = time.perf_counter() - t0
    opt.zero_grad(set_to_none=True)

    model.eval()
    metrics: dict[str, float] = {
        "train_maps": float(train.shape[0]),
        "holdout_maps": float(held.shape[0]),
        "steps": float(cfg.steps),
        "restarts": float(model.quantizer.restarts),
        "train_seconds": train_seconds,
    }
    names = {"mse": "recon_mse", "absrel": "recon_absrel", "delta1": "delta1"}
    rec_tr, idx_tr = reconstruct(model, train)
    metrics.update({f"train_{names[k]}": v for k, v in map_metrics(rec_tr[:, 0], train[:, 0]).items()})
    all_idx = [idx_tr]
    if held.shape[0]:
        rec_ho, idx_ho = reconstruct(model, held)
        metrics.update({names[k]: v for k, v in map_metrics(rec_ho[:, 0], held[:, 0]).items()})
        all_idx.append(idx_ho)
    stats = code_statistics(torch.cat([i.flatten() for i in all_idx]), cfg.codebook_size)
    metrics.update({"code_usage": stats["usage"], "perplexity": stats["perplexity"]})
    return model, metrics, history
