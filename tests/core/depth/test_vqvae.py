"""The depth VQ-VAE (SPEC §2): shapes, the EMA quantiser (one process or several), dead-code
restarts, save/load, its input maps. (Its fit: tests/core/training/test_vqvae_fit.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perceptio_core.config import ConfigError, VQVAEConfig
from perceptio_core.depth.vqvae import VQVAE, EMAVectorQuantizer, code_statistics, num_stages, prepare_maps

from perceptio_helpers import one_torch_thread, smooth_maps, tiny_vqvae_config as tiny_cfg  # noqa: F401

ROOT = Path(__file__).resolve().parents[3]


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
    # indices -> codes == quantized output, exactly (so decoding the indices is the reconstruction)
    assert torch.equal(quantized.detach(), q.lookup(idx))
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


def test_prepare_maps_resizes_clamps_and_checks():
    maps = smooth_maps(3, size=40)
    x = prepare_maps(maps, 32)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(32, 32), mode="bilinear",
                                          align_corners=False).clamp(0, 1)  # fmt: skip
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert torch.equal(prepare_maps(torch.from_numpy(maps)[:, None], 40)[:, 0], torch.from_numpy(maps))
    assert float(prepare_maps(np.full((1, 8, 8), 1.5, np.float32), 8).max()) == 1.0
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare_maps(bad, 32)
    with pytest.raises(ValueError, match="N, H, W"):
        prepare_maps(maps[0], 32)


_EMA_WORKER = """
import sys, torch, torch.distributed as dist
from perceptio_core.depth.vqvae import EMAVectorQuantizer

rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
torch.manual_seed(0)
z = torch.randn(4, 2, 3, 3) + torch.arange(4.0).view(4, 1, 1, 1)  # the global batch
q = EMAVectorQuantizer(6, 2, decay=0.8, dead_code_threshold=0.0)
q.initted.fill_(True)
q.cluster_size.fill_(1.0)
q.embed_avg.copy_(q.embed)
for _ in range(3):
    q(z[rank * 4 // world : (rank + 1) * 4 // world])  # this process's share
torch.save({k: v for k, v in q.state_dict().items()}, out)
dist.destroy_process_group()
"""


def test_ema_codebook_over_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """Under torch.distributed the EMA statistics are summed over the processes: two processes
    with half a batch each move the codebook exactly as one process with the whole batch."""
    script = tmp_path / "worker.py"
    script.write_text(_EMA_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def launch(world: int) -> list[dict[str, torch.Tensor]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        outs = [tmp_path / f"w{world}-r{r}.pt" for r in range(world)]
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), port, str(outs[r])], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]  # fmt: skip
        for p in procs:
            log = p.communicate(timeout=120)[0]
            assert p.returncode == 0, log.decode()[-3000:]
        return [torch.load(o, weights_only=True) for o in outs]

    (one,) = launch(1)
    a, b = launch(2)
    for k in ("embed", "cluster_size", "embed_avg"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)  # the processes agree
        torch.testing.assert_close(a[k], one[k], rtol=1e-5, atol=1e-6)  # and equal one process
