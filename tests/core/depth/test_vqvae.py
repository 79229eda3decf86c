"""The depth VQ-VAE (SPEC §2): shapes, the EMA quantiser, dead-code restarts, save/load, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perceptio_core.config import ConfigError, VQVAEConfig
from perceptio_core.depth.vqvae import VQVAE, EMAVectorQuantizer, code_statistics, num_stages, train_vqvae


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**kw) -> VQVAEConfig:
    base = dict(codebook_size=16, code_dim=8, grid=4, input_size=32, hidden=16, steps=60, batch_size=8,
                lr=2e-3, seed=0)
    base.update(kw)
    return VQVAEConfig(**base)


def smooth_maps(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Ground-plane-like maps: a vertical ramp (near at the bottom) plus a brighter blob, in [0, 1]."""
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


def test_num_stages_and_latent_shapes():
    assert num_stages(80, 10) == 3 and num_stages(320, 10) == 5 and num_stages(40, 10) == 2
    assert num_stages(60, 10) == 2  # x6: two stride-2 stages, then area pooling 15 -> 10
    for size, grid in ((32, 4), (24, 4), (48, 4)):
        m = VQVAE(tiny_cfg(input_size=size, grid=grid)).eval()
        x = torch.rand(2, 1, size, size)
        z = m.encode(x)
        assert z.shape == (2, 8, grid, grid)
        with torch.no_grad():
            recon, idx, aux = m(x)
        assert recon.shape == (2, 1, size, size) and idx.shape == (2, grid, grid)
        assert 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0
        assert aux.ndim == 0


def test_config_rejects_bad_factor():
    with pytest.raises(ConfigError, match="multiple of vqvae.grid"):
        VQVAEConfig(input_size=85, grid=10)
    with pytest.raises(ConfigError, match="at least twice"):
        VQVAEConfig(input_size=10, grid=10)


def test_quantizer_lookup_round_trip_and_straight_through():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(8, 4).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, idx, aux = q(z)
    # indices -> codes == quantized output (z + (q - z) equals q up to rounding)
    assert torch.allclose(quantized.detach(), q.lookup(idx), atol=1e-6)
    assert aux.item() == pytest.approx(((z - q.lookup(idx)) ** 2).mean().item(), rel=1e-5)
    quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through: identity gradient
    # nearest code by brute force
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, q.embed).argmin(1)
    assert torch.equal(idx.flatten(), brute)


def test_eval_mode_never_moves_the_codebook():
    q = EMAVectorQuantizer(8, 4)
    q(torch.randn(2, 4, 3, 3))  # training forward: data init + one EMA step
    before = q.embed.clone()
    q.eval()
    q(torch.randn(2, 4, 3, 3) * 5)
    assert torch.equal(before, q.embed)


def test_ema_moves_a_code_towards_its_vectors():
    q = EMAVectorQuantizer(1, 2, decay=0.5, dead_code_threshold=0.0)
    q.embed.copy_(torch.tensor([[0.0, 0.0]]))
    q.cluster_size.fill_(1.0)
    q.embed_avg.copy_(q.embed)
    q.initted.fill_(True)
    z = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)  # two vectors at (2, 4)
    q(z)
    # cluster: 0.5 * 1 + 0.5 * 2 = 1.5; sum: 0.5 * 0 + 0.5 * (4, 8) = (2, 4) -> code (4/3, 8/3)
    assert q.cluster_size.item() == pytest.approx(1.5)
    np.testing.assert_allclose(q.embed[0].numpy(), [4 / 3, 8 / 3], rtol=1e-4)


def test_dead_codes_are_restarted_at_batch_vectors():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(4, 2, decay=0.99, dead_code_threshold=1.0)
    # code 0 sits on the data; codes 1-3 far away, never chosen
    q.embed.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
    q.cluster_size.fill_(1.0)
    q.embed_avg.copy_(q.embed)
    q.initted.fill_(True)
    data = torch.cat([torch.randn(8, 2) * 0.1, torch.randn(8, 2) * 0.1 + 3.0])  # two clusters
    z = data.t().reshape(1, 2, 4, 4)
    _, idx, _ = q(z)
    assert set(idx.flatten().tolist()) == {0}  # all went to the only live code
    assert q.restarts == 3  # 1 -> 0.99 < 1: the three unused codes restart...
    assert bool((q.embed[1:].abs() < 4).all())  # ... at vectors of the batch
    # after a few more steps both clusters have their own codes
    for _ in range(5):
        _, idx, _ = q(z)
    q.eval()
    _, idx, _ = q(z)
    first, second = set(idx.flatten()[:8].tolist()), set(idx.flatten()[8:].tolist())
    assert first.isdisjoint(second)
    assert code_statistics(idx, 4)["usage"] >= 0.5


def test_code_statistics_by_hand():
    s = code_statistics(torch.tensor([0, 0, 1, 1]), 4)
    assert s["usage"] == 0.5 and s["perplexity"] == pytest.approx(2.0)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    m = VQVAE(cfg)
    m.train()
    m(torch.rand(4, 1, 32, 32))  # initialise the codebook from data, move the EMAs
    m.eval()
    m.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["codebook_size"] == 16
    assert "quantizer.embed" in load_file(str(tmp_path / "vq" / "model.safetensors"))
    loaded = VQVAE.from_pretrained(tmp_path / "vq")
    assert not loaded.training
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        a, ia, _ = m(x)
        b, ib, _ = loaded(x)
    assert torch.equal(ia, ib) and torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "vq" / "model.safetensors").unlink()
        VQVAE.from_pretrained(tmp_path / "vq")


def test_train_vqvae_learns_and_keeps_codes_alive():
    maps = smooth_maps(48)
    cfg = tiny_cfg()
    model, metrics, history = train_vqvae(maps, cfg, "cpu")
    assert not model.training
    assert metrics["train_maps"] + metrics["holdout_maps"] == 48 and metrics["holdout_maps"] >= 1
    for key in ("recon_mse", "recon_absrel", "delta1", "train_delta1", "code_usage", "perplexity", "restarts"):
        assert np.isfinite(metrics[key]), key
    assert history[-1]["mse"] < history[0]["mse"] / 3
    assert metrics["code_usage"] >= 0.25  # restarts keep a good share of the 16 codes in use
    assert metrics["recon_mse"] < 0.1  # (0.25 at the start)


def test_train_vqvae_is_deterministic_and_takes_explicit_holdout():
    maps = smooth_maps(24, seed=1)
    cfg = tiny_cfg(steps=15)
    _, m1, _ = train_vqvae(maps[:20], cfg, "cpu", holdout=maps[20:])
    _, m2, _ = train_vqvae(maps[:20], cfg, "cpu", holdout=maps[20:])
    assert m1["holdout_maps"] == 4 and m1["train_maps"] == 20
    m1.pop("train_seconds"), m2.pop("train_seconds")
    assert m1 == m2


def test_train_vqvae_resizes_maps_and_rejects_non_finite():
    cfg = tiny_cfg(steps=3)
    model, metrics, _ = train_vqvae(smooth_maps(12, size=40), cfg, "cpu")  # 40 px maps -> 32
    assert metrics["train_maps"] == 11
    bad = smooth_maps(4)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_vqvae(bad, cfg, "cpu")
