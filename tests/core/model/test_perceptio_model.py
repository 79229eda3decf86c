"""The Perceptio model (SPEC §1, §3, §4): forward terms, trainable set, the [SEG] position, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from perceptio_core.config import LossConfig
from perceptio_core.depth.codec import DepthCodecSpec
from perceptio_core.model.losses import IGNORE, LOSS_KEYS, total_loss
from perceptio_core.model.perceptio_model import PerceptioModel

from perceptio_helpers import StandInDepthTokenizer, build_tiny, examples, one_torch_thread, tiny_depth_tokenizer  # noqa: F401


def _perturb(model: PerceptioModel, scale: float = 0.05) -> None:
    """Move every trainable parameter off its initialisation (LoRA B starts at 0, the new token rows
    all equal), so that equivalences are tested on a model whose adapters matter."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def model():
    m = build_tiny()
    _perturb(m)
    return m


@pytest.fixture(scope="module")
def batch(model):
    return model.collator()(examples(model.num_depth_tokens, model.codebook_size))


def test_forward_returns_every_term_and_the_weighted_total(model, batch):
    model.train()
    out = model(batch)
    assert tuple(sorted(out)) == tuple(sorted(LOSS_KEYS))
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())
    assert out["loss"].requires_grad and not out["llm"].requires_grad
    assert all(float(out[k].detach()) > 0 for k in LOSS_KEYS)  # this batch has every kind of target
    assert float(out["loss"]) == pytest.approx(float(total_loss(out, model.loss_cfg)), rel=1e-6)


def test_llm_term_equals_the_plain_shifted_cross_entropy(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(batch)
        full = model.lm_forward(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], logits_from=0
        ).logits  # [B, T, V]
    ref = F.cross_entropy(full[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    assert float(out["llm"]) == pytest.approx(float(ref), rel=1e-5)


def test_weights_come_from_the_loss_config(model, batch):
    model.eval()
    with torch.no_grad():
        base = model(batch)
        model.loss_cfg = LossConfig(w_seg=0.0, w_dtok=0.0, w_rec=0.0)
        only_llm = model(batch)
        model.loss_cfg = LossConfig()
    assert float(only_llm["loss"]) == pytest.approx(float(base["llm"]), rel=1e-6)


def test_every_trainable_parameter_gets_a_gradient_with_or_without_masks(model, batch):
    model.train()
    ex = examples(model.num_depth_tokens, model.codebook_size)
    for b in (batch, model.collator()([ex[1], ex[1]])):
        model.zero_grad(set_to_none=True)
        model(b)["loss"].backward()
        missing = [n for n, p in model.trainable_parameters().items() if p.grad is None]
        assert missing == []
    model.zero_grad(set_to_none=True)


def test_trainable_set_matches_spec_section_4(model):
    names = list(model.trainable_parameters())
    kinds = {
        "lora": [n for n in names if "lora_" in n],
        "rows": [n for n in names if "trainable_tokens_delta" in n],
        "seg": [n for n in names if n.startswith("seg_projection.")],
        "decoder": [n for n in names if n.startswith("sam2.sam_mask_decoder.")],
    }
    assert all(kinds.values())
    assert sum(len(v) for v in kinds.values()) == len(names)
    assert all("language_model" in n for n in kinds["lora"])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("sam2.image_encoder.") for n in frozen)
    assert any("vision_tower" in n for n in frozen)
    assert any(m is model.depth_tokenizer.vqvae for m in model.modules())  # registered: moves with .to(device)
    assert all(not p.requires_grad for p in model.depth_tokenizer.parameters())
    assert model.seg_projection[0].in_features == model.hidden_size
    assert model.seg_projection[2].out_features == model.sam2.embed_dim


def test_rec_term_reaches_the_language_model_through_the_frozen_vqvae(batch):
    m = build_tiny()
    m.loss_cfg = LossConfig(w_seg=0.0, w_dtok=0.0, w_rec=1.0)
    m.train()
    assert not m.depth_tokenizer.vqvae.training
    out = m(batch)
    (out["loss"] - out["llm"]).backward()  # L_rec alone
    lora = [p.grad for n, p in m.trainable_parameters().items() if "lora_B" in n]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in lora)
    assert all(p.grad is None for p in m.depth_tokenizer.parameters())
    assert not m.depth_tokenizer.vqvae.training  # eval mode survives train()


