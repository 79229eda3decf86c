"""The InternVL side (SPEC §1, §4): tokenizer training and extension, tiny config, token rows, LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from perceptio_core.config import ModelConfig, TinyVLMConfig
from perceptio_core.model.internvl import (
    IMAGE_TOKENS,
    add_perception_tokens,
    apply_lora,
    build_tiny_internvl,
    image_seq_length,
    image_tokens,
    init_new_token_rows,
    lora_target_regex,
    new_token_rows,
    perception_token_ids,
    tiny_internvl_config,
    train_tokenizer,
)
from perceptio_core.model.processor import IMAGENET_MEAN, IMAGENET_STD, TileProcessor
from perceptio_core.format.target import format_target
from perceptio_core.format.tokens import D_END, D_START, SEG, perception_tokens

from perceptio_helpers import CORPUS, tiny_tokenizer, one_torch_thread  # noqa: F401

K = 16


def test_train_tokenizer_saves_and_loads_like_a_released_one(tmp_path):
    tok = train_tokenizer(CORPUS, 320, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(loaded) == len(tok) == 320
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<s>", "</s>")
    assert loaded.context_image_token == IMAGE_TOKENS["context_image_token"]
    assert image_tokens(loaded) == ("<img>", "<IMG_CONTEXT>", "</img>")
    assert loaded.chat_template == tok.chat_template  # saved beside it, as the "-hf" checkpoints ship it
    assert loaded.convert_tokens_to_ids("<|im_end|>") == tok.convert_tokens_to_ids("<|im_end|>")
    text = "a red cube, naïve 3D world! ✓"
    assert loaded.decode(loaded(text, add_special_tokens=False).input_ids) == text  # byte level
    ids = loaded("<img><IMG_CONTEXT><IMG_CONTEXT></img>", add_special_tokens=False).input_ids
    assert ids[1] == ids[2] == loaded.context_image_token_id and len(ids) == 4


def test_train_tokenizer_rejects_a_vocabulary_below_the_byte_alphabet():
    with pytest.raises(ValueError, match="byte alphabet"):
        train_tokenizer(CORPUS, 100)


def test_add_perception_tokens_grows_by_k_plus_3_and_is_idempotent():
    tok = tiny_tokenizer()
    before = len(tok)
    ids = add_perception_tokens(tok, K)
    assert len(tok) == before + K + 3
    assert tok.convert_ids_to_tokens(ids.all) == perception_tokens(K)
    assert add_perception_tokens(tok, K) == ids and len(tok) == before + K + 3
    assert perception_token_ids(tok, K) == ids


def test_a_formatted_target_tokenizes_to_exactly_the_block_tokens():
    tok = tiny_tokenizer()
    ids = add_perception_tokens(tok, K)
    codes = [3, 0, 15, 7, 7]
    enc = tok(format_target(True, codes, "A red cube."), add_special_tokens=False).input_ids
    assert enc[:2] == [ids.seg, ids.d_start]
    assert enc[2 : 2 + len(codes)] == [ids.codes[c] for c in codes]
    assert enc[2 + len(codes)] == ids.d_end
    assert tok.decode(enc, skip_special_tokens=True).strip() == "A red cube."
    assert tok.decode(enc).startswith(SEG + D_START) and D_END in tok.decode(enc)


def test_perception_token_ids_raise_when_missing():
    with pytest.raises(ValueError, match="add_perception_tokens"):
        perception_token_ids(tiny_tokenizer(), K)


def test_tiny_config_image_tokens():
    tok = tiny_tokenizer()
    cfg = tiny_internvl_config(TinyVLMConfig(), tok)
    assert image_seq_length(cfg) == 16  # (64 / 8)^2 * 0.5^2
    assert cfg.image_seq_length == 16
    assert cfg.image_token_id == tok.context_image_token_id
    assert cfg.text_config.vocab_size == len(tok)
    with pytest.raises(ValueError, match="even"):
        tiny_internvl_config(TinyVLMConfig(image_size=56, patch_size=8), tok)


def test_tiny_internvl_is_seeded_and_runs():
    tok = tiny_tokenizer()
    m1 = build_tiny_internvl(TinyVLMConfig(), tok, seed=3)
    m2 = build_tiny_internvl(TinyVLMConfig(), tok, seed=3)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    ctx = tok.context_image_token_id
    ids = torch.tensor([[tok.convert_tokens_to_ids("<img>")] + [ctx] * 16 + [tok.convert_tokens_to_ids("</img>"), 40, 41]])
    out = m1(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 20, len(tok))


def test_init_new_token_rows_sets_the_mean_of_the_old_vocabulary():
    tok = tiny_tokenizer()
    model = build_tiny_internvl(TinyVLMConfig(), tok)
    old = len(tok)
    emb_mean = model.get_input_embeddings().weight[:old].mean(0).clone()
    head_mean = model.get_output_embeddings().weight[:old].mean(0).clone()
    ids = add_perception_tokens(tok, K)
    init_new_token_rows(model, len(tok), ids.all, old)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert torch.allclose(model.get_input_embeddings().weight[ids.all], emb_mean.expand(K + 3, -1), atol=1e-6)
    assert torch.allclose(model.get_output_embeddings().weight[ids.all], head_mean.expand(K + 3, -1), atol=1e-6)


def test_init_new_token_rows_overwrites_padded_rows_of_a_larger_matrix():
    # released Qwen2 bases have more embedding rows than tokenizer entries: new ids land inside
    tok = tiny_tokenizer()
    model = build_tiny_internvl(TinyVLMConfig(), tok)
    old = len(tok)
    model.resize_token_embeddings(old + 64, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = 7.0  # untrained padding rows
    mean = model.get_input_embeddings().weight[:old].mean(0).clone()
    ids = add_perception_tokens(tok, K)
    init_new_token_rows(model, len(tok), ids.all, old)
    assert model.get_input_embeddings().weight.shape[0] == old + 64  # never shrinks
    assert torch.allclose(model.get_input_embeddings().weight[ids.all], mean.expand(K + 3, -1), atol=1e-6)


def test_lora_targets_only_the_language_model():
    assert lora_target_regex(["q_proj", "v_proj"]) == r".*language_model\..*\.(q_proj|v_proj)"
    tok = tiny_tokenizer()
    model = build_tiny_internvl(TinyVLMConfig(), tok)
    old = len(tok)
    ids = add_perception_tokens(tok, K)
    init_new_token_rows(model, len(tok), ids.all, old)
    peft_model = apply_lora(model, ModelConfig(lora_rank=4), ids.all)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    others = sorted(n for n in trainable if "lora_" not in n)
    assert others == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default",
        "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default",
    ]
    # 7 target modules x text layers x (A, B)
    assert len(lora) == 7 * TinyVLMConfig().text_layers * 2


def test_only_the_new_rows_train():
    tok = tiny_tokenizer()
    model = build_tiny_internvl(TinyVLMConfig(), tok)
    old = len(tok)
    ids = add_perception_tokens(tok, K)
    init_new_token_rows(model, len(tok), ids.all, old)
    peft_model = apply_lora(model, ModelConfig(lora_rank=4), ids.all)
    base = peft_model.get_base_model()
    emb_before = base.get_input_embeddings()(torch.arange(len(tok))).detach().clone()
    rows_before = new_token_rows(base, ids.all)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    x = torch.tensor([[40, 41, ids.seg, ids.d_start, ids.codes[0], ids.d_end]])
    logits = base(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
    loss.backward()
    opt.step()
    emb_after = base.get_input_embeddings()(torch.arange(len(tok))).detach()
    changed = (emb_after - emb_before).abs().sum(1) > 0
    assert set(torch.nonzero(changed).squeeze(1).tolist()) <= set(ids.all)
    assert changed[ids.seg] and changed[ids.d_start]
    rows_after = new_token_rows(base, ids.all)
    assert not torch.equal(rows_before[1], rows_after[1])  # LM-head rows of the new tokens train too


def test_one_tile_normalises_with_imagenet_stats():
    proc = TileProcessor(tile_size=64, tokens_per_tile=16)
    img = Image.new("RGB", (30, 20), (255, 0, 128))
    px = proc(img)
    assert px.shape == (1, 3, 64, 64) and px.dtype == torch.float32
    expected = (np.array([255, 0, 128]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(px[0, :, 10, 10].numpy(), expected, atol=1e-5)
    black = TileProcessor(tile_size=8, tokens_per_tile=1)(Image.new("RGB", (30, 20)))
    assert torch.allclose(black[0, :, 0, 0], torch.tensor(
        [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dtype=torch.float32), atol=1e-5)
