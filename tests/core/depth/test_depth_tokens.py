"""The depth tokenizer (SPEC §2 tokenize, §3 L_rec): round trips, soft decoding, frozen weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceptio_core.config import VQVAEConfig
from perceptio_core.depth.tokenizer import DepthTokenizer
from perceptio_core.depth.vqvae import VQVAE
from perceptio_core.training.vqvae_fit import train_vqvae

from perceptio_helpers import one_torch_thread  # noqa: F401

K, GRID, SIZE = 16, 4, 32
N = GRID * GRID


def maps(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, size)[:, None]
    out = [np.clip((y - rng.uniform(0.1, 0.5)) * rng.uniform(1.5, 3.0), 0, 1) * np.ones((1, size))
           for _ in range(n)]
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> DepthTokenizer:
    cfg = VQVAEConfig(codebook_size=K, code_dim=8, grid=GRID, input_size=SIZE, hidden=16, steps=20,
                      batch_size=8, seed=0)
    out = tmp_path_factory.mktemp("vqvae")
    data = maps(24)
    train_vqvae(data[:22], data[22:], cfg, out, "cpu")
    return DepthTokenizer.from_pretrained(out / "model")


def test_encode_shapes_inputs_and_range(tokenizer):
    x = maps(3, seed=5)
    idx = tokenizer.encode(x)
    assert idx.shape == (3, N) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < K
    assert torch.equal(idx, tokenizer.encode(torch.from_numpy(x)[:, None]))  # [B, 1, H, W] tensor
    # maps of another size are resized first
    big = F.interpolate(torch.from_numpy(x)[:, None], size=(48, 48), mode="bilinear", align_corners=False)
    assert tokenizer.encode(big[:, 0]).shape == (3, N)


def test_round_trip_reproduces_the_quantised_reconstruction(tokenizer):
    x = torch.from_numpy(maps(4, seed=7))
    with torch.no_grad():
        recon, idx, _ = tokenizer.vqvae(x[:, None])
    tokens = tokenizer.encode(x)
    assert torch.equal(tokens, idx.flatten(1))  # row-major grid order
    decoded = tokenizer.decode(tokens)
    assert decoded.shape == (4, SIZE, SIZE)
    assert torch.equal(decoded, recon[:, 0])
    assert torch.equal(tokenizer.encode(decoded), tokenizer.encode(tokenizer.decode(tokenizer.encode(decoded))))


def test_soft_decode_of_sharp_logits_equals_decode(tokenizer):
    idx = torch.randint(0, K, (2, N), generator=torch.Generator().manual_seed(0))
    logits = 1e4 * F.one_hot(idx, K).float()
    torch.testing.assert_close(tokenizer.soft_decode(logits), tokenizer.decode(idx), atol=1e-6, rtol=0)
    # a small temperature sharpens ordinary logits to the argmax as well
    soft = torch.randn(2, N, K, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tokenizer.soft_decode(soft, tau=1e-4), tokenizer.decode(soft.argmax(-1)),
                               atol=1e-5, rtol=0)


def test_gradients_reach_logits_not_the_frozen_tokenizer(tokenizer):
    logits = torch.randn(2, N, K, requires_grad=True)
    out = tokenizer.soft_decode(logits, tau=0.8)
    target = torch.rand_like(out)
    F.mse_loss(out, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tokenizer.vqvae.parameters())
    assert not tokenizer.codebook.requires_grad and tokenizer.codebook.grad is None


def test_variable_length_spans_are_truncated_or_padded(tokenizer):
    g = torch.Generator().manual_seed(2)
    full = torch.randn(1, N, K, generator=g)
    longer = torch.cat([full, torch.randn(1, 5, K, generator=g)], dim=1)
    torch.testing.assert_close(tokenizer.soft_decode(longer), tokenizer.soft_decode(full))
    short = full[:, : N - 3]
    padded = torch.cat([short, torch.zeros(1, 3, K)], dim=1)  # uniform p: the mean codebook vector
    torch.testing.assert_close(tokenizer.soft_decode(short), tokenizer.soft_decode(padded))
    # a batch of spans of different lengths, as a list
    spans = [full[0], short[0], longer[0]]
    out = tokenizer.soft_decode(spans)
    assert out.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(out[1], tokenizer.soft_decode(padded)[0])
    with pytest.raises(ValueError):
        tokenizer.soft_decode(torch.randn(1, N, K + 1))
    with pytest.raises(ValueError):
        tokenizer.soft_decode(full, tau=0.0)


def test_decode_validates_indices(tokenizer):
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        tokenizer.decode(torch.zeros(1, N - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode(torch.full((1, N), K))


def test_save_and_from_pretrained_give_equal_outputs(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = DepthTokenizer.from_pretrained(tmp_path / "tok")
    x = maps(3, seed=9)
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    idx = tokenizer.encode(x)
    assert torch.equal(loaded.decode(idx), tokenizer.decode(idx))
    logits = torch.randn(3, N, K)
    torch.testing.assert_close(loaded.soft_decode(logits), tokenizer.soft_decode(logits), atol=0, rtol=0)


def test_parent_train_mode_never_moves_the_codebook(tokenizer):
    before = tokenizer.codebook.clone()
    tokenizer.vqvae.train()  # as a parent model's .train() would
    try:
        tokenizer.encode(maps(4, seed=11) * 0.3)
    finally:
        tokenizer.vqvae.eval()
    assert torch.equal(before, tokenizer.codebook)


def test_low_precision_weights_decode(tmp_path):
    torch.manual_seed(0)
    tok = DepthTokenizer(VQVAE(VQVAEConfig(codebook_size=K, code_dim=8, grid=GRID, input_size=SIZE, hidden=16)))
    tok.vqvae.to(torch.bfloat16)
    idx = tok.encode(maps(2))
    assert tok.decode(idx).dtype == torch.bfloat16
    assert tok.soft_decode(torch.randn(2, N, K)).shape == (2, SIZE, SIZE)
