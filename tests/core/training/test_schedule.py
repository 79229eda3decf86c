"""Warm-up + cosine schedule (SPEC §4), values checked by hand; the hold-out rule of every fit."""

import math

import pytest
import torch

from perceptio_core.training.schedule import (
    build_scheduler,
    holdout_by_digest,
    split_by_digest,
    warmup_cosine,
    warmup_steps,
)


def _lrs(total: int, frac: float, base: float = 1.0) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=base)
    sched = build_scheduler(opt, total, frac)
    out = []
    for _ in range(total + 1):  # lr in force for optimizer steps 0..total-1, then after the last
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_hand_checked_values():
    # T = 200 steps, 5% warm-up: W = 10
    assert warmup_steps(200, 0.05) == 10
    lr = _lrs(200, 0.05, base=2.0)
    assert lr[0] == 0.0  # step 0: start of the warm-up
    assert lr[5] == pytest.approx(2.0 * 5 / 10)  # half-way through the warm-up
    assert lr[10] == pytest.approx(2.0)  # end of warm-up: the peak
    assert lr[105] == pytest.approx(1.0)  # middle of the cosine part (10 + 190 / 2): half the peak
    # a quarter into the cosine: 0.5 * (1 + cos(pi/4))
    assert lr[10 + 190 // 2 // 2] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 47 / 190)))
    assert lr[199] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 189 / 190)))  # last step: tiny
    assert 0 < lr[199] < 1e-3
    assert lr[200] == pytest.approx(0.0, abs=1e-12)  # the end: zero


def test_monotone_pieces_and_small_totals():
    lr = _lrs(40, 0.05)
    w = warmup_steps(40, 0.05)
    assert w == 2
    assert all(a < b for a, b in zip(lr[:w], lr[1 : w + 1]))
    assert all(a >= b for a, b in zip(lr[w:], lr[w + 1 :]))
    assert warmup_steps(1, 0.05) == 0 and warmup_steps(3, 0.05) == 1
    assert warmup_steps(10, 0.0) == 0
    f = warmup_cosine(10, 0)
    assert f(0) == 1.0 and f(10) == 0.0 and f(5) == pytest.approx(0.5)


def test_cosine_to_a_floor():
    f, g = warmup_cosine(100, 5), warmup_cosine(100, 5, final=0.1)
    for s in range(5):
        assert g(s) == f(s)  # the warm-up is the same
    for s in range(5, 101):
        assert g(s) == pytest.approx(0.1 + 0.9 * f(s), abs=1e-12)
    assert g(5) == pytest.approx(1.0) and g(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="final"):
        warmup_cosine(100, 5, final=1.0)


def test_matches_transformers_convention():
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=100)
    f = warmup_cosine(100, 5)
    for s in range(101):
        assert f(s) == pytest.approx(ref.lr_lambdas[0](s), abs=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError):
        warmup_steps(0, 0.05)
    with pytest.raises(ValueError):
        warmup_steps(10, 1.0)
    with pytest.raises(ValueError):
        warmup_cosine(10, 10)


# ---- the hold-out rule of every fit ---------------------------------------------------------------


def test_holdout_by_digest_reads_the_first_32_bits():
    assert holdout_by_digest("00000000" + "f" * 56, 0.01)
    assert not holdout_by_digest("ffffffff" + "0" * 56, 0.99)
    assert holdout_by_digest("19999999" + "0" * 56, 0.1) and not holdout_by_digest("1999999a" + "0" * 56, 0.1)
    assert not holdout_by_digest("00000000" + "f" * 56, 0.0)


def test_split_by_digest_keeps_order_and_is_per_item():
    import hashlib

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    train, hold = split_by_digest(digests, 0.1)
    assert sorted(train + hold) == sorted(digests)
    assert train == [d for d in digests if d not in set(hold)] and 20 < len(hold) < 60
    assert split_by_digest(digests[::3], 0.1)[1] == [d for d in hold if d in set(digests[::3])]
    records = [{"digest": d} for d in digests]
    assert [r["digest"] for r in split_by_digest(records, 0.1, lambda r: r["digest"])[1]] == hold
    assert split_by_digest(digests, 0.0) == (digests, [])
    with pytest.raises(ValueError, match="fraction"):
        split_by_digest(digests, 1.0)


def test_every_fit_holds_out_by_the_one_rule():
    """The teacher, the VQ-VAE (its stage splits the maps) and SAM2 use the one function; the old
    seeded permutations are gone."""
    import inspect

    import perceptio_core.data.image_io as image_io
    import perceptio_core.depth.teacher as teacher
    import perceptio_core.depth.vqvae as vqvae
    import tasks.codebook
    from perceptio_core.training import sam2_fit, schedule, teacher_fit

    assert sam2_fit.holdout_by_digest is schedule.holdout_by_digest
    assert teacher_fit.split_by_digest is schedule.split_by_digest
    # the stage imports it where it runs (the CLI stays light): the import names the one function
    assert "from perceptio_core.training.schedule import split_by_digest" in inspect.getsource(tasks.codebook)
    assert not hasattr(image_io, "holdout_by_digest") and not hasattr(teacher, "split_holdout")
    assert not hasattr(teacher, "_lr_at") and not hasattr(vqvae, "_lr_at")