def test_seg_state_is_the_one_at_the_seg_token_itself(model, batch):
    """The off-by-one of SPEC §1: the [SEG] token's own state, not its predecessor's."""
    model.eval()
    pos = int(batch["seg_positions"][0])
    ids = batch["input_ids"][:1].clone()
    assert int(ids[0, pos]) == model.token_ids.seg

    def states(input_ids):
        with torch.no_grad():
            h = model.lm_forward(input_ids, pixel_values=batch["pixel_values"][:1], logits_from=None).hidden
        rows, seg = model.seg_hidden_states(h, torch.tensor([pos]), torch.tensor([0]))
        assert rows.tolist() == [0]
        return h, seg[0]

    h, seg = states(ids)
    assert torch.equal(seg, h[0, pos])
    # a later token cannot change it (causal), but the [SEG] token itself does
    later = ids.clone()
    later[0, pos + 1] = model.token_ids.codes[0]
    assert torch.equal(states(later)[1], seg)
    other = ids.clone()
    other[0, pos] = model.token_ids.d_end
    h2, seg2 = states(other)
    assert not torch.allclose(seg2, seg)
    assert torch.equal(h2[0, pos - 1], h[0, pos - 1])  # the predecessor's state is blind to it


def test_mask_prediction_depends_on_the_seg_state(model, batch):
    model.eval()
    px = batch["sam2_pixel_values"][:1]
    with torch.no_grad():
        a = model.predict_mask_logits(torch.randn(1, model.hidden_size), px, (40, 48))
        b = model.predict_mask_logits(torch.randn(1, model.hidden_size), px, (40, 48))
    assert a.shape == (1, 1, 40, 48) and not torch.allclose(a, b)


def test_a_training_step_moves_only_trainable_things(batch):
    m = build_tiny()
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    rows = m.base_model.get_input_embeddings().token_adapter.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW(list(m.trainable_parameters().values()), lr=3e-3)
    m.train()
    first = float(m(batch)["loss"])
    for _ in range(3):
        opt.zero_grad()
        m(batch)["loss"].backward()
        opt.step()
    assert float(m(batch)["loss"]) < first
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert torch.equal(m.base_model.get_input_embeddings().token_adapter.base_layer.weight, rows)


