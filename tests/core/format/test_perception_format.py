"""The target formatter and the generation parser (SPEC §1, §6): round trips and malformed cases."""

import numpy as np
import pytest

from perceptio_core.format.target import ParseStatus, format_block, format_target, parse_generation
from perceptio_core.format.tokens import D_END, D_START, SEG, depth_token
from perceptio_core.format.prompts import HARDBLINK_QUESTION, TEMPLATES, render_prompt, template_index

K, N = 16, 9


def _codes(seed=0):
    return np.random.default_rng(seed).integers(0, K, size=N).tolist()


@pytest.mark.parametrize("has_seg", [True, False])
@pytest.mark.parametrize("answer", ["A small red ball on the left side of the image.", "(B)", "line one\nline two"])
def test_round_trip_with_depth(has_seg, answer):
    codes = _codes()
    text = format_target(has_seg, codes, answer)
    p = parse_generation(text, num_tokens=N, codebook_size=K)
    assert p.has_seg is has_seg
    assert p.depth_indices == codes
    assert p.answer == answer
    assert p.status == (ParseStatus.OK if has_seg else ParseStatus.NO_SEG)
    assert parse_generation(text, N, K, expect_seg=False).status == ParseStatus.OK


def test_k_and_n_are_always_given():
    """No N or K is assumed by the parser: they are the depth codec's, passed by every caller."""
    import inspect

    params = inspect.signature(parse_generation).parameters
    assert params["num_tokens"].default is inspect.Parameter.empty
    assert params["codebook_size"].default is inspect.Parameter.empty
    text = format_target(True, [0, 1, 2, 3], "A cup.")
    assert parse_generation(text, 4, 16).status == ParseStatus.OK
    assert parse_generation(text, 4, 4).status == ParseStatus.OK
    assert parse_generation(text, 9, 16).status == ParseStatus.WRONG_COUNT
    assert parse_generation(text, 4, 3).status == ParseStatus.BAD_CODE  # <d_3> is not a code when K = 3


def test_layout_and_spacing():
    text = format_target(True, [3, 1], "A cup.")
    assert text == f"{SEG}{D_START}{depth_token(3)}{depth_token(1)}{D_END} A cup."
    assert format_target(False, None, "  plain  ") == "plain"
    assert format_target(True, None, "x") == f"{SEG} x"
    assert format_block(False, None) == ""
    with pytest.raises(ValueError):
        format_block(True, [])


def test_text_only_and_seg_only():
    p = parse_generation("just text", N, K)
    assert (p.status, p.has_seg, p.answer, p.depth_indices) == (ParseStatus.NO_BLOCK, False, "just text", None)
    p = parse_generation(format_target(True, None, "grounded"), N, K)
    assert (p.status, p.has_seg, p.answer) == (ParseStatus.NO_BLOCK, True, "grounded")


def test_tolerates_whitespace_and_leading_text():
    codes = _codes(1)
    text = "Sure. " + SEG + " " + D_START + " " + " ".join(depth_token(c) for c in codes) + " " + D_END + "  ans "
    p = parse_generation(text, N, K)
    assert p.status == ParseStatus.OK and p.depth_indices == codes and p.answer == "Sure. ans"


def _block(codes):
    return "".join(depth_token(c) for c in codes)


@pytest.mark.parametrize(
    "text,status",
    [
        (SEG + _block([1] * N) + D_END + " a", ParseStatus.MISSING_START),
        (SEG + D_START + _block([1] * N) + " a", ParseStatus.MISSING_END),
        (SEG + D_START + _block([1] * (N - 1)) + D_END + " a", ParseStatus.WRONG_COUNT),
        (SEG + D_START + _block([1] * (N + 2)) + D_END + " a", ParseStatus.WRONG_COUNT),
        (SEG + D_START + _block([1] * (N - 1) + [K]) + D_END + " a", ParseStatus.BAD_CODE),
        (SEG + D_START + _block([1] * (N - 1)) + "<d_x>" + D_END + " a", ParseStatus.BAD_CODE),
        (SEG + D_START + _block([1] * 4) + " word " + _block([1] * 5) + D_END + " a", ParseStatus.BAD_CODE),
        (D_START + SEG + _block([1] * N) + D_END + " a", ParseStatus.BAD_CODE),
        (D_START + _block([2] * N) + D_END + " a", ParseStatus.NO_SEG),
    ],
)
def test_malformed(text, status):
    p = parse_generation(text, N, K)
    assert p.status == status
    if status != ParseStatus.NO_SEG:
        assert p.depth_indices is None
    assert p.answer == "a"


def test_missing_end_keeps_leading_codes_and_answer():
    p = parse_generation(D_START + _block([4, 5, 6]) + " (C)", N, K)
    assert p.status == ParseStatus.MISSING_END and p.raw_codes == [4, 5, 6] and p.answer == "(C)"


def test_prompts_deterministic_by_key():
    a = render_prompt("refer_seg", "refcoco-unc-train-r1-s2", expr="man on the left")
    assert a == render_prompt("refer_seg", "refcoco-unc-train-r1-s2", expr="man on the left")
    assert "man on the left" in a
    used = {template_index("refer_seg", f"k{i}") for i in range(200)}
    assert used == set(range(len(TEMPLATES["refer_seg"])))
    assert render_prompt("depth_cot", variant=0, question=HARDBLINK_QUESTION).startswith(HARDBLINK_QUESTION)
