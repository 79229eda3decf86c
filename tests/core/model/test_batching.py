"""Examples -> padded batches (SPEC §1 sequence layout, §3 label masking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptio_core.model.batching import (
    PerceptioCollator,
    TrainExample,
    encode_prompt,
    example_from_sample,
    prompt_text,
    select_examples,
)
from perceptio_core.model.internvl import add_perception_tokens, turn_end_id
from perceptio_core.model.processor import TileProcessor
from perceptio_core.model.losses import IGNORE
from perceptio_core.data.masks import encode_mask
from perceptio_core.format.target import format_target
from perceptio_core.curation.sample import Sample

from perceptio_helpers import examples, png_bytes, tiny_tokenizer, one_torch_thread  # noqa: F401

K, N, L = 16, 9, 16  # codebook, tokens per map, image tokens


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    ids = add_perception_tokens(tok, K)
    collate = PerceptioCollator(tok, ids, TileProcessor(tile_size=64, tokens_per_tile=L), sam2_image_size=32,
                                depth_size=12)
    return tok, ids, collate


def test_batch_layout(setup):
    tok, ids, collate = setup
    exs = examples(N, K)
    batch = collate(exs)
    b, t = batch["input_ids"].shape
    assert b == 2
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["num_tiles"].tolist() == [1, 1]
    assert batch["sam2_pixel_values"].shape == (2, 3, 32, 32)
    # one (SEG, mask) pair: example 0's
    assert batch["masks"].shape == (1, 32, 32) and batch["has_mask"].tolist() == [True, False]
    assert batch["seg_batch"].tolist() == [0] and batch["seg_positions"].shape == (1,)
    assert batch["depth_maps"].shape == (2, 12, 12) and batch["has_depth_map"].tolist() == [True, False]
    assert float(batch["sam2_pixel_values"][1].abs().sum()) == 0.0  # no mask: SAM2 input left empty
    for i, ex in enumerate(exs):
        prompt = encode_prompt(tok, ex.prompt, L)
        target = tok(ex.target, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
        n = len(prompt) + len(target)
        assert batch["input_ids"][i, :n].tolist() == prompt + target
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (t - n)
        # labels: image and prompt masked, the target (turn end included) kept, padding masked
        assert batch["labels"][i].tolist() == [IGNORE] * len(prompt) + target + [IGNORE] * (t - n)
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        # every image context token is masked
        ctx = batch["input_ids"][i] == tok.context_image_token_id
        assert int(ctx.sum()) == L and (batch["labels"][i][ctx] == IGNORE).all()


def test_tiles_follow_the_aspect_ratio_and_the_context_tokens_follow_the_tiles(setup):
    tok, ids, _ = setup
    collate = PerceptioCollator(tok, ids, TileProcessor(tile_size=64, tokens_per_tile=L, max_tiles=6),
                                sam2_image_size=32, depth_size=12)  # fmt: skip
    wide, square = examples(N, K)
    wide.image, wide.mask = png_bytes(40, 130), None  # 40 x 130 (h x w): aspect 3.25 -> 3 x 1 + thumbnail
    square.image = png_bytes(64, 64)  # one tile, no thumbnail
    batch = collate([wide, square])
    assert batch["num_tiles"].tolist() == [4, 1]
    assert batch["pixel_values"].shape == (5, 3, 64, 64)
    ctx = (batch["input_ids"] == tok.context_image_token_id).sum(1).tolist()
    assert ctx == [4 * L, L]
    # the second example's tile is the last one of pixel_values; select_examples cuts by num_tiles
    second = select_examples(batch, slice(1, 2))
    assert torch.equal(second["pixel_values"], batch["pixel_values"][4:])
    assert torch.equal(second["input_ids"], batch["input_ids"][1:])
    first = select_examples(batch, slice(0, 1))
    assert first["pixel_values"].shape[0] == 4 and first["num_tiles"].tolist() == [4]


def test_targets_end_with_the_chat_templates_turn_end(setup):
    tok, _, _ = setup
    assert tok.chat_template  # the tiny tokenizer carries InternVL's template
    assert turn_end_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    text = prompt_text(tok, "Where is it?", 2)
    assert text.startswith("<|im_start|>user\n<img>") and text.endswith("Where is it?<|im_end|>\n<|im_start|>assistant\n")


def test_positions_point_at_the_perception_tokens(setup):
    tok, ids, collate = setup
    batch = collate(examples(N, K))
    x = batch["input_ids"]
    seg, s, e = batch["seg_positions"], batch["d_start_positions"], batch["d_end_positions"]
    assert int(x[0, seg[0]]) == ids.seg and batch["seg_batch"].tolist() == [0]  # sample 1 has no [SEG]
    for i in range(2):
        assert int(x[i, s[i]]) == ids.d_start and int(x[i, e[i]]) == ids.d_end
        inner = x[i, s[i] + 1 : e[i]].tolist()
        assert len(inner) == N and set(inner) <= set(ids.codes)
    assert int(s[0]) == int(seg[0]) + 1  # [SEG]<d_start> adjacent: no separator token


def test_mask_and_depth_are_resized(setup):
    tok, ids, collate = setup
    ex = examples(N, K)[0]
    batch = collate([ex])
    mask = batch["masks"][0]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # the 40 x 48 mask with rows 10..24, cols 5..29 on: its fraction survives the square resize
    assert float(mask.mean()) == pytest.approx(ex.mask.mean(), abs=0.03)
    const = TrainExample(image=png_bytes(), prompt="p", target="t", depth_map=np.full((20, 20), 0.25, np.float32))
    assert torch.allclose(collate([const])["depth_maps"][0], torch.full((12, 12), 0.25))


def test_truncation_cuts_the_target_never_the_prompt(setup):
    tok, ids, _ = setup
    ex = examples(N, K)[0]
    prompt_len = len(encode_prompt(tok, ex.prompt, L))
    collate = PerceptioCollator(tok, ids, TileProcessor(tile_size=64, tokens_per_tile=L), 32, 12, max_length=prompt_len + 4)
    batch = collate([ex])
    assert batch["input_ids"].shape[1] == prompt_len + 4
    assert int(batch["d_start_positions"][0]) == prompt_len + 1 and int(batch["d_end_positions"][0]) == -1
    tight = PerceptioCollator(tok, ids, TileProcessor(tile_size=64, tokens_per_tile=L), 32, 12, max_length=prompt_len)
    with pytest.raises(ValueError, match="does not fit"):
        tight([ex])


def test_mask_must_match_the_image(setup):
    _, _, collate = setup
    bad = TrainExample(image=png_bytes(40, 48), prompt="p", target="[SEG] t", mask=np.ones((10, 10), np.uint8))
    with pytest.raises(ValueError, match="does not match image"):
        collate([bad])


def test_example_from_sample_decodes_the_rle(setup):
    _, _, collate = setup
    mask = np.zeros((40, 48), dtype=bool)
    mask[5:10, 5:20] = True
    codes = list(range(N))
    sample = Sample(
        key="refcoco-unc-train-r1-s1", source="refcoco", split="train", task="refer_seg", image_digest="0" * 64,
        image=png_bytes(), prompt="Segment the cube.", target=format_target(True, codes, "A cube."),
        answer="A cube.", masks_rle=[encode_mask(mask)], depth_tokens=codes,
    )
    depth = np.zeros((12, 12), np.float32)
    ex = example_from_sample(sample, depth)
    (m,) = ex.all_masks()
    assert m.dtype == np.uint8 and np.array_equal(m.astype(bool), mask)
    assert ex.depth_tokens == codes and ex.depth_map is depth
    batch = collate([ex])
    assert batch["has_mask"].tolist() == [True] and batch["has_depth_map"].tolist() == [True]


def test_chat_template_is_used_when_present():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    text = prompt_text(tok, "What is it?", 4)
    assert text == "<s>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat is it?</s>\n<s>assistant\n"
    ids = encode_prompt(tok, "What is it?", 4)
    assert ids[0] == tok.bos_token_id and ids.count(tok.context_image_token_id) == 4
    plain = tiny_tokenizer()
    plain.chat_template = None
    assert prompt_text(plain, " What is it? ", 2) == "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is it?\n"


# ------------------------------------------------------------------------------------------
# several [SEG] per sequence, multi-round conversations, text-only examples (SPEC §1, §5)
# ------------------------------------------------------------------------------------------


def _three_round_example(codes):
    masks = []
    for r0, c0 in ((0, 0), (10, 20), (30, 30)):
        m = np.zeros((40, 48), np.uint8)
        m[r0 : r0 + 8, c0 : c0 + 12] = 1
        masks.append(m)
    return TrainExample(
        image=png_bytes(seed=3), prompt="Segment the red cube.", target=format_target(True, codes, "A red cube."),
        masks=masks, rounds=[("Segment the ball.", "[SEG] A ball."), ("And the cone?", "[SEG] A cone.")],
    )  # fmt: skip


def test_three_rounds_three_masks(setup):
    tok, ids, collate = setup
    codes = list(range(N))
    ex = _three_round_example(codes)
    batch = collate([examples(N, K)[1], ex])  # example 0: no [SEG]; example 1: 3 rounds, 3 masks
    end = tok.convert_tokens_to_ids("<|im_end|>")
    x, lab = batch["input_ids"][1], batch["labels"][1]
    n = int(batch["attention_mask"][1].sum())
    # the whole conversation is the chat template's rendering, turn by turn
    full = tok.apply_chat_template(
        [{"role": "user", "content": "<img>" + "<IMG_CONTEXT>" * L + "</img>\nSegment the red cube."},
         {"role": "assistant", "content": ex.target},
         {"role": "user", "content": "Segment the ball."}, {"role": "assistant", "content": "[SEG] A ball."},
         {"role": "user", "content": "And the cone?"}, {"role": "assistant", "content": "[SEG] A cone."}],
        tokenize=False)  # fmt: skip
    assert tok.decode(x[:n].tolist(), skip_special_tokens=False) + "\n" == full
    # labels: exactly the three targets with their turn ends, in order
    labelled = [int(t) for t in lab[:n] if int(t) != IGNORE]
    want = []
    for t in (ex.target, "[SEG] A ball.", "[SEG] A cone."):
        want += tok(t, add_special_tokens=False).input_ids + [end]
    assert labelled == want
    assert (lab[:n][lab[:n] != IGNORE] == x[:n][lab[:n] != IGNORE]).all()
    # user turns stay unlabelled: the second and third prompts' tokens are -100
    for q in ("Segment the ball.", "And the cone?"):
        q_ids = tok(q, add_special_tokens=False).input_ids
        starts = [j for j in range(n - len(q_ids)) if x[j : j + len(q_ids)].tolist() == q_ids]
        assert len(starts) == 1 and (lab[starts[0] : starts[0] + len(q_ids)] == IGNORE).all()
    # three pairs, all example 1's, at its three [SEG] tokens in order
    assert batch["masks"].shape == (3, 32, 32)
    assert batch["seg_batch"].tolist() == [1, 1, 1] and batch["has_mask"].tolist() == [False, True]
    pos = batch["seg_positions"].tolist()
    assert pos == sorted(pos) and all(int(x[p]) == ids.seg for p in pos)
    assert [p for p in range(n) if int(x[p]) == ids.seg] == pos
    for k, m in enumerate(ex.masks):  # mask k is the resized mask of round k
        assert float(batch["masks"][k].mean()) == pytest.approx(m.mean(), abs=0.03)
    assert not torch.equal(batch["masks"][0], batch["masks"][1])
    # one depth block, in round 1
    assert int((x == ids.d_start).sum()) == 1 and int(batch["d_start_positions"][1]) == pos[0] + 1
    # select_examples keeps an example's pairs and renumbers seg_batch
    one = select_examples(batch, slice(1, 2))
    assert one["seg_batch"].tolist() == [0, 0, 0] and torch.equal(one["masks"], batch["masks"])
    assert select_examples(batch, slice(0, 1))["masks"].shape == (0, 32, 32)


def test_a_seg_without_a_mask_gets_no_pair(setup):
    _, _, collate = setup
    ex = _three_round_example(list(range(N)))
    ex.masks = ex.masks[:2]  # three [SEG], two masks: the first two pair up
    batch = collate([ex])
    assert batch["seg_batch"].tolist() == [0, 0] and batch["masks"].shape == (2, 32, 32)


def test_llava_multi_turn_and_text_only_examples(setup):
    tok, ids, collate = setup
    end = tok.convert_tokens_to_ids("<|im_end|>")
    multi = TrainExample(image=png_bytes(seed=5), prompt="What is shown?", target="Noise.",
                         rounds=[("Sure?", "Yes."), ("Colour?", "Many.")])
    text = TrainExample(image=b"", prompt="hi", target="hello", rounds=[("how are you?", "fine")])
    batch = collate([text, multi])
    assert batch["num_tiles"].tolist() == [0, 1] and batch["pixel_values"].shape == (1, 3, 64, 64)
    assert batch["masks"].shape == (0, 32, 32) and batch["seg_positions"].numel() == 0
    for i, (ex, img) in enumerate(((text, False), (multi, True))):
        n = int(batch["attention_mask"][i].sum())
        x, lab = batch["input_ids"][i, :n], batch["labels"][i, :n]
        ctx = int((x == tok.context_image_token_id).sum())
        assert ctx == (L if img else 0)
        labelled = [int(t) for t in lab if int(t) != IGNORE]
        want = []
        for t in [ex.target] + [a for _, a in ex.rounds]:
            want += tok(t, add_special_tokens=False).input_ids + [end]
        assert labelled == want  # every assistant turn labelled, nothing else
    # the text-only prompt is the chat template's without any image string
    assert tok.decode(batch["input_ids"][0, : len(encode_prompt(tok, "hi", 0))].tolist()) == prompt_text(tok, "hi", 0)
    assert "<img>" not in prompt_text(tok, "hi", 0)
    # a batch of text-only examples has no tiles at all
    only = collate([text])
    assert only["pixel_values"].shape == (0, 3, 64, 64) and only["num_tiles"].tolist() == [0]
    with pytest.raises(ValueError, match="text-only"):
        collate([TrainExample(image=None, prompt="p", target="[SEG] t", mask=np.ones((4, 4), np.uint8))])


def test_example_from_a_multi_round_sample(setup):
    _, _, collate = setup
    masks = [np.zeros((40, 48), bool) for _ in range(2)]
    masks[0][0:10, 0:10] = True
    masks[1][20:30, 20:40] = True
    codes = list(range(N))
    sample = Sample(
        key="refcoco-unc-train-i1", source="refcoco", split="train", task="refer_seg", image_digest="0" * 64,
        image=png_bytes(), prompt="Segment a.", target=format_target(True, codes, "A."), answer="A.",
        masks_rle=[encode_mask(m) for m in masks], depth_tokens=codes,
        rounds=[{"prompt": "Segment b.", "target": "[SEG] B."}],
    )  # fmt: skip
    ex = example_from_sample(sample)
    assert ex.rounds == [("Segment b.", "[SEG] B.")]
    assert [m.astype(bool).tolist() for m in ex.all_masks()] == [m.tolist() for m in masks]
    batch = collate([ex])
    assert batch["seg_batch"].tolist() == [0, 0] and batch["masks"].shape == (2, 32, 32)
    text = Sample(key="llava-1-x", source="llava", split="train", task="instruct", image_digest="", image=b"",
                  prompt="hi", target="hello", answer="hello")
    assert example_from_sample(text).image is None and not example_from_sample(text).has_image
