"""The one training loop: exact resume, atomic checkpoints, history and metrics, and the base fit
through the same loop on a tiny InternVL."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from perceptio_core.config import TrainLoopConfig, load_config
from perceptio_core.training.schedule import steps_for_epochs
from perceptio_core.training.trainer import (
    CHECKPOINTS,
    ResumeMismatchError,
    TrainTask,
    Trainer,
    history_window,
    latest_checkpoint,
    read_history,
    run_training,
    summarize_history,
)


# ---- a toy task: dropout (RNG state must come back), a frozen layer, two logged terms --------


class _Pairs(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.arange(1.0, 7.0) / 6 + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _stack(items):
    return {"x": torch.stack([a for a, _ in items]), "y": torch.stack([b for _, b in items])}


class ToyTask(TrainTask):
    name = "toy"

    def __init__(self, n: int = 26, dropout: float = 0.3) -> None:
        self.n = n
        self.dropout = dropout

    def build_model(self):
        m = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 16), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(16, 1))
        m[0].requires_grad_(False)  # frozen: never in a checkpoint, rebuilt from the seed
        return m

    def build_dataset(self):
        return _Pairs(self.n)

    def build_collate(self):
        return _stack

    def loss(self, model, batch):
        pred = model(batch["x"]).squeeze(-1)
        mse = ((pred - batch["y"]) ** 2).mean()
        l1 = (pred - batch["y"]).abs().mean()
        return {"loss": mse + 0.1 * l1, "mse": mse, "l1": l1}

    def save_final(self, model, out_dir):
        from safetensors.torch import save_model

        save_model(model, str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text("{}")


def _cfg(**kw) -> TrainLoopConfig:
    base = dict(steps=9, batch_size=3, grad_accum=2, lr=0.05, weight_decay=0.01, num_workers=0,
                checkpoint_every=4, keep_checkpoints=2, warmup_frac=0.2)  # fmt: skip
    base.update(kw)
    return TrainLoopConfig(**base)


def _trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    m = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def _run(out: Path, cfg: TrainLoopConfig, stop_at=None, resume=True):
    t = Trainer(ToyTask(), cfg, out, device="cpu")
    t.setup()
    if resume:
        t.resume()
    t.train(stop_at=stop_at)
    return t


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path):
    cfg = _cfg()  # 26 samples / 3 = 8 micro-batches per epoch, 2 per step: steps 5..9 in epoch 2+
    full = _run(tmp_path / "a", cfg)
    ref = _trainable(full)
    assert full.pos.step == 9 and full.sampler.epoch == 2  # the loader's epoch reaches the sampler

    part = _run(tmp_path / "b", cfg, stop_at=6)  # checkpoint at 4 only, then "killed" at 6
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"
    del part
    resumed = Trainer(ToyTask(), cfg, tmp_path / "b", device="cpu")
    resumed.setup()
    assert resumed.resume() == 4
    resumed.train()
    got = _trainable(resumed)
    assert got.keys() == ref.keys() and len(got) == 4
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    # the history is the same too (lines of the stopped steps 5, 6 were replaced, not duplicated)
    ha, hb = read_history(tmp_path / "a" / "history.jsonl"), read_history(tmp_path / "b" / "history.jsonl")
    assert [r["step"] for r in hb] == list(range(1, 10))
    for ra, rb in zip(ha, hb):
        for k in ("loss", "mse", "l1", "lr", "epoch"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    assert [r["epoch"] for r in ha] == [0, 0, 0, 0, 1, 1, 1, 1, 2]


def test_checkpoints_are_atomic_pruned_and_trainable_only(tmp_path):
    t = _run(tmp_path, _cfg(steps=9, checkpoint_every=2, keep_checkpoints=2))
    ck = tmp_path / CHECKPOINTS
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000008", "step-00000009"]
    meta = json.loads((ck / "step-00000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["complete"] and meta["data_position"]["batch_in_epoch"] == 0
    assert meta["terms"] == ["loss", "mse", "l1"]
    from safetensors import safe_open

    with safe_open(str(ck / "step-00000008" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["1.bias", "1.weight", "4.bias", "4.weight"]  # no frozen layer 0
    # a killed save (temp dir) and a directory without meta.json are never resumed from
    (ck / ".tmp-step-00000010").mkdir()
    shutil.copytree(ck / "step-00000008", ck / "step-00000011")
    (ck / "step-00000011" / "meta.json").unlink()
    assert latest_checkpoint(tmp_path).name == "step-00000009"
    t2 = Trainer(ToyTask(), _cfg(steps=9, checkpoint_every=2), tmp_path, device="cpu")
    t2.setup()
    assert not (ck / ".tmp-step-00000010").exists()  # cleaned at set-up
    assert t2.resume() == 9
    assert t2.train()["steps"] == 9  # nothing left to do
    del t


class BufferTask(ToyTask):
    """A BatchNorm: its running statistics move in training without the optimizer."""

    name = "toy-bn"

    def build_model(self):
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def trained_buffers(self, model):
        return ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_trained_buffers_are_checkpointed_and_resumed(tmp_path):
    from safetensors import safe_open

    cfg = _cfg()

    def run(out, stop_at=None):
        t = Trainer(BufferTask(), cfg, out, device="cpu")
        t.setup()
        t.resume()
        t.train(stop_at=stop_at)
        return {k: v.clone() for k, v in t.accelerator.unwrap_model(t.model).state_dict().items()}

    ref = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=6)
    with safe_open(str(tmp_path / "b" / CHECKPOINTS / "step-00000004" / "model.safetensors"), "pt") as f:
        assert {"1.running_mean", "1.running_var", "1.num_batches_tracked", "0.weight"} <= set(f.keys())
    got = run(tmp_path / "b")
    assert int(got["1.num_batches_tracked"]) == 18  # 9 steps x 2 micro-batches, 8 before the resume
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_resume_with_another_config_is_refused(tmp_path):
    _run(tmp_path, _cfg(steps=4, checkpoint_every=2))
    t = Trainer(ToyTask(), _cfg(steps=4, lr=0.01), tmp_path, device="cpu")
    t.setup()
    with pytest.raises(ResumeMismatchError, match="different run"):
        t.resume()
    # more steps is another run too (the cosine schedule depends on the total)
    t = Trainer(ToyTask(), _cfg(steps=6, checkpoint_every=2), tmp_path, device="cpu")
    t.setup()
    with pytest.raises(ResumeMismatchError):
        t.resume()
    # what does not change the result may change: checkpoint period, workers
    t = Trainer(ToyTask(), _cfg(steps=4, checkpoint_every=3, num_workers=1), tmp_path, device="cpu")
    t.setup()
    assert t.resume() == 4


def test_metrics_history_and_plots(tmp_path):
    metrics = run_training(
        ToyTask(n=64, dropout=0.0), _cfg(steps=40, batch_size=16, grad_accum=1, lr=0.03), tmp_path, device="cpu"
    )
    rows = read_history(tmp_path / "history.jsonl")
    assert len(rows) == 40 and history_window(40) == 4
    assert metrics["loss_first"] == pytest.approx(np.mean([r["loss"] for r in rows[:4]]))
    assert metrics["loss_last"] == pytest.approx(np.mean([r["loss"] for r in rows[-4:]]))
    for t in ("mse", "l1"):
        assert metrics[f"{t}_last"] < metrics[f"{t}_first"]
    assert metrics["loss_last"] < 0.5 * metrics["loss_first"]
    assert 0 <= metrics["data_wait_frac"] < 1 and metrics["samples_per_s"] > 0
    assert rows[0]["lr"] == 0.0 and max(r["lr"] for r in rows) == pytest.approx(0.03)
    assert all(r["grad_norm"] >= 0 for r in rows)
    for t in ("loss", "mse", "l1"):
        assert (tmp_path / "plots" / f"loss_{t}.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["loss_last"] == metrics["loss_last"]
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    assert meta["step"] == 40 and (tmp_path / "model" / "model.safetensors").is_file()


def test_epochs_derive_the_steps_from_the_data_and_the_global_batch(tmp_path):
    # 26 samples, 1.5 epochs at a global batch of 3 x 2 = 6: ceil(39 / 6) = 7 steps, whatever loop.steps says
    t = _run(tmp_path, _cfg(steps=999, epochs=1.5))
    assert t.cfg.steps == 7 and len(read_history(tmp_path / "history.jsonl")) == 7
    assert t.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at step 7
    assert steps_for_epochs(1, 995_000, 512) == 1944  # the paper's mix at 1 x 8 x 64 per step


def test_summarize_history_windows():
    rows = [{"step": i + 1, "loss": float(i), "a": 2.0 * i} for i in range(30)]
    m = summarize_history(rows, ["loss", "a"])
    assert history_window(30) == 3 and history_window(5) == 1 and history_window(5000) == 100
    assert m == {"loss_first": 1.0, "loss_last": 28.0, "a_first": 2.0, "a_last": 56.0}


# ---- the base fit: the same loop on a tiny InternVL ----------------------------------------


def _examples(d: Path, n: int = 8):
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        c = i % 4
        arr = np.zeros((24, 24, 3), np.uint8)
        if c < 3:
            arr[..., c] = 220
        p = d / f"im{i}.png"
        Image.fromarray(arr).save(p)
        out.append((str(p), "Which colour fills the image? (A) red (B) green (C) blue (D) black", "ABCD"[c]))
    return out


def test_base_fit_saves_an_internvl_that_loads_like_a_released_one(tmp_path):
    from perceptio_core.training.base_fit import fit_base
    from perceptio_core.model.internvl import load_internvl, load_tokenizer

    ex = _examples(tmp_path / "img")
    cfg = load_config("tiny", ["run.device=cpu", "base.steps=2", "base.batch_size=2", "base.num_workers=0"])
    m = fit_base(ex, cfg, tmp_path / "base")
    assert set(m) >= {"loss_first", "loss_last", "llm_first", "llm_last"} and m["steps"] == 2
    model = load_internvl(tmp_path / "base" / "model")
    tok = load_tokenizer(tmp_path / "base" / "model")
    assert len(tok) == model.config.text_config.vocab_size == len(load_tokenizer(tmp_path / "base" / "tokenizer"))
    assert not any("[SEG]" in t for t in tok.get_vocab())  # no perception tokens in the base
    rows = read_history(tmp_path / "base" / "history.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["llm"] for r in rows)
    # every weight was trained (full fine-tuning): none equals the fresh initialisation
    from perceptio_core.model.internvl import build_tiny_internvl

    fresh = build_tiny_internvl(cfg.model.tiny, tok, seed=cfg.base.seed).state_dict()
    trained = model.state_dict()
    moved = sum(not torch.equal(fresh[k], trained[k]) for k in fresh)
    assert moved > 0.9 * len(fresh)


# ---- the finetune stage: the Perceptio model on curated shards, through the same loop --------


def _shards(d: Path, n: int = 12, K: int = 16, N: int = 9) -> Path:
    import io

    from perceptio_core.data.masks import encode_mask
    from perceptio_core.format.target import format_target
    from perceptio_core.atomic_io import bytes_digest
    from perceptio_core.curation.sample import Sample, make_key
    from perceptio_core.curation.shards import write_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        img = buf.getvalue()
        codes = rng.integers(0, K, N).tolist()
        has_seg = i % 2 == 0
        mask = np.zeros((20, 24), np.uint8)
        mask[4:12, 3 + i % 5 : 15] = 1
        samples.append(Sample(
            key=make_key("t", i), source="refcoco", split="train", task="refer_seg" if has_seg else "depth_cot",
            image_digest=bytes_digest(img), image=img, prompt="Please segment the object described as: the red cube.",
            target=format_target(has_seg, codes, "The object is a red cube."), answer="The object is a red cube.",
            masks_rle=[encode_mask(mask)] if has_seg else [], depth_tokens=codes,
        ))  # fmt: skip
    write_shards(samples, d, max_samples=5)
    return d


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from perceptio_core.config import TinyVLMConfig
    from perceptio_core.model.internvl import build_tiny_internvl

    from perceptio_helpers import tiny_tokenizer

    d = tmp_path_factory.mktemp("base")
    tok = tiny_tokenizer()
    build_tiny_internvl(TinyVLMConfig(), tok, seed=0).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def test_finetune_resumes_exactly_with_workers_and_saves_the_model(tmp_path, tiny_base):
    from perceptio_core.training.finetune import FinetuneTask, finetune
    from perceptio_core.model.perceptio_model import PerceptioModel

    from perceptio_helpers import StandInDepthTokenizer

    data = _shards(tmp_path / "shards")
    cfg = load_config("tiny", ["run.device=cpu", "finetune.steps=3", "finetune.batch_size=1",
                               "finetune.grad_accum=2", "finetune.num_workers=1", "finetune.checkpoint_every=1",
                               "model.lora_rank=4", "model.lora_alpha=8"])  # fmt: skip
    kw = dict(base_dir=tiny_base, depth_tokenizer=StandInDepthTokenizer())
    m = finetune(cfg, data, tmp_path / "full", **kw)
    for t in ("llm", "seg_bce", "seg_dice", "marker", "token", "count", "rec"):
        assert f"{t}_first" in m and f"{t}_last" in m
    assert m["seg_bce_first"] > 0 and m["token_first"] > 0 and m["marker_first"] > 0
    assert m["steps"] == 3 and m["global_batch"] == 2

    t = Trainer(FinetuneTask(cfg, data, **kw), cfg.finetune, tmp_path / "cut", device="cpu")
    t.setup()
    t.resume()
    t.train(stop_at=2)
    shutil.rmtree(tmp_path / "cut" / CHECKPOINTS / "step-00000002")  # as if killed while saving step 2
    finetune(cfg, data, tmp_path / "cut", **kw)  # resumes at step 1: replays step 2 and does step 3

    from safetensors.torch import load_file

    # the trained things (LoRA + token rows in the adapter, [SEG] projection + mask decoder + rows)
    for f in ("adapter/adapter_model.safetensors", "heads.safetensors"):
        sa, sb = load_file(str(tmp_path / "full" / "model" / f)), load_file(str(tmp_path / "cut" / "model" / f))
        assert sa.keys() == sb.keys() and len(sa) > 4
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)
    a = PerceptioModel.from_pretrained(tmp_path / "full" / "model", depth_tokenizer=StandInDepthTokenizer())
    assert a.codebook_size == 16
    hist = read_history(tmp_path / "full" / "history.jsonl")
    assert all(r["tokens"] > 2 * 16 for r in hist)  # image tokens + text, both samples of the step
    assert (tmp_path / "full" / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "full" / "model" / "meta.json").is_file()
    assert (tmp_path / "full" / "plots" / "loss_seg_dice.png").is_file()


def test_finetune_starts_from_a_fitted_sam2_and_embeds_it_in_the_saved_model(tmp_path, tiny_base):
    """The fit_sam2 artifact (Meta's layout) is loaded as a released checkpoint would be; the saved
    model carries its frozen parts, so it loads without the file."""
    from safetensors.torch import load_file

    from perceptio_core.training.finetune import FinetuneTask
    from perceptio_core.model.perceptio_model import PerceptioModel
    from perceptio_core.model.sam2_decoder import build_sam2
    from perceptio_core.training.sam2_fit import save_sam2_checkpoint

    from perceptio_helpers import StandInDepthTokenizer

    fitted = build_sam2("tiny-test", seed=7, freeze_image_encoder=False)
    ckpt = save_sam2_checkpoint(fitted, tmp_path / "sam2", "tiny-test")
    cfg = load_config("tiny", ["run.device=cpu", "model.sam2_variant=tiny-test", "model.lora_rank=4"])
    task = FinetuneTask(cfg, _shards(tmp_path / "shards"), base_dir=tiny_base,
                        depth_tokenizer=StandInDepthTokenizer(), sam2_checkpoint=ckpt)  # fmt: skip
    model = task.build_model()
    enc = "image_encoder.trunk.patch_embed.proj.weight"
    assert torch.equal(model.sam2.state_dict()[enc], fitted.state_dict()[enc])
    assert cfg.model.sam2_checkpoint is None  # the user's config is not changed
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["model"]["sam2_checkpoint"] is None and "sam2_frozen.safetensors" in saved["files"]
    assert torch.equal(load_file(str(tmp_path / "model" / "sam2_frozen.safetensors"))[enc], fitted.state_dict()[enc])
    assert task.fingerprint()["sam2"] is not None  # a resumed run must start from the same SAM2
    ckpt.unlink()  # the saved model no longer needs the file
    again = PerceptioModel.from_pretrained(tmp_path / "model", depth_tokenizer=StandInDepthTokenizer())
    assert torch.equal(again.sam2.state_dict()[enc], fitted.state_dict()[enc])
