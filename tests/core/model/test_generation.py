"""Generation (SPEC §1): constrained perception decoding, KV-cache equivalence, mask and depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptio_core.model.generation import PerceptionConstraint, generate, generate_ids
from perceptio_core.model.internvl import PerceptionTokenIds, to_pil_rgb
from perceptio_core.model.batching import encode_prompt
from perceptio_core.format.target import ParseStatus, parse_generation

from perceptio_helpers import build_tiny, png_bytes, one_torch_thread, tiny_depth_tokenizer  # noqa: F401

PROMPT = "Please segment the object described as: the red cube."


def _perturbed(seed: int, depth_tokenizer=None):
    m = build_tiny(depth_tokenizer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _perturbed(0)


TID = PerceptionTokenIds(seg=10, d_start=11, d_end=12, codes=(13, 14, 15))


def test_constraint_restricts_inside_a_block_only():
    c = PerceptionConstraint(TID, num_tokens=2, forbid_stray=False)
    scores = torch.zeros(4, 20)
    ids = torch.tensor(
        [
            [1, 2, 3, 4],  # no block: untouched
            [1, 10, 11, 13],  # one code so far: codes only
            [10, 11, 13, 14],  # N codes: <d_end> forced
            [11, 13, 14, 12],  # closed block: untouched
        ]
    )
    out = c(ids, scores)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()
    assert torch.isfinite(out[1]).nonzero().squeeze(1).tolist() == [13, 14, 15]
    assert torch.isfinite(out[2]).nonzero().squeeze(1).tolist() == [12]
    assert torch.equal(scores, torch.zeros(4, 20))  # input not modified
    assert c.open_count([11]) == 0 and c.open_count([11, 13, 12]) is None and c.open_count([]) is None


def test_constraint_forbids_codes_and_d_end_outside_a_block_by_default():
    c = PerceptionConstraint(TID, num_tokens=2)
    ids = torch.tensor([[1, 2, 3, 4], [10, 11, 13, 14], [11, 13, 14, 12]])  # none, full block, closed
    out = c(ids, torch.zeros(3, 20))
    stray = [12, 13, 14, 15]
    for row in (0, 2):  # before and after a block: everything but the codes and <d_end>
        assert sorted(set(range(20)) - set(torch.isfinite(out[row]).nonzero().squeeze(1).tolist())) == stray
        assert torch.isfinite(out[row, [10, 11]]).all()  # [SEG] and <d_start> stay allowed
    assert torch.isfinite(out[1]).nonzero().squeeze(1).tolist() == [12]  # inside: <d_end> forced


@pytest.mark.parametrize("prefix", ["<d_start>", "[SEG]<d_start>"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_decoding_gives_exactly_n_codes_then_d_end(prefix, seed):
    m = _perturbed(seed)
    n, tid = m.num_depth_tokens, m.token_ids
    for beams in (1, 3):
        r = generate(m, m.tokenizer, png_bytes(seed=seed), PROMPT, max_new_tokens=n + 4, num_beams=beams,
                     response_prefix=prefix, want_mask=False, want_depth=False)
        ids = r.token_ids
        s = ids.index(tid.d_start)
        assert all(t in tid.codes for t in ids[s + 1 : s + 1 + n]), (beams, ids)
        assert ids[s + 1 + n] == tid.d_end
        assert r.depth_indices == [tid.codes.index(t) for t in ids[s + 1 : s + 1 + n]]


def test_k_and_n_are_the_codecs():
    """A codec of K = 16 codes on a 2 x 2 grid (N = 4): the vocabulary, the constraint, the parse
    and the decoded map all follow it."""
    m = _perturbed(0, tiny_depth_tokenizer(codebook_size=16, grid=2, input_size=8))
    tid = m.token_ids
    assert (m.codebook_size, m.num_depth_tokens) == (16, 4) and len(tid.codes) == 16
    r = generate(m, m.tokenizer, png_bytes(), PROMPT, max_new_tokens=12, response_prefix="[SEG]<d_start>")
    s = r.token_ids.index(tid.d_start)
    assert all(t in tid.codes for t in r.token_ids[s + 1 : s + 5]) and r.token_ids[s + 5] == tid.d_end
    assert r.status == ParseStatus.OK and len(r.depth_indices) == 4 and max(r.depth_indices) < 16
    assert r.depth_map.shape == (8, 8)
    assert parse_generation(r.raw_text, 9, 16).status == ParseStatus.WRONG_COUNT  # another N: not this block


def test_unconstrained_decoding_is_not_forced(model):
    # with a prefix that opens a block, an unconstrained random model does not close it properly
    r = generate(model, model.tokenizer, png_bytes(), PROMPT, max_new_tokens=model.num_depth_tokens + 2,
                 constrained=False, response_prefix="<d_start>", want_mask=False)
    c = generate(model, model.tokenizer, png_bytes(), PROMPT, max_new_tokens=model.num_depth_tokens + 2,
                 constrained=True, response_prefix="<d_start>", want_mask=False)
    assert c.status in (ParseStatus.OK, ParseStatus.NO_SEG) and c.depth_indices is not None
    assert r.token_ids != c.token_ids


@pytest.mark.parametrize("beams", [1, 3])
def test_kv_cache_and_full_recompute_agree(model, beams):
    tok = model.tokenizer
    px = model.image_processor(to_pil_rgb(png_bytes()))
    prompt = encode_prompt(tok, PROMPT, model.image_processor.tokens_per_tile * len(px))
    stops = {tok.eos_token_id}
    for constraint in (None, PerceptionConstraint(model.token_ids, model.num_depth_tokens)):
        prefix = tok("[SEG]<d_start>", add_special_tokens=False).input_ids if constraint else []
        cached, s1 = generate_ids(model, prompt, px, 24, stops, constraint, beams, True, prefix)
        plain, s2 = generate_ids(model, prompt, px, 24, stops, constraint, beams, False, prefix)
        assert cached == plain
        assert s1 == pytest.approx(s2, abs=1e-3)
        assert len(set(cached)) > 1  # not a degenerate repetition of one token


def test_greedy_picks_the_argmax_of_the_full_forward(model):
    tok = model.tokenizer
    px = model.image_processor(to_pil_rgb(png_bytes()))
    prompt = encode_prompt(tok, PROMPT, model.image_processor.tokens_per_tile * len(px))
    ids, _ = generate_ids(model, prompt, px, 5, {tok.eos_token_id})
    with torch.no_grad():
        logits = model.lm_forward(torch.tensor([prompt + ids[:-1]]), pixel_values=px, logits_from=0).logits
    expected = logits[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert ids == expected


def test_generate_returns_mask_depth_and_seg_state(model):
    image = png_bytes(40, 48, seed=3)
    r = generate(model, model.tokenizer, image, PROMPT, max_new_tokens=model.num_depth_tokens + 6,
                 response_prefix="[SEG]<d_start>")
    assert r.token_ids[0] == model.token_ids.seg
    assert r.mask is not None and r.mask.shape == (40, 48) and r.mask.dtype == np.bool_
    assert np.array_equal(r.mask, 1 / (1 + np.exp(-r.mask_logits)) > 0.5)
    assert r.depth_indices is not None and len(r.depth_indices) == model.num_depth_tokens
    expected_map = model.decode_depth(torch.tensor([r.depth_indices]))[0].numpy()
    assert np.allclose(r.depth_map, expected_map)
    # seg_hidden is the state at the [SEG] token's own position in a full pass
    tok = model.tokenizer
    px = model.image_processor(to_pil_rgb(image))
    prompt = encode_prompt(tok, PROMPT, model.image_processor.tokens_per_tile * len(px))
    with torch.no_grad():
        h = model.lm_forward(torch.tensor([prompt + r.token_ids]), pixel_values=px, logits_from=None).hidden
    assert torch.allclose(r.seg_hidden, h[0, len(prompt)], atol=1e-5)
    assert "<d_" not in r.text and "[SEG]" not in r.text
    assert r.raw_text.startswith("[SEG]<d_start>")


def test_sam2_and_vqvae_run_only_when_asked(model, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("should not run")

    monkeypatch.setattr(model.sam2, "encode_image", boom)
    monkeypatch.setattr(model.depth_tokenizer, "decode", boom)
    r = generate(model, model.tokenizer, png_bytes(), PROMPT, max_new_tokens=model.num_depth_tokens + 4,
                 response_prefix="[SEG]<d_start>", want_mask=False, want_depth=False)
    assert r.mask is None and r.depth_map is None
    assert r.seg_hidden is not None and r.depth_indices is not None


def test_no_seg_no_mask(model):
    # the response is the forced "(A)" alone (nothing generated), so whatever the random weights
    # would emit, no [SEG] is in it
    r = generate(model, model.tokenizer, png_bytes(), "What is it?", max_new_tokens=0, response_prefix="(A)")
    assert r.text == "(A)"
    assert model.token_ids.seg not in r.token_ids
    assert r.seg_hidden is None and r.mask is None and r.depth_indices is None


def test_generation_stops_on_every_eos_id_of_the_checkpoint(model):
    """InternVL2.5-8B's tokenizer eos is ``</s>`` but its turns end with ``<|im_end|>``, listed in
    ``generation_config.eos_token_id``: generation stops on any id there, not only the tokenizer's."""
    from perceptio_core.model.internvl import stop_token_ids, turn_end_id

    gc = model.base_model.generation_config
    saved = gc.eos_token_id
    try:
        free = generate(model, model.tokenizer, png_bytes(), PROMPT, max_new_tokens=6, constrained=False,
                        want_mask=False, want_depth=False)  # fmt: skip
        third = free.token_ids[2]
        assert third not in free.token_ids[:2] and third != model.tokenizer.eos_token_id
        gc.eos_token_id = [int(model.tokenizer.eos_token_id), int(third)]
        end = turn_end_id(model.tokenizer)  # <|im_end|>, from the chat template
        assert stop_token_ids(model.base_model, model.tokenizer) == {model.tokenizer.eos_token_id, end, third}
        stopped = generate(model, model.tokenizer, png_bytes(), PROMPT, max_new_tokens=6, constrained=False,
                           want_mask=False, want_depth=False)  # fmt: skip
        assert stopped.token_ids == free.token_ids[:2]  # ends at the checkpoint's end-of-turn id
        gc.eos_token_id = int(third)
        assert stop_token_ids(model.base_model, model.tokenizer, [7]) == {model.tokenizer.eos_token_id, end, third, 7}
    finally:
        gc.eos_token_id = saved


