"""The ablations' curation (paper §4.2): a variant takes its perception signal out of every target
and drops the samples that only teach it; all else is the full model's sample."""

import pytest

from perceptio_core.config import CurateConfig, ConfigError
from perceptio_core.format.target import ParseStatus, drop_perception, parse_generation

from test_curate import K, N, _run, world  # noqa: F401  (the module's world fixture)

FULL_TASKS = ["refer_seg", "semantic_seg", "depth_cot", "instruct", "grounded_conv"]


def test_drop_perception_golden_strings():
    t = "[SEG]<d_start><d_3><d_12><d_end> A red cube."
    assert drop_perception(t, seg=False) == "<d_start><d_3><d_12><d_end> A red cube."
    assert drop_perception(t, depth=False) == "[SEG] A red cube."
    assert drop_perception(t, seg=False, depth=False) == "A red cube."
    assert drop_perception("[SEG] the ball on the left.", seg=False) == "the ball on the left."
    assert drop_perception("<d_start><d_1><d_end> A cube [SEG] near a ball [SEG].", seg=False) == \
        "<d_start><d_1><d_end> A cube near a ball."
    assert drop_perception("<d_start><d_1><d_end> (B)", depth=False) == "(B)"
    assert drop_perception(t) == t


def test_no_depth_targets_have_no_depth_block_and_no_depth_cot(world):  # noqa: F811
    src, tokens, maps = world
    full, _ = _run(src, tokens, maps)
    cfg = CurateConfig(perception=["seg"], tasks=[t for t in FULL_TASKS if t != "depth_cot"])
    samples, stats = _run(src, tokens, maps, cfg)
    assert {s.task for s in samples} == {"refer_seg", "semantic_seg"}
    by_key = {s.key: s for s in full}
    for s in samples:
        assert s.depth_tokens is None
        for _, target in s.turns:
            assert "<d_start>" not in target and "<d_" not in target and target.startswith("[SEG]")
        f = by_key[s.key]  # the full model's sample, less its depth block
        assert s.masks_rle == f.masks_rle and s.answer == f.answer and s.prompt == f.prompt
        assert [t for _, t in s.turns] == [drop_perception(t, depth=False) for _, t in f.turns]
    assert len(samples) == sum(1 for s in full if s.task != "depth_cot")


def test_no_seg_targets_have_no_seg_and_refer_keeps_its_depth_block(world):  # noqa: F811
    src, tokens, maps = world
    cfg = CurateConfig(perception=["depth"], tasks=[t for t in FULL_TASKS if t not in ("semantic_seg", "grounded_conv")])
    samples, _ = _run(src, tokens, maps, cfg)
    assert {s.task for s in samples} == {"refer_seg", "depth_cot"}
    for s in samples:
        assert s.masks_rle == []
        assert all("[SEG]" not in t for _, t in s.turns)
        if s.task == "refer_seg":  # round 1: the depth block and the answer; later rounds: the answer
            p = parse_generation(s.target, N, K, expect_seg=False)
            assert p.status == ParseStatus.OK and p.depth_indices == tokens[s.image_digest].tolist()
            assert p.answer == s.answer and s.depth_tokens is not None
            assert all(t == r["answer"] for (_, t), r in zip(s.turns[1:], s.meta["rounds"][1:]))


@pytest.mark.parametrize("kw, what", [
    (dict(perception=["seg"]), "depth_cot"),
    (dict(perception=["depth"]), "semantic_seg and grounded_conv"),
    (dict(perception=["seg", "colour"]), "unknown signal"),
])
def test_a_signal_off_with_the_tasks_that_teach_it_is_refused(kw, what):
    with pytest.raises(ConfigError, match=what):
        CurateConfig(**kw)
