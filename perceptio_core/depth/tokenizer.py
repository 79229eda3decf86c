"""The depth tokenizer shared by training and inference (SPEC §2 "Tokenize", §3 L_rec).

:class:`DepthTokenizer` wraps a trained, frozen :class:`~perceptio_core.depth.vqvae.VQVAE` (an
``nn.Module`` whose only submodule is that VQ-VAE, so it moves with ``.to`` and stays in eval mode).
It is a :class:`~perceptio_core.depth.codec.DepthCodec`: its ``codebook_size`` (K), ``num_tokens``
(N), ``grid`` and ``map_size`` come from the VQ-VAE's config, which ``from_pretrained`` reads from
the codebook artifact, and every later stage takes K and N from it.

* ``encode(maps)``: depth maps -> N = grid x grid code indices per map, row-major (SPEC §1: N = 100).
* ``decode(indices)``: indices -> maps (the quantised reconstruction).
* ``soft_decode(logits, tau)``: the soft depth reconstruction of SPEC §3 L_rec. For each position t,
  ``p_t = softmax(logits_t / tau)`` over the K codes, ``e_t = sum_k p_{t,k} c_k``; the N vectors are
  laid out on the grid and decoded by the frozen decoder. Gradients reach the logits only: the
  codebook is a buffer and the decoder's parameters have ``requires_grad=False``.

Temperature convention: we divide, ``softmax(logits / tau)``, so tau < 1 sharpens and tau -> 0 gives
the argmax code. AiT writes ``softmax(logits x tau)`` with tau about 0.8; that is our ``tau = 1 / 0.8
= 1.25``.

Variable-length spans: a generated span may hold fewer or more than N code positions. Longer spans
are truncated to their first N positions. Shorter ones are padded at the end with positions of
uniform probability over the K codes, whose soft embedding is the mean codebook vector: a neutral
"no information" latent, the same for every missing position, and still differentiable for the
positions that exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from perceptio_core.depth.vqvae import VQVAE


class DepthTokenizer(nn.Module):
    """Frozen VQ-VAE tokenizer: maps [B, H, W] <-> indices [B, N] (N = grid * grid, row-major).

    Input maps are [0, 1] teacher maps (SPEC §2 normalisation) of any size; they are resized
    bilinearly to the VQ-VAE's ``input_size`` S before encoding. Decoded maps are [B, S, S].
    A :class:`~perceptio_core.depth.codec.DepthCodec`.
    """

    def __init__(self, vqvae: VQVAE):
        super().__init__()
        self.vqvae = vqvae.eval()
        for p in self.vqvae.parameters():
            p.requires_grad_(False)
            p.grad = None
        cfg = vqvae.cfg
        self.grid = cfg.grid
        self.num_tokens = cfg.grid * cfg.grid
        self.codebook_size = cfg.codebook_size
        self.code_dim = cfg.code_dim
        self.map_size = cfg.input_size
        self.eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> DepthTokenizer:
        """Load the VQ-VAE saved by ``VQVAE.save_pretrained`` (config.json + model.safetensors)."""
        return cls(VQVAE.from_pretrained(directory, device=device))

    def train(self, mode: bool = True) -> DepthTokenizer:
        """Always eval: the tokenizer is frozen (a parent's ``.train()`` leaves it in eval mode)."""
        return super().train(False)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the underlying VQ-VAE (config.json + model.safetensors)."""
        self.vqvae.save_pretrained(directory)

    @property
    def device(self) -> torch.device:
        return self.vqvae.codebook.device

    @property
    def codebook(self) -> torch.Tensor:
        """The frozen codebook [K, D]."""
        return self.vqvae.codebook

    def _maps(self, maps: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(maps) if not isinstance(maps, torch.Tensor) else maps
        t = t.to(self.device, torch.float32)
        if t.ndim == 2:
            t = t[None]
        if t.ndim == 3:
            t = t[:, None]
        if t.ndim != 4 or t.shape[1] != 1:
            raise ValueError(f"maps must be [B, H, W] or [B, 1, H, W], got {tuple(t.shape)}")
        if t.shape[-2:] != (self.map_size, self.map_size):
            t = F.interpolate(t, size=(self.map_size, self.map_size), mode="bilinear", align_corners=False)
        return t.clamp(0.0, 1.0)

    @torch.no_grad()
    def encode(self, maps: np.ndarray | torch.Tensor) -> torch.Tensor:
        """maps [B, H, W] or [B, 1, H, W] in [0, 1] -> LongTensor [B, N] of code indices, row-major."""
        return self.vqvae.encode_indices(self._maps(maps)).flatten(1).long()

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices, device=self.device).long()
        if idx.ndim == 1:
            idx = idx[None]
        if idx.ndim != 2 or idx.shape[1] != self.num_tokens:
            raise ValueError(f"indices must be [B, {self.num_tokens}], got {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(f"indices out of range [0, {self.codebook_size})")
        return idx

    @torch.no_grad()
    def decode(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """indices [B, N] (or [N]) -> maps [B, S, S] in [0, 1]: the quantised reconstruction."""
        idx = self._check_indices(torch.as_tensor(indices))
        grid = idx.view(-1, self.grid, self.grid)
        return self.vqvae.decode_indices(grid)[:, 0]

    def _pad_logits(self, logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, L, K] or a list of [L_b, K] -> [B, N, K]: truncated to N, padded with zero logits
        (uniform probabilities at any temperature)."""
        rows = list(logits) if not isinstance(logits, torch.Tensor) else None
        if rows is None:
            lg = logits
            if lg.ndim == 2:
                lg = lg[None]
            if lg.ndim != 3 or lg.shape[-1] != self.codebook_size:
                raise ValueError(f"logits must be [B, L, {self.codebook_size}], got {tuple(lg.shape)}")
            rows = list(lg.unbind(0))
        out = []
        for r in rows:
            if r.ndim != 2 or r.shape[-1] != self.codebook_size:
                raise ValueError(f"each span must be [L, {self.codebook_size}], got {tuple(r.shape)}")
            r = r[: self.num_tokens]
            if r.shape[0] < self.num_tokens:
                r = F.pad(r, (0, 0, 0, self.num_tokens - r.shape[0]))
            out.append(r)
        return torch.stack(out)

    def soft_decode(self, logits: torch.Tensor | Sequence[torch.Tensor], tau: float = 1.0) -> torch.Tensor:
        """Differentiable decoding of code logits (SPEC §3 L_rec).

        logits: [B, L, K] (or a list of B spans [L_b, K]) over the K depth codes only; L != N is
            truncated / padded (module docstring).
        tau: temperature, ``p = softmax(logits / tau)``.
        Returns maps [B, S, S] in [0, 1], carrying gradients to ``logits`` (not to the frozen
        codebook or decoder). With one-hot-sharp logits this equals :meth:`decode` of the argmax.
        """
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        lg = self._pad_logits(logits).to(self.device)  # [B, N, K]
        p = torch.softmax(lg.float() / tau, dim=-1)  # [B, N, K]
        cb = self.codebook.detach()
        e = p.to(cb.dtype) @ cb  # [B, N, D]
        latent = e.transpose(1, 2).reshape(-1, self.code_dim, self.grid, self.grid)  # [B, D, g, g]
        return self.vqvae.decode(latent)[:, 0]
