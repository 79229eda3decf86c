"""Each loss term of SPEC §3 on tiny tensors with hand-computed values (tolerance 1e-5 unless said)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from perceptio_core.config import LossConfig
from perceptio_core.model.losses import (
    IGNORE,
    code_probability,
    count_loss,
    llm_loss,
    marker_loss,
    mask_bce_loss,
    mask_dice_loss,
    rec_loss,
    sequence_terms,
    shift_for_next_token,
    span_bounds,
    span_code_logits,
    token_loss,
    total_loss,
)

from perceptio_helpers import one_torch_thread  # noqa: F401

# a toy vocabulary: 0 text, 1 <d_start>, 2 <d_end>, 3..4 the K = 2 codes, 5 eos
TEXT, S, E, C0, C1, EOS = 0, 1, 2, 3, 4, 5
V = 6
CODES = torch.tensor([C0, C1])
SHARP = 50.0  # logits SHARP * one-hot: softmax is one-hot to ~1e-20


def onehot_logits(tokens: list[list[int]]) -> torch.Tensor:
    """[B, T, V] logits predicting exactly ``tokens``."""
    t = torch.tensor(tokens)
    return torch.nn.functional.one_hot(t, V).float() * SHARP


def test_shift_aligns_logits_with_the_next_label():
    logits = torch.arange(4.0).view(1, 4, 1).expand(1, 4, V)  # logits[:, t] carry the value t
    labels = torch.tensor([[IGNORE, 7, 8, 9]])
    z, y = shift_for_next_token(logits, labels)
    assert z.shape == (1, 3, V) and y.tolist() == [[7, 8, 9]]
    # the logit computed at input position 0 predicts the label of position 1
    assert z[0, :, 0].tolist() == [0.0, 1.0, 2.0]


def test_llm_loss_hand_computed():
    # V = 2 on the first two columns only: row 0 uniform -> ln 2; row 1 p(target) = 3/4 -> ln(4/3)
    logits = torch.full((1, 3, V), -1e4)
    logits[0, 0, :2] = torch.tensor([0.0, 0.0])
    logits[0, 1, :2] = torch.tensor([math.log(3.0), 0.0])
    logits[0, 2, :2] = torch.tensor([5.0, -5.0])  # ignored
    targets = torch.tensor([[1, 0, IGNORE]])
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert llm_loss(logits, targets).item() == pytest.approx(expected, abs=1e-5)


def test_llm_loss_without_targets_is_an_attached_zero():
    logits = torch.randn(1, 2, V, requires_grad=True)
    out = llm_loss(logits, torch.full((1, 2), IGNORE))
    assert out.item() == 0.0
    out.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_span_bounds():
    targets = torch.tensor(
        [
            [TEXT, S, C0, C1, E, TEXT],  # s = 1, e = 4
            [S, C0, C0, TEXT, TEXT, IGNORE],  # no <d_end>
            [E, TEXT, TEXT, TEXT, TEXT, TEXT],  # <d_end> without <d_start>
            [TEXT, E, S, C1, E, E],  # e is the first <d_end> AFTER s
        ]
    )
    starts, ends = span_bounds(targets, S, E)
    assert starts.tolist() == [1, 0, -1, 2]
    assert ends.tolist() == [4, -1, -1, 4]


def test_marker_loss_hand_computed():
    # uniform logits over V: each CE is ln V; sample 0 has both markers, sample 1 only <d_start>
    logits = torch.zeros(2, 5, V)
    targets = torch.tensor([[S, C0, C1, E, TEXT], [TEXT, S, C0, C1, C0]])
    starts, ends = span_bounds(targets, S, E)
    # (1/B) * (ln V + ln V) with B = 2 (1_b = 0 for sample 1)
    assert marker_loss(logits, targets, starts, ends).item() == pytest.approx(math.log(V), abs=1e-5)


def test_marker_loss_uses_the_logits_at_the_marker_places():
    targets = torch.tensor([[TEXT, S, C0, E, TEXT]])
    logits = torch.zeros(1, 5, V)
    logits[0, 1, S] = math.log(5.0)  # p(<d_start>) at s: 5 / (5 + 5) = 1/2
    logits[0, 3, E] = math.log(15.0)  # p(<d_end>) at e: 15 / (15 + 5) = 3/4
    starts, ends = span_bounds(targets, S, E)
    expected = math.log(2.0) + math.log(4.0 / 3.0)
    assert marker_loss(logits, targets, starts, ends).item() == pytest.approx(expected, abs=1e-5)


def test_token_loss_is_the_mean_over_places_strictly_inside():
    targets = torch.tensor([[S, C0, C1, E, TEXT], [TEXT, S, C1, E, TEXT]])
    logits = torch.zeros(2, 5, V)
    logits[0, 1, C0] = math.log(5.0)  # p = 1/2  -> ln 2
    logits[0, 2, C1] = math.log(15.0)  # p = 3/4  -> ln 4/3
    # sample 1, place 2: uniform -> ln 6; marker places and text are not counted
    logits[0, 0, :] = 9.0
    logits[1, 3, TEXT] = -9.0
    starts, ends = span_bounds(targets, S, E)
    expected = (math.log(2.0) + math.log(4.0 / 3.0) + math.log(6.0)) / 3
    assert token_loss(logits, targets, starts, ends).item() == pytest.approx(expected, abs=1e-5)


def test_code_probability():
    logits = torch.zeros(1, V)
    logits[0, C0] = math.log(3.0)  # exp: [1, 1, 1, 3, 1, 1] -> P(code) = (3 + 1) / 8
    assert code_probability(logits, CODES).item() == pytest.approx(0.5, abs=1e-6)


N = 4


def test_count_loss_zero_for_exactly_n_codes():
    seq = [[TEXT, S, C0, C1, C0, C1, E, TEXT, EOS]]
    logits = onehot_logits(seq)  # predictions equal to the targets
    targets = torch.tensor(seq)
    starts, _ = span_bounds(targets, S, E)
    assert count_loss(logits, targets, starts, CODES, N).item() == pytest.approx(0.0, abs=1e-6)


def test_count_loss_one_over_n_for_a_span_one_short():
    seq = [[TEXT, S, C0, C1, C0, E, TEXT, EOS, EOS]]  # N - 1 codes, <d_end> early
    targets = torch.tensor(seq)
    starts, _ = span_bounds(targets, S, E)
    assert count_loss(onehot_logits(seq), targets, starts, CODES, N).item() == pytest.approx(1 / N, abs=1e-6)


def test_count_loss_one_over_n_for_a_span_one_long():
    # the model puts a code where <d_end> belongs (teacher-forced targets are well formed)
    target = [[TEXT, S, C0, C1, C0, C1, E, TEXT, EOS]]
    pred = [[TEXT, S, C0, C1, C0, C1, C0, TEXT, EOS]]
    targets = torch.tensor(target)
    starts, _ = span_bounds(targets, S, E)
    assert count_loss(onehot_logits(pred), targets, starts, CODES, N).item() == pytest.approx(1 / N, abs=1e-6)


def test_count_loss_soft_hand_computed_and_mean_over_samples_with_a_start():
    # uniform logits: P(code) = K / V = 1/3 at each of the N + 1 = 5 window places -> E = 5/3
    targets = torch.tensor(
        [
            [S, C0, C1, C0, C1, E, TEXT, EOS],
            [TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, EOS],  # no <d_start>: not averaged
        ]
    )
    starts, _ = span_bounds(targets, S, E)
    expected = abs(5 / 3 - N) / N
    assert count_loss(torch.zeros(2, 8, V), targets, starts, CODES, N).item() == pytest.approx(expected, abs=1e-6)


def test_count_loss_window_stops_at_ignored_places():
    # a truncated sample: only 2 places after <d_start> are targets; sharp codes there -> E = 2
    seq = [[S, C0, C1, IGNORE, IGNORE, IGNORE, IGNORE]]
    targets = torch.tensor(seq)
    logits = onehot_logits([[S, C0, C1, C0, C0, C0, C0]])
    starts, _ = span_bounds(targets, S, E)
    assert count_loss(logits, targets, starts, CODES, N).item() == pytest.approx((N - 2) / N, abs=1e-6)


def test_count_loss_gradient_pushes_code_mass_up_when_short():
    targets = torch.tensor([[S, C0, C1, C0, C1, E, TEXT]])
    logits = torch.zeros(1, 7, V, requires_grad=True)  # E = 5/3 < N
    starts, _ = span_bounds(targets, S, E)
    count_loss(logits, targets, starts, CODES, N).backward()
    g = logits.grad[0]
    assert (g[1:6, C0] < 0).all() and (g[1:6, TEXT] > 0).all()  # descent raises code logits
    assert float(g[0].abs().sum()) == 0.0 and float(g[6].abs().sum()) == 0.0  # outside the window


class LinearSoftDecoder(nn.Module):
    """soft_decode: p = softmax(logits / tau) over K = 2 codes with scalar codebook [0, 1];
    the map is the expected code value on a g x g grid (N = g * g)."""

    def __init__(self, grid: int = 2) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("codebook", torch.tensor([0.0, 1.0]))

    def soft_decode(self, logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        p = torch.softmax(logits / tau, dim=-1)
        return (p @ self.codebook).view(-1, self.grid, self.grid)


def test_rec_loss_hand_computed():
    dec = LinearSoftDecoder(grid=2)  # N = 4
    targets = torch.tensor([[S, C0, C1, C0, C1, E]])
    logits = torch.zeros(1, 6, V)
    logits[0, 1, C1] = math.log(3.0)  # p(code 1) = 3/4 at the first place, 1/2 elsewhere
    starts, ends = span_bounds(targets, S, E)
    teacher = torch.ones(1, 2, 2)
    # decoded map [[0.75, 0.5], [0.5, 0.5]] vs ones: (0.0625 + 3 * 0.25) / 4
    expected = (0.25**2 + 3 * 0.5**2) / 4
    out = rec_loss(logits, starts, ends, CODES, 4, dec, teacher, torch.tensor([True]))
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_rec_loss_only_code_logits_matter_and_teacher_is_resized():
    dec = LinearSoftDecoder(grid=2)
    targets = torch.tensor([[S, C0, C1, C0, C1, E]])
    logits = torch.zeros(1, 6, V)
    logits[0, 1:5, TEXT] = 30.0  # non-code logits are ignored: softmax is over the K codes only
    starts, ends = span_bounds(targets, S, E)
    teacher = torch.zeros(1, 8, 8)  # a constant map of another size
    out = rec_loss(logits, starts, ends, CODES, 4, dec, teacher, torch.tensor([True]))
    assert out.item() == pytest.approx(0.25, abs=1e-6)  # (0.5 - 0)^2


def test_rec_loss_pads_short_spans_and_skips_samples_without_map():
    dec = LinearSoftDecoder(grid=2)
    targets = torch.tensor([[S, C1, E, TEXT, TEXT, TEXT], [S, C0, C1, C0, C1, E]])
    logits = torch.zeros(2, 6, V)
    logits[0, 1, C1] = SHARP  # the one code place says code 1; 3 padded places are uniform
    starts, ends = span_bounds(targets, S, E)
    teacher = torch.ones(2, 2, 2)
    out = rec_loss(logits, starts, ends, CODES, 4, dec, teacher, torch.tensor([True, False]))
    assert out.item() == pytest.approx(3 * 0.25 / 4, abs=1e-6)  # [[1, .5], [.5, .5]] vs ones
    code_logits = span_code_logits(logits, starts, ends, CODES, 4, torch.tensor([0]))
    assert code_logits.shape == (1, 4, 2) and code_logits[0, 1:].abs().sum() == 0


def test_rec_loss_gradient_reaches_only_the_span_code_logits():
    dec = LinearSoftDecoder(grid=2)
    targets = torch.tensor([[TEXT, S, C0, C1, C0, C1, E, TEXT]])
    logits = torch.zeros(1, 8, V, requires_grad=True)
    starts, ends = span_bounds(targets, S, E)
    rec_loss(logits, starts, ends, CODES, 4, dec, torch.ones(1, 2, 2), torch.tensor([True])).backward()
    g = logits.grad[0]
    assert (g[2:6][:, [C0, C1]].abs() > 0).all()
    assert float(g[:, [TEXT, S, E, EOS]].abs().sum()) == 0.0
    assert float(g[[0, 1, 6, 7]].abs().sum()) == 0.0


def test_mask_bce_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # sigmoid: 1/2, 3/4, 1/2, 1/2
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    expected = (math.log(2) + math.log(4 / 3) + math.log(2) + math.log(2)) / 4
    assert mask_bce_loss(logits, gt).item() == pytest.approx(expected, abs=1e-6)


def test_mask_dice_hand_computed():
    logits = torch.zeros(1, 2, 2)  # p = 1/2 everywhere: sum p = 2
    gt = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # sum g = 1, sum pg = 1/2
    # 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5
    assert mask_dice_loss(logits, gt).item() == pytest.approx(0.5, abs=1e-6)
    perfect = torch.tensor([[[SHARP, -SHARP], [-SHARP, -SHARP]]])
    assert mask_dice_loss(perfect, gt).item() == pytest.approx(0.0, abs=1e-6)


def test_total_loss_weights():
    terms = {k: torch.tensor(v) for k, v in dict(llm=1.0, seg_bce=2.0, seg_dice=4.0, marker=3.0,
                                                  token=5.0, count=7.0, rec=11.0).items()}
    cfg = LossConfig(dice=0.25)  # SPEC §3 (the paper profiles): every weight 1.0, BCE 1.0, Dice 0.25
    assert total_loss(terms, cfg).item() == pytest.approx(1 + (2 + 1) + (3 + 5 + 7) + 11)
    cfg = LossConfig()  # the tiny profile: Dice 1.0
    assert total_loss(terms, cfg).item() == pytest.approx(1 + (2 + 4) + (3 + 5 + 7) + 11)
    cfg = LossConfig(w_seg=2.0, bce=1.0, dice=0.5, w_dtok=0.5, w_marker=2.0, w_token=1.0, w_count=0.0, w_rec=3.0)
    expected = 1 + 2 * (2 + 0.5 * 4) + 0.5 * (2 * 3 + 5 + 0) + 3 * 11
    assert total_loss(terms, cfg).item() == pytest.approx(expected)


def test_sequence_terms_on_a_batch_without_blocks_are_zero_but_llm():
    targets = torch.tensor([[TEXT, TEXT, EOS]])
    terms = sequence_terms(torch.zeros(1, 3, V), targets, S, E, CODES, N)
    assert terms["llm"].item() == pytest.approx(math.log(V), abs=1e-6)
    assert terms["marker"].item() == terms["token"].item() == terms["count"].item() == 0.0


def test_mask_terms_are_the_mean_over_seg_mask_pairs_by_hand():
    """Two (SEG, mask) pairs of 2 x 2 pixels: BCE is the mean over both pairs' pixels (every pair
    the same size: the mean of the per-pair means), Dice the mean of the per-pair Dice losses."""
    logits = torch.tensor([[[0.0, 2.0], [-2.0, 0.0]], [[1.0, 1.0], [1.0, -1.0]]])
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    bce_pairs, dice_pairs = [], []
    for lg, g in zip(logits.tolist(), gt.tolist()):
        px = [(x, y) for row_l, row_g in zip(lg, g) for x, y in zip(row_l, row_g)]
        bce_pairs.append(sum(-(y * math.log(sig(x)) + (1 - y) * math.log(1 - sig(x))) for x, y in px) / 4)
        inter = sum(sig(x) * y for x, y in px)
        dice_pairs.append(1 - (2 * inter + 1) / (sum(sig(x) for x, _ in px) + sum(y for _, y in px) + 1))
    assert float(mask_bce_loss(logits, gt)) == pytest.approx(sum(bce_pairs) / 2, rel=1e-6)
    assert float(mask_dice_loss(logits, gt)) == pytest.approx(sum(dice_pairs) / 2, rel=1e-6)
