"""The depth teacher's fit (SPEC §2) on the one training loop: the MiDaS losses, a fitted teacher that
loads like a released one, exact resume, and the digest hold-out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perceptio_core.atomic_io import file_digest
from perceptio_core.config import TeacherFitConfig
from perceptio_core.data.records import ImageRecord
from perceptio_core.depth.teacher import load_teacher, predict_depth
from perceptio_core.training.schedule import split_by_digest
from perceptio_core.training.teacher_fit import (
    TeacherFitTask,
    align_positive,
    fit_teacher,
    gradient_matching_loss,
    split_images,
    ssi_loss,
    teacher_loop,
)
from perceptio_core.training.trainer import CHECKPOINTS, FINAL, latest_checkpoint, read_history

from perceptio_helpers import one_torch_thread, run_trainer, trained_state  # noqa: F401

TINY_FIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, fusion_hidden_size=16,
                steps=12, batch_size=4, lr=1e-3, seed=0)  # fmt: skip
INPUT = 42  # 3 x 3 patches of 14


def world_images(root: Path) -> list[ImageRecord]:
    recs = []
    for i, p in enumerate(sorted((root / "images" / "train2014").glob("*.jpg"))):
        d = root / "depth" / (p.stem + ".npy")
        recs.append(ImageRecord(i, p.name, str(p), 64, 48, "coco", str(d), file_digest(p)))
    return recs


# ---- losses -----------------------------------------------------------------------------------


def test_ssi_loss_is_affine_invariant_and_rejects_inverted_predictions():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 12, 12, generator=g) + 0.1
    mask = torch.ones(2, 12, 12, dtype=torch.bool)
    zero, residual = ssi_loss(3.0 * target + 2.0, target, mask)
    assert zero.item() == pytest.approx(0.0, abs=1e-5)
    assert gradient_matching_loss(residual, mask).item() == pytest.approx(0.0, abs=1e-5)
    pred = torch.rand(2, 12, 12, generator=g)
    a, _ = ssi_loss(pred, target, mask)
    b, _ = ssi_loss(5.0 * pred - 1.0, target, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    # an inverted (depth-like) prediction: least squares would align it with a negative scale;
    # the positive-scale alignment keeps it wrong, so the loss is large
    inverted, _ = ssi_loss(-target, target, mask)
    assert inverted.item() > 1.0
    assert torch.allclose(align_positive(-target, target, mask).mean(), target.mean(), atol=0.2)


# ---- hold-out ---------------------------------------------------------------------------------


def test_images_are_held_out_by_digest(tiny_world):
    recs = world_images(tiny_world)
    train, hold = split_images(recs, 0.25)
    assert [r.digest for r in hold] == split_by_digest([r.digest for r in recs], 0.25)[1]
    assert len(train) + len(hold) == len(recs) and hold
    # the rule is per image: the same image is held out whatever else is in the set
    _, hold_half = split_images(recs[::2], 0.25)
    assert {r.digest for r in hold_half} == {r.digest for r in hold} & {r.digest for r in recs[::2]}
    with pytest.raises(ValueError, match="no digest"):
        split_images([ImageRecord(0, "x.png", recs[0].path, 64, 48, "coco", recs[0].depth_path)], 0.1)


# ---- the fit ----------------------------------------------------------------------------------


def test_fit_teacher_saves_a_loadable_checkpoint_deterministically(tiny_world, tmp_path):
    recs = world_images(tiny_world)[:12]
    cfg = TeacherFitConfig(**TINY_FIT, holdout_fraction=0.25)
    train, hold = split_images(recs, 0.25)
    m1 = fit_teacher(recs, cfg, INPUT, tmp_path / "a", "cpu", map_size=16)
    assert sorted(p.name for p in (tmp_path / "a" / FINAL).iterdir()) == [
        "config.json", "meta.json", "model.safetensors", "preprocessor_config.json"]
    assert m1["train_images"] == len(train) and m1["holdout_images"] == len(hold) > 0
    assert m1["steps"] == 12 and len(read_history(tmp_path / "a" / "history.jsonl")) == 12
    for key in ("loss_first", "loss_last", "ssi_last", "holdout_absrel", "holdout_pair_order", "train_absrel",
                "train_delta1"):
        assert np.isfinite(m1[key]), key
    model, processor = load_teacher(str(tmp_path / "a" / FINAL), "cpu")
    r = next(iter(predict_depth(model, processor, [recs[0].path], device="cpu", map_size=16)))
    assert r.error is None and r.map.shape == (16, 16)
    fit_teacher(recs, cfg, INPUT, tmp_path / "b", "cpu", map_size=16)
    wa = load_file(str(tmp_path / "a" / FINAL / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / FINAL / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_teacher_fit_resumes_to_the_weights_of_an_uninterrupted_one(tiny_world, tmp_path):
    train, _ = split_images(world_images(tiny_world)[:12], 0.25)
    fit_cfg = TeacherFitConfig(**{**TINY_FIT, "steps": 6}, holdout_fraction=0.25)
    loop = teacher_loop(fit_cfg, len(train))
    loop.checkpoint_every = 3

    def run(out: Path, stop_at: int | None = None):
        return run_trainer(TeacherFitTask(train, fit_cfg, INPUT), loop, out, stop_at)

    ref = trained_state(run(tmp_path / "full"))
    run(tmp_path / "killed", stop_at=5)  # the checkpoint at step 3, then "killed" at 5
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000003"
    got = trained_state(run(tmp_path / "killed"))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    assert (tmp_path / "killed" / CHECKPOINTS / "step-00000006").is_dir()


def test_fit_teacher_needs_true_depth(tmp_path, tiny_world):
    rec = world_images(tiny_world)[0]
    no_depth = ImageRecord(0, rec.file_name, rec.path, 64, 48, "coco", None, rec.digest)
    with pytest.raises(ValueError, match="no true depth"):
        fit_teacher([no_depth], TeacherFitConfig(**TINY_FIT, holdout_fraction=0.0), INPUT, tmp_path, "cpu")