def test_save_and_load_round_trip(model, batch, tmp_path):
    model.eval()
    with torch.no_grad():
        before = model(batch)
    out = model.save_pretrained(tmp_path / "ckpt")
    files = {p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()}
    assert {"config.json", "heads.safetensors", "sam2_frozen.safetensors", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors", "base/config.json", "base/model.safetensors",
            "tokenizer/tokenizer.json", "tokenizer/chat_template.jinja", "tokenizer/preprocessor_config.json",
            "tokenizer/processor_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)  # never pickle
    meta = json.loads((out / "config.json").read_text())
    assert meta["depth_codec"] == {"codebook_size": 16, "grid": 3, "map_size": 12, "num_tokens": 9}  # the codec's
    assert meta["token_ids"]["seg"] == model.token_ids.seg

    assert (out / "depth_tokenizer" / "model.safetensors").is_file()
    loaded = PerceptioModel.from_pretrained(out)  # the depth tokenizer saved beside the model
    assert not loaded.trainable_parameters() and not loaded.training
    assert loaded.image_processor == model.image_processor  # tiling and normalisation come back
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
    with torch.no_grad():
        after = loaded(batch)
    for k in LOSS_KEYS:
        assert float(after[k]) == pytest.approx(float(before[k]), rel=1e-6, abs=1e-7), k

    resumed = PerceptioModel.from_pretrained(out, depth_tokenizer=tiny_depth_tokenizer(), trainable=True)
    assert sorted(resumed.trainable_parameters()) == sorted(model.trainable_parameters())


def test_k_and_n_come_from_the_codec_and_a_reload_checks_them(tmp_path):
    codec = StandInDepthTokenizer(codebook_size=16, grid=2, input_size=8)  # K = 16, N = 4
    m = build_tiny(codec)
    assert (m.codebook_size, m.num_depth_tokens) == (16, 4) and m.depth_spec == DepthCodecSpec(16, 2, 8)
    assert len(m.token_ids.codes) == 16 and m.collator().depth_size == 8
    m.train()
    out = m(m.collator()(examples(4, 16)))  # blocks of 4 codes: the count term is about N = 4
    assert all(torch.isfinite(v) for v in out.values()) and float(out["rec"]) > 0

    path = m.save_pretrained(tmp_path / "m")
    assert not (path / "depth_tokenizer").exists()  # a stand-in codec is not stored: it must be given
    with pytest.raises(ValueError, match="saved without its depth tokenizer"):
        PerceptioModel.from_pretrained(path)
    with pytest.raises(ValueError, match=r"depth codec mismatch.*K = 16, N = 4.*K = 16, N = 9"):
        PerceptioModel.from_pretrained(path, depth_tokenizer=StandInDepthTokenizer(codebook_size=16, grid=3))
    again = PerceptioModel.from_pretrained(path, depth_tokenizer=StandInDepthTokenizer(16, grid=2, input_size=8))
    assert (again.codebook_size, again.num_depth_tokens) == (16, 4)


def test_the_depth_tokenizer_must_be_a_codec_module():
    class NotAModule:
        codebook_size, num_tokens, grid, map_size = 16, 9, 3, 12

        def encode(self, maps): ...

        def decode(self, indices): ...

        def soft_decode(self, logits, tau=1.0): ...

    with pytest.raises(TypeError, match="nn.Module"):
        build_tiny(NotAModule())
    with pytest.raises(TypeError, match="not a DepthCodec"):
        build_tiny(torch.nn.Linear(2, 2))


def test_from_pretrained_refuses_other_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a Perceptio model"):
        PerceptioModel.from_pretrained(tmp_path, depth_tokenizer=StandInDepthTokenizer())


def test_build_needs_a_tokenizer_for_the_tiny_base():
    from perceptio_core.config import ModelConfig

    with pytest.raises(ValueError, match="needs a tokenizer"):
        PerceptioModel.build(ModelConfig(), LossConfig(), tiny_depth_tokenizer())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch):
    plain = build_tiny(lora_dropout=0.0)
    ckpt = build_tiny(lora_dropout=0.0, gradient_checkpointing=True)
    assert ckpt.base_model.model.language_model.gradient_checkpointing
    grads = []
    for m in (plain, ckpt):
        m.train()
        out = m(batch)
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in m.trainable_parameters().items()})
        grads[-1]["__loss__"] = out["loss"].detach()
    assert torch.allclose(grads[0]["__loss__"], grads[1]["__loss__"], rtol=1e-5)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n


def _strip_tie_keys(config_json: Path) -> None:
    """Remove every ``tie_word_embeddings`` key, as transformers' InternVL conversion writes the config
    (the default is then True, whatever the weights are)."""
    def strip(d: dict) -> None:
        d.pop("tie_word_embeddings", None)
        for v in d.values():
            if isinstance(v, dict):
                strip(v)

    cfg = json.loads(config_json.read_text())
    strip(cfg)
    config_json.write_text(json.dumps(cfg))


def test_an_untied_head_stays_the_checkpoints_through_tokens_a_step_save_and_reload(tmp_path):
    """A base whose config lacks ``tie_word_embeddings`` but whose ``lm_head`` differs from its
    embeddings (InternVL2.5-8B's InternLM2 head; the converted -hf configs): after loading, adding the
    K + 3 tokens, one optimizer step, saving and reloading, the head's original rows are still the
    checkpoint's, never the embeddings."""
    from perceptio_core.model.internvl import build_tiny_internvl, load_internvl, new_token_rows
    from perceptio_helpers import tiny_model_config, tiny_tokenizer

    tok = tiny_tokenizer()
    base = build_tiny_internvl(tiny_model_config().tiny, tok)
    n = base.get_input_embeddings().weight.shape[0]
    head = base.get_output_embeddings().weight.detach().clone()
    assert not torch.equal(head, base.get_input_embeddings().weight)
    base.save_pretrained(tmp_path / "base")
    _strip_tie_keys(tmp_path / "base" / "config.json")

    loaded = load_internvl(tmp_path / "base")
    assert loaded.config.tie_word_embeddings is False and loaded.config.get_text_config().tie_word_embeddings is False
    model = PerceptioModel.build(tiny_model_config(base=str(tmp_path / "base")), LossConfig(), tiny_depth_tokenizer(),
                                 tokenizer=tok)  # fmt: skip
    batch = model.collator()(examples(model.num_depth_tokens, model.codebook_size))
    opt = torch.optim.SGD(list(model.trainable_parameters().values()), lr=0.1)
    model.train()
    model(batch)["loss"].backward()
    opt.step()
    original = list(range(n))
    assert torch.equal(new_token_rows(model.vlm, original)[1], head)
    model.save_pretrained(tmp_path / "ft")
    again = PerceptioModel.from_pretrained(tmp_path / "ft")
    assert torch.equal(new_token_rows(again.vlm, original)[1], head)
    assert not torch.equal(new_token_rows(again.vlm, original)[1], new_token_rows(again.vlm, original)[0])