def test_every_seg_of_the_response_gives_its_own_mask(model):
    """Three [SEG] forced in the response: three masks, each SAM2 prompted by the state at its own
    [SEG] token; ``mask`` is the first (SPEC §1, several objects)."""
    img = png_bytes(seed=2)
    r = generate(model, model.tokenizer, img, PROMPT, max_new_tokens=0,
                 response_prefix="[SEG] a cube [SEG] and a ball [SEG].")  # fmt: skip
    assert r.parsed.n_seg == 3 and len(r.masks) == len(r.masks_logits) == 3
    assert r.seg_hiddens.shape == (3, model.hidden_size) and torch.equal(r.seg_hidden, r.seg_hiddens[0])
    assert r.mask is r.masks[0] and r.mask_logits is r.masks_logits[0]
    pil = to_pil_rgb(img)
    assert all(m.shape == (pil.height, pil.width) and m.dtype == bool for m in r.masks)
    # the reference: one pass, the state at each [SEG], SAM2 one mask at a time
    tiles = model.image_processor(pil)
    prompt_ids = encode_prompt(model.tokenizer, PROMPT, model.image_processor.tokens_per_tile * len(tiles))
    ids = torch.tensor([prompt_ids + r.token_ids])
    with torch.no_grad():
        h = model.lm_forward(ids, pixel_values=tiles.to(model.base_model.dtype), logits_from=None).hidden[0]
        at = [len(prompt_ids) + j for j, t in enumerate(r.token_ids) if t == model.token_ids.seg]
        assert len(at) == 3
        from perceptio_core.model.sam2_decoder import sam2_pixel_values

        px = sam2_pixel_values(pil, model.sam2.image_size)[None]
        for k, p in enumerate(at):
            assert torch.allclose(r.seg_hiddens[k], h[p].float(), atol=1e-5)
            want = model.predict_mask_logits(h[p][None], px, (pil.height, pil.width))[0, 0].float().numpy()
            np.testing.assert_allclose(r.masks_logits[k], want, atol=1e-4)
    assert not np.array_equal(r.masks_logits[0], r.masks_logits[1])  # different states, different masks
    # no [SEG]: no masks
    none = generate(model, model.tokenizer, img, "What is it?", max_new_tokens=0, response_prefix="(A)")
    assert none.masks == [] and none.mask is None and none.seg_hiddens is None


