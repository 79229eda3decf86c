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
only, never pickle. The fit is :mod:`perceptio_core.training.vqvae_fit`, on the one training loop;
:func:`prepare_maps`, :func:`reconstruct` and :func:`code_statistics` are what it and the stages
use to feed maps in and measure the codes that come out.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from perceptio_core.config import VQVAEConfig
from perceptio_core.depth.metrics import resize_map
from perceptio_core.device import resolve_device

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# --------------------------------------------------------------------------------------------
# Quantiser
# --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> None:
    """Sum ``t`` over the processes of a distributed run, in place (nothing in one process)."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _broadcast(t: torch.Tensor) -> None:
    """Process 0's ``t`` into every process, in place (nothing in one process)."""
    if _distributed():
        dist.broadcast(t, src=0)


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantisation with an EMA codebook and dead-code restarts.

    Buffers: ``embed`` [K, D] (the codebook), ``cluster_size`` [K] (EMA of the number of vectors each
    code gets per batch), ``embed_avg`` [K, D] (EMA of their sum), ``initted``. The codebook is set
    from random encoder outputs of the first training batch (cluster sizes to
    ``dead_code_threshold``). Each training forward then moves the EMAs with ``decay``, sets
    ``embed = embed_avg / cluster_size`` (Laplace-smoothed), and restarts every code whose EMA
    cluster size fell below ``dead_code_threshold`` at a random encoder output of the batch. In eval
    mode nothing moves.

    Under several processes (``torch.distributed`` initialised) the assignment counts and sums are
    summed over the processes before the EMA step, so every process moves the codebook as one
    process would on the global batch; the initial and restarted codes are process 0's.
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
        _broadcast(self.embed)
        self.cluster_size.fill_(max(self.threshold, 1.0))
        self.embed_avg.copy_(self.embed * self.cluster_size[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        flat = flat.to(self.embed.dtype)
        counts = torch.bincount(indices, minlength=self.codebook_size).to(flat.dtype)  # [K]
        sums = torch.zeros_like(self.embed).index_add_(0, indices, flat)  # [K, D]
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
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
            _broadcast(self.embed)
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
        quantized = q + (zf - zf.detach())  # the value is exactly q, the gradient reaches z unchanged
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
# Maps in, codes out
# --------------------------------------------------------------------------------------------


def prepare_maps(maps: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """The VQ-VAE's input: maps [N, H, W] (or [N, 1, H, W]) in [0, 1] -> float32 [N, 1, size, size],
    resized by :func:`~perceptio_core.depth.metrics.resize_map` and clamped to [0, 1]. Raises
    ``ValueError`` on another shape or a non-finite value."""
    a = np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float32)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"maps must be [N, H, W] or [N, 1, H, W], got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("maps contain NaN or inf")
    return torch.from_numpy(resize_map(a, size)).clamp(0.0, 1.0)[:, None]


def code_statistics(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Code usage (share of the K codes that occur) and perplexity ``exp(entropy)`` of the code
    histogram of ``indices`` (integer codes in [0, K), any shape)."""
    counts = torch.bincount(indices.flatten().long().cpu(), minlength=codebook_size).double()
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