def test_a_tied_checkpoint_loads_tied(tmp_path):
    from perceptio_core.model.internvl import build_tiny_internvl, load_internvl
    from perceptio_helpers import tiny_model_config, tiny_tokenizer

    base = build_tiny_internvl(tiny_model_config().tiny, tiny_tokenizer())
    base.config.tie_word_embeddings = base.config.get_text_config().tie_word_embeddings = True
    base.tie_weights()
    base.save_pretrained(tmp_path / "tied")
    loaded = load_internvl(tmp_path / "tied")
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert loaded.config.tie_word_embeddings is True


def _multi_seg_batch(model):
    """Example 0: three rounds, three masks; example 1: one mask; example 2: text-only."""
    import numpy as np

    from perceptio_core.format.target import format_target
    from perceptio_core.model.batching import TrainExample
    from perceptio_helpers import png_bytes

    n, k = model.num_depth_tokens, model.codebook_size
    masks = []
    for r0 in (0, 12, 26):
        m = np.zeros((40, 48), np.uint8)
        m[r0 : r0 + 10, r0 : r0 + 14] = 1
        masks.append(m)
    codes = [i % k for i in range(n)]
    three = TrainExample(image=png_bytes(seed=4), prompt="Segment a.", target=format_target(True, codes, "A."),
                         masks=masks, rounds=[("Segment b.", "[SEG] B."), ("Segment c.", "[SEG] C.")])
    one = examples(n, k)[0]
    text = TrainExample(image=None, prompt="hi", target="hello", rounds=[("again?", "yes")])
    return model.collator()([three, one, text])


def test_seg_terms_are_the_mean_over_every_seg_mask_pair(model):
    """L_seg over several [SEG] per sequence: each pair's mask decoded from its own [SEG] state on
    its example's image, BCE and Dice averaged over pairs (computed here one pair at a time)."""
    from perceptio_core.model.losses import mask_bce_loss, mask_dice_loss

    batch = _multi_seg_batch(model)
    assert batch["seg_batch"].tolist() == [0, 0, 0, 1]
    model.eval()
    with torch.no_grad():
        out = model(batch)
        h = model.lm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             logits_from=None).hidden  # fmt: skip
        bce, dice = [], []
        for p, b, gt in zip(batch["seg_positions"], batch["seg_batch"], batch["masks"]):
            assert int(batch["input_ids"][b, p]) == model.token_ids.seg
            lg = model.predict_mask_logits(h[b, p][None], batch["sam2_pixel_values"][b][None], tuple(gt.shape))[:, 0]
            bce.append(float(mask_bce_loss(lg, gt[None])))
            dice.append(float(mask_dice_loss(lg, gt[None])))
    assert float(out["seg_bce"]) == pytest.approx(sum(bce) / 4, rel=1e-5)
    assert float(out["seg_dice"]) == pytest.approx(sum(dice) / 4, rel=1e-5)
    assert len({round(x, 6) for x in bce}) == 4  # four different pairs


def test_text_only_examples_train_alone_and_mixed(model):
    """A text-only example has no tiles: mixed with image examples its rows carry no image tokens;
    a batch of text-only examples passes no pixel_values to InternVL. Gradients flow in both."""
    from perceptio_core.model.batching import TrainExample

    model.train()
    mixed = _multi_seg_batch(model)
    assert mixed["num_tiles"].tolist()[2] == 0
    out = model(mixed)
    assert torch.isfinite(out["loss"]) and float(out["seg_bce"]) > 0
    only = model.collator()([TrainExample(image=None, prompt="hi", target="hello", rounds=[("again?", "yes")])])
    assert only["pixel_values"].shape[0] == 0
    out = model(only)
    assert torch.isfinite(out["loss"]) and float(out["llm"]) > 0 and float(out["seg_bce"]) == 0.0
    out["loss"].backward()
    model.zero_grad(set_to_none=True)