@pytest.mark.parametrize("prefix", ["", "[SEG]<d_start>"])
@pytest.mark.parametrize("constrained", [True, False])
def test_a_left_padded_batch_equals_each_pair_alone(model, prefix, constrained):
    """generate_batch: prompts of different lengths (left padding), images of different sizes and
    tile counts, rows stopping at different steps: every row's tokens equal generate() alone, and
    so do its text, block status, depth codes, depth map and masks."""
    from perceptio_core.model.generation import generate_batch

    n = model.num_depth_tokens
    images = [png_bytes(40, 48, seed=1), png_bytes(96, 30, seed=2), png_bytes(33, 33, seed=3), png_bytes(60, 20, seed=4)]
    prompts = [PROMPT, "What is it?", "Which point is closer to the camera, A or B? Think about depth first.",
               "Segment: the small cube on the left next to the ball."]
    kw = dict(max_new_tokens=n + 8, constrained=constrained, response_prefix=prefix)
    # a stop token that ends some rows early and others not (the perturbed model emits no eos)
    first = [generate(model, model.tokenizer, im, pr, want_mask=False, want_depth=False, **kw).token_ids
             for im, pr in zip(images, prompts)]
    late = [t for ids in first for t in ids[len(ids) // 2:] if t not in model.token_ids.codes]
    kw["extra_stop_ids"] = [max(set(late), key=late.count)] if late else []
    batch = generate_batch(model, model.tokenizer, images, prompts, **kw)
    alone = [generate(model, model.tokenizer, im, pr, **kw) for im, pr in zip(images, prompts)]
    assert len({len(r.token_ids) for r in alone}) > 1  # rows of different lengths
    for got, want in zip(batch, alone):
        assert got.token_ids == want.token_ids
        assert (got.text, got.raw_text, got.status, got.depth_indices) == (want.text, want.raw_text, want.status,
                                                                           want.depth_indices)
        assert got.score == pytest.approx(want.score, abs=1e-3)
        assert (got.depth_map is None) == (want.depth_map is None)
        if want.depth_map is not None:
            assert np.allclose(got.depth_map, want.depth_map, atol=1e-5)
        assert len(got.masks) == len(want.masks)
        for a, b in zip(got.masks_logits, want.masks_logits):
            assert np.allclose(a, b, atol=1e-4)
    assert generate_batch(model, model.tokenizer, [], []) == []
