"""Shared builders for the Perceptio model tests: a trained tiny tokenizer, a small real (frozen,
randomly initialised) depth tokenizer, tiny configs, and examples. Not a test module (no ``test_``
prefix)."""

from __future__ import annotations

import functools
from typing import Any
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from perceptio_core.model.batching import TrainExample
from perceptio_core.config import LossConfig, ModelConfig, VQVAEConfig
from perceptio_core.model.internvl import train_tokenizer
from perceptio_core.format.target import format_target

CORPUS = [
    "a red cube on the left of the blue sphere",
    "the green cylinder is near the camera",
    "what colour is the box in the middle of the room?",
    "Please segment the object described as: the small yellow ball.",
    "Show its mask and the depth of the scene before answering.",
    "The object is a large metal cube on the right.",
    "Which point is the closest to the camera? (A) (B) (C)",
] * 20


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared CPU: one intra-op thread is 10-80x faster than spinning on two busy
    cores. Import this into a test module to apply it there (restored after the module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class StandInDepthTokenizer(nn.Module):
    """A small frozen stand-in :class:`~perceptio_core.depth.codec.DepthCodec` (``encode``,
    ``decode``, ``soft_decode``; ``codebook_size``, ``num_tokens``, ``grid``, ``map_size``) as an
    ``nn.Module``: K codes of dimension D on a g x g grid, decoded by a fixed 1x1 convolution to
    map_size x map_size. Test modules use it where the real tokenizer's training is beside the
    point; the model tests use :func:`tiny_depth_tokenizer` (the real class)."""

    def __init__(self, codebook_size: int = 16, grid: int = 3, code_dim: int = 8, input_size: int = 12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.codebook_size = codebook_size
        self.grid = grid
        self.num_tokens = grid * grid
        self.map_size = input_size
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim, generator=g), requires_grad=False)
        self.decoder = nn.Conv2d(code_dim, 1, kernel_size=1)
        with torch.no_grad():
            self.decoder.weight.copy_(torch.randn(1, code_dim, 1, 1, generator=g) * 0.3)
            self.decoder.bias.fill_(0.5)
        for p in self.parameters():
            p.requires_grad_(False)

    def _decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        b = vectors.shape[0]
        grid = vectors.transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # [B, D, g, g]
        out = self.decoder(grid)  # [B, 1, g, g]
        return F.interpolate(out, size=(self.map_size, self.map_size), mode="nearest")[:, 0]

    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(maps[:, None].float(), self.grid).flatten(1)  # [B, N]
        levels = self.codebook[:, 0]  # [K]
        return (pooled[..., None] - levels).abs().argmin(-1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self._decode_vectors(self.codebook[indices])

    def soft_decode(self, logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        p = torch.softmax(logits / tau, dim=-1)  # [B, N, K]
        return self._decode_vectors(p @ self.codebook)


def tiny_depth_tokenizer(codebook_size: int = 16, grid: int = 3, input_size: int = 12, seed: int = 0):
    """The real :class:`DepthTokenizer` over a small, randomly initialised (seeded) VQ-VAE:
    K codes of dimension 8 on a grid x grid lattice (N = grid^2), maps input_size x input_size."""
    from perceptio_core.depth.tokenizer import DepthTokenizer
    from perceptio_core.depth.vqvae import VQVAE

    cfg = VQVAEConfig(codebook_size=codebook_size, code_dim=8, grid=grid, input_size=input_size, hidden=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DepthTokenizer(VQVAE(cfg))


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_dir() -> str:
    import atexit
    import shutil
    import tempfile

    out = tempfile.mkdtemp(prefix="perceptio-tok-")
    atexit.register(shutil.rmtree, out, True)
    train_tokenizer(CORPUS, 400, out)
    return out


def tiny_tokenizer():
    """A fresh copy of the tiny BPE tokenizer (trained once per session)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_trained_tokenizer_dir())


def tiny_model_config(**overrides) -> ModelConfig:
    cfg = ModelConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def png_bytes(h: int = 40, w: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def examples(num_tokens: int, codebook_size: int) -> list[TrainExample]:
    """Two examples with blocks of N = ``num_tokens`` codes below K = ``codebook_size`` (the model's
    codec's): one with mask, block and teacher map; one with block only (no mask)."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, codebook_size, num_tokens).tolist()
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[10:25, 5:30] = 1
    depth = rng.random((20, 20)).astype(np.float32)
    return [
        TrainExample(
            image=png_bytes(seed=0),
            prompt="Please segment the object described as: the red cube.",
            target=format_target(True, codes, "The object is a red cube."),
            mask=mask,
            depth_tokens=codes,
            depth_map=depth,
        ),
        TrainExample(
            image=png_bytes(seed=1),
            prompt="Which point is the closest to the camera?",
            target=format_target(False, codes[::-1], "(A)"),
            mask=None,
            depth_tokens=codes[::-1],
            depth_map=None,
        ),
    ]


def build_tiny(depth_tokenizer=None, **cfg_overrides):
    """A tiny PerceptioModel (tiny InternVL, tiny SAM2, a small real DepthTokenizer)."""
    from perceptio_core.model.perceptio_model import PerceptioModel

    dt = depth_tokenizer if depth_tokenizer is not None else tiny_depth_tokenizer()
    return PerceptioModel.build(tiny_model_config(**cfg_overrides), LossConfig(), dt, tokenizer=tiny_tokenizer())


def tiny_vqvae_config(**kw) -> VQVAEConfig:
    """A VQ-VAE of K = 16 codes on a 4 x 4 grid of 32 px maps, 60 steps (``kw`` overrides)."""
    base = dict(codebook_size=16, code_dim=8, grid=4, input_size=32, hidden=16, steps=60, batch_size=8,
                lr=2e-3, seed=0)  # fmt: skip
    base.update(kw)
    return VQVAEConfig(**base)


def smooth_maps(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Ground-plane-like maps [n, size, size] in [0, 1]: a vertical ramp (near at the bottom) plus
    a brighter blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for _ in range(n):
        ramp = np.clip((y - rng.uniform(0.2, 0.5)) / 0.6, 0, 1)
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.4, 0.8), rng.uniform(0.08, 0.2)
        blob = ((x - cx) ** 2 + (y - cy) ** 2 < r**2) * rng.uniform(0.3, 1.0)
        m = np.maximum(ramp, blob)
        out.append((m - m.min()) / (m.max() - m.min()))
    return np.stack(out).astype(np.float32)


def run_trainer(task: Any, loop: Any, out: Any, stop_at: int | None = None) -> Any:
    """A :class:`~perceptio_core.training.trainer.Trainer` of ``task`` set up, resumed from ``out``
    if it holds a checkpoint, and trained (to ``stop_at``: a run "killed" there)."""
    from perceptio_core.training.trainer import Trainer

    t = Trainer(task, loop, out, device="cpu")
    t.setup()
    t.resume()
    t.train(stop_at=stop_at)
    return t


def trained_state(t: Any) -> dict[str, torch.Tensor]:
    """A copy of the state dict (weights and buffers) of a trainer's unwrapped model."""
    return {k: v.detach().clone() for k, v in t.accelerator.unwrap_model(t.model).state_dict().items()}
