"""The depth VQ-VAE's fit (SPEC §2) on the one training loop: it learns and keeps codes alive, is
deterministic, and a killed fit resumes to the weights and codebook of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from perceptio_core.depth.vqvae import VQVAE, prepare_maps
from perceptio_core.training.trainer import CHECKPOINTS, FINAL, latest_checkpoint, read_history
from perceptio_core.training.vqvae_fit import VQVAEFitTask, train_vqvae, vqvae_loop

from perceptio_helpers import one_torch_thread, run_trainer, trained_state, smooth_maps, tiny_vqvae_config as tiny_cfg  # noqa: F401


def test_train_vqvae_learns_and_keeps_codes_alive(tmp_path):
    maps = smooth_maps(48)
    metrics = train_vqvae(maps[:42], maps[42:], tiny_cfg(), tmp_path, "cpu")
    assert metrics["train_maps"] == 42 and metrics["holdout_maps"] == 6 and metrics["steps"] == 60
    for key in ("recon_mse", "recon_absrel", "delta1", "train_delta1", "code_usage", "perplexity", "restarts"):
        assert np.isfinite(metrics[key]), key
    history = read_history(tmp_path / "history.jsonl")
    assert len(history) == 60 and history[-1]["mse"] < history[0]["mse"] / 3
    # warm-up of ceil(3% of 60) = 2 steps, then the cosine to 10% of the peak
    assert history[2]["lr"] == pytest.approx(2e-3)
    assert history[-1]["lr"] == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 57 / 58))))
    assert metrics["restarts"] == sum(r["restarts"] for r in history) > 0
    assert metrics["code_usage"] >= 0.25  # restarts keep a good share of the 16 codes in use
    assert metrics["recon_mse"] < 0.1  # (0.25 at the start)
    model = VQVAE.from_pretrained(tmp_path / FINAL)  # the saved model is the one scored
    assert not model.training and bool(model.quantizer.initted)


def test_train_vqvae_is_deterministic(tmp_path):
    maps = smooth_maps(24, seed=1)
    cfg = tiny_cfg(steps=15)
    m1 = train_vqvae(maps[:20], maps[20:], cfg, tmp_path / "a", "cpu")
    m2 = train_vqvae(maps[:20], maps[20:], cfg, tmp_path / "b", "cpu")
    assert m1["holdout_maps"] == 4 and m1["train_maps"] == 20
    keys = ("recon_mse", "recon_absrel", "delta1", "train_recon_mse", "code_usage", "perplexity", "restarts",
            "loss_first", "loss_last")  # fmt: skip
    assert {k: m1[k] for k in keys} == {k: m2[k] for k in keys}


def test_train_vqvae_resizes_maps_and_rejects_non_finite_or_missing_maps(tmp_path):
    cfg = tiny_cfg(steps=3)
    maps = smooth_maps(12, size=40)  # 40 px maps -> 32
    metrics = train_vqvae(maps[:10], maps[10:], cfg, tmp_path / "a", "cpu")
    assert metrics["train_maps"] == 10 and metrics["holdout_maps"] == 2
    bad = smooth_maps(4)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_vqvae(bad, bad, cfg, tmp_path / "b", "cpu")
    with pytest.raises(ValueError, match="need both"):
        train_vqvae(maps, maps[:0], cfg, tmp_path / "c", "cpu")


def test_killed_vqvae_fit_resumes_to_the_weights_and_codebook_of_an_uninterrupted_one(tmp_path):
    """The codebook moves by EMA (buffers, no optimizer): the checkpoint must carry it, and the RNG
    state (flips, dead-code restarts) must come back with it."""
    cfg = tiny_cfg(steps=9)
    train = prepare_maps(smooth_maps(26, seed=2), cfg.input_size)
    loop = vqvae_loop(cfg, train.shape[0])
    loop.checkpoint_every = 4

    def run(out: Path, stop_at: int | None = None):
        return run_trainer(VQVAEFitTask(train, cfg), loop, out, stop_at)

    ref = trained_state(run(tmp_path / "full"))
    run(tmp_path / "killed", stop_at=6)  # the checkpoint at step 4, then "killed" at 6
    ck = latest_checkpoint(tmp_path / "killed")
    assert ck.name == "step-00000004"
    with safe_open(str(ck / "model.safetensors"), framework="pt") as f:
        assert {"vqvae.quantizer.embed", "vqvae.quantizer.cluster_size", "vqvae.quantizer.embed_avg",
                "vqvae.quantizer.initted"} <= set(f.keys())  # fmt: skip
    got = trained_state(run(tmp_path / "killed"))
    assert got.keys() == ref.keys() and "vqvae.quantizer.embed" in got
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    hf = read_history(tmp_path / "full" / "history.jsonl")
    hk = read_history(tmp_path / "killed" / "history.jsonl")
    assert [r["restarts"] for r in hf] == [r["restarts"] for r in hk]
    assert (tmp_path / "killed" / CHECKPOINTS / "step-00000009").is_dir()
