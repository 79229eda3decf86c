"""Warm-up + cosine schedule (SPEC §4), values checked by hand."""

import math

import pytest
import torch

from perceptio_core.training.schedule import build_scheduler, warmup_cosine, warmup_steps


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
