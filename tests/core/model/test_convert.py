"""convert_internvl: OpenGVLab's InternVLChatModel layout -> transformers' InternVLForConditionalGeneration.

Tiny checkpoints are written here in OpenGVLab's layout with its real key names and config fields:
(a) InternLM2 text model (packed GQA ``wqkv``: 4 heads, 2 kv heads, head_dim 8; untied ``output``)
with a sentencepiece ``tokenizer.model`` (written as protobuf bytes, as the release ships it) and a
LayerNorm InternViT with qkv bias (InternViT-300M style); (b) Qwen2 text model with tied embeddings,
a byte-level ``tokenizer.json`` and an RMSNorm InternViT with q/k norm (InternViT-6B style), its
weights sharded with an index. The converted models are checked against INDEPENDENT references on
the original weights: a plain-torch InternLM2 forward written from the published formulas, a
plain-torch InternViT + pixel shuffle + ``mlp1``, and transformers' own ``Qwen2ForCausalLM`` (which
is what OpenGVLab's remote code runs for a Qwen2 LLM). Tolerance: atol 1e-4 in float32 (measured
differences are ~1e-7, see the module docstring of convert.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from perceptio_core.model.convert import (
    TEMPLATES,
    chat_template,
    checkpoint_layout,
    convert_internvl,
    read_sentencepiece,
    sentencepiece_tokenizer,
    split_wqkv,
)
from perceptio_core.model.internvl import image_tokens, keep_head_as_loaded, load_internvl

from opengvlab_checkpoints import (
    IMAGE,
    INTERNVL_TOKENS,
    PATCH,
    sp_bpe_reference,
    sp_pieces,
    write_internlm2_checkpoint,
    write_qwen2_checkpoint,
    write_sp_model,
)

ATOL = 1e-4
SYS_25 = TEMPLATES["internvl2_5"][1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Independent references on the ORIGINAL weights
# --------------------------------------------------------------------------------------------


def rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def rotary(x, base):
    """x [B, heads, T, d], positions 0..T-1: rotate-half RoPE (InternLM2RotaryEmbedding)."""
    d, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.arange(t).float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * emb.cos() + rot * emb.sin()


def internlm2_reference(w, llm, embeds):
    """InternLM2ForCausalLM from its published formulas on embeddings [B, T, D] -> logits [B, T, V]."""
    B, T, D = embeds.shape
    H, KV, eps = llm["num_attention_heads"], llm["num_key_value_heads"], llm["rms_norm_eps"]
    d, grp = D // H, H // KV
    mask = torch.full((T, T), float("-inf")).triu(1)
    h = embeds
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"], eps)
        qkv = (x @ w[p + "attention.wqkv.weight"].T).view(B, T, KV, grp + 2, d)  # 'b q (h gs d) -> b q h gs d'
        q = qkv[..., :grp, :].reshape(B, T, H, d).transpose(1, 2)  # 'b q h gs d -> b q (h gs) d'
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = rotary(q, llm["rope_theta"]), rotary(k, llm["rope_theta"])
        k, v = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)  # repeat_kv
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, -1) @ v
        h = h + att.transpose(1, 2).reshape(B, T, D) @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"], eps)
        ff = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + ff @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["language_model.model.norm.weight"], eps) @ w["language_model.output.weight"].T


def vision_reference(w, vc, pixels):
    """InternViT (last layer, no final norm) -> drop CLS -> pixel shuffle v2 -> mlp1: [B, 4, D]."""
    B, C, H = pixels.shape[0], vc["hidden_size"], vc["num_attention_heads"]
    d, eps = C // H, vc["layer_norm_eps"]

    def norm(x, p):
        if vc["norm_type"] == "layer_norm":
            return F.layer_norm(x, (C,), w[p + ".weight"], w[p + ".bias"], eps)
        return rms_norm(x, w[p + ".weight"], eps)

    x = F.conv2d(pixels, w["vision_model.embeddings.patch_embedding.weight"],
                 w["vision_model.embeddings.patch_embedding.bias"], stride=PATCH).flatten(2).transpose(1, 2)  # fmt: skip
    x = torch.cat([w["vision_model.embeddings.class_embedding"].expand(B, 1, C), x], 1)
    x = x + w["vision_model.embeddings.position_embedding"]
    N = x.shape[1]
    for i in range(vc["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        y = norm(x, p + "norm1")
        qkv = F.linear(y, w[p + "attn.qkv.weight"], w.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        if vc["qk_normalization"]:
            q = rms_norm(q.transpose(1, 2).flatten(-2), w[p + "attn.q_norm.weight"], eps).view(B, N, H, d).transpose(1, 2)
            k = rms_norm(k.transpose(1, 2).flatten(-2), w[p + "attn.k_norm.weight"], eps).view(B, N, H, d).transpose(1, 2)
        att = torch.softmax((q * d**-0.5) @ k.transpose(-1, -2), -1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, N, C), w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        x = x + att * w[p + "ls1"]
        y = norm(x, p + "norm2")
        y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])), w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = x + y * w[p + "ls2"]
    x = x[:, 1:]
    side = int(math.sqrt(x.shape[1]))
    x = x.reshape(B, side, side, C)
    # InternVLChatModel.pixel_shuffle(scale 0.5), ps_version v2
    n, wd, ht, c = x.shape
    x = x.view(n, wd, ht // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, ht // 2, wd // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(B, -1, c * 4)
    x = F.layer_norm(x, (c * 4,), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
    x = F.linear(F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"])), w["mlp1.3.weight"], w["mlp1.3.bias"])
    return x


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def _load(dst):
    model, info = InternVLForConditionalGeneration.from_pretrained(str(dst), dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("internlm2")
    src = write_internlm2_checkpoint(root / "InternVL2_5-8B-tiny")
    dst = convert_internvl(root / "InternVL2_5-8B-tiny", root / "converted", dtype="float32",
                           max_shard_bytes=40_000, progress=False)  # fmt: skip
    model, info = _load(dst)
    return {**src, "src": root / "InternVL2_5-8B-tiny", "dst": dst, "model": model, "info": info}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    src = write_qwen2_checkpoint(root / "InternVL2_5-1B-tiny")
    dst = convert_internvl(root / "InternVL2_5-1B-tiny", root / "converted", progress=False)
    model, info = _load(dst)
    return {**src, "src": root / "InternVL2_5-1B-tiny", "dst": dst, "model": model, "info": info}


def _pixels(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Weights and logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["internlm2", "qwen2"])
def test_converted_folder_loads_with_no_missing_or_unexpected_key(case, request):
    c = request.getfixturevalue(case)
    assert checkpoint_layout(c["dst"]) == "native"
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not c["info"].get(kind), (kind, c["info"][kind])


def test_split_wqkv_follows_the_grouped_interleave():
    # rows tagged (kv head, slot, dim): slot 0..g-1 queries, g key, g+1 value
    kv, g, d = 2, 2, 3
    tags = torch.tensor([[h, s, i] for h in range(kv) for s in range(g + 2) for i in range(d)], dtype=torch.float32)
    q, k, v = split_wqkv(tags, num_heads=kv * g, num_kv_heads=kv)
    assert q[:, :2].tolist() == [[h, s] for h in range(kv) for s in range(g) for _ in range(d)]
    assert k[:, :2].tolist() == [[h, g] for h in range(kv) for _ in range(d)]
    assert v[:, :2].tolist() == [[h, g + 1] for h in range(kv) for _ in range(d)]


def test_internlm2_text_logits_match_the_plain_torch_reference(internlm2):
    w, llm, model = internlm2["weights"], internlm2["llm"], internlm2["model"]
    ids = torch.randint(3, llm["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = internlm2_reference(w, llm, w["language_model.model.tok_embeddings.weight"][ids])
        got = model(input_ids=ids).logits[..., : llm["vocab_size"]]
    diff = (got - ref).abs().max().item()
    assert diff < ATOL, diff


def test_internlm2_with_an_image_matches_the_references(internlm2):
    w, llm, vc, model = internlm2["weights"], internlm2["llm"], internlm2["vision"], internlm2["model"]
    ctx = model.config.image_token_id
    n_sp = len(internlm2["pieces"])
    assert ctx == n_sp + INTERNVL_TOKENS.index("<IMG_CONTEXT>")
    ids = torch.tensor([[1, 300, 301, n_sp, ctx, ctx, ctx, ctx, n_sp + 1, 302, 303]])
    pixels = _pixels(4)
    with torch.no_grad():
        feats = vision_reference(w, vc, pixels)  # [1, 4, D]
        got_feats = model.model.get_image_features(pixels, vision_feature_layer=-1,
                                                   vision_feature_select_strategy="default").pooler_output  # fmt: skip
        embeds = w["language_model.model.tok_embeddings.weight"][ids].clone()
        embeds[ids == ctx] = feats.reshape(-1, feats.shape[-1])
        ref = internlm2_reference(w, llm, embeds)
        got = model(input_ids=ids, pixel_values=pixels).logits[..., : llm["vocab_size"]]
    assert (got_feats - feats).abs().max().item() < ATOL
    diff = (got - ref).abs().max().item()
    assert diff < ATOL, diff


def test_internlm2_untied_head_and_grown_vocabulary(internlm2):
    w, llm, model = internlm2["weights"], internlm2["llm"], internlm2["model"]
    V = llm["vocab_size"]
    assert keep_head_as_loaded(model) is False and model.config.tie_word_embeddings is False
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(head[:V], w["language_model.output.weight"])
    assert torch.equal(emb[:V], w["language_model.model.tok_embeddings.weight"])
    # <video> was not in the vocabulary (as in the releases): one row appended, the mean of the rest
    assert head.shape[0] == emb.shape[0] == V + 1 == model.config.text_config.vocab_size
    assert torch.allclose(emb[V], w["language_model.model.tok_embeddings.weight"].mean(0), atol=1e-6)
    cfg = json.loads((internlm2["dst"] / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == "llama" and cfg["text_config"]["tie_word_embeddings"] is False
    assert cfg["tie_word_embeddings"] is False and cfg["image_seq_length"] == 4
    assert cfg["text_config"]["rope_parameters"]["rope_type"] == "dynamic"
    assert "temperature" not in cfg["text_config"]


def test_dtype_casts_every_floating_tensor(internlm2, tmp_path):
    dst = convert_internvl(internlm2["src"], tmp_path / "bf16", dtype="bfloat16", progress=False)
    stored = load_file(str(dst / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"


def test_output_is_sharded_with_an_index_and_no_temp_is_left(internlm2):
    dst = internlm2["dst"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((dst / s).is_file() for s in shards)
    assert not (dst / "model.safetensors").exists()
    stored = set().union(*(load_file(str(dst / s)).keys() for s in shards))
    assert stored == set(index["weight_map"])
    assert "language_model.lm_head.weight" in stored and "vision_tower.encoder.layer.0.attention.q_proj.bias" in stored
    assert [p.name for p in dst.parent.iterdir() if ".tmp-" in p.name] == []


def test_qwen2_logits_match_transformers_qwen2_on_the_original_weights(qwen2):
    ref, model, llm = qwen2["reference"], qwen2["model"], qwen2["llm"]
    ids = torch.randint(0, 280, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    assert diff < ATOL, diff
    assert model.config.text_config.vocab_size == llm["vocab_size"]  # padded rows covered <video>


def test_qwen2_image_features_match_the_internvit_reference(qwen2):
    pixels = torch.cat([_pixels(6), _pixels(7)])
    with torch.no_grad():
        ref = vision_reference(qwen2["weights"], qwen2["vision"], pixels)
        got = qwen2["model"].model.get_image_features(pixels, vision_feature_layer=-1,
                                                      vision_feature_select_strategy="default").pooler_output  # fmt: skip
    assert got.shape == ref.shape == (2, 4, 32)
    assert (got - ref).abs().max().item() < ATOL


def test_qwen2_tied_embeddings_stay_tied_and_keep_the_source_dtype(qwen2):
    model, dst = qwen2["model"], qwen2["dst"]
    assert keep_head_as_loaded(model) is True
    stored = load_file(str(dst / "model.safetensors"))
    assert "language_model.lm_head.weight" not in stored
    assert stored["language_model.model.embed_tokens.weight"].dtype == torch.float32  # dtype=None keeps it
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["text_config"]["model_type"] == "qwen2"


# --------------------------------------------------------------------------------------------
# Tokenizer, chat template, generation and processor configs
# --------------------------------------------------------------------------------------------


def test_sentencepiece_model_reads_back():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        pieces = sp_pieces()
        write_sp_model(Path(d) / "t.model", pieces)
        sp = read_sentencepiece(Path(d) / "t.model")
    assert [(t, k) for t, _, k in sp.pieces] == [(t, k) for t, _, k in pieces]
    assert sp.model_type == 2 and sp.add_dummy_prefix is False and sp.remove_extra_whitespaces is False


def test_sentencepiece_dummy_prefix_and_whitespace_collapsing(tmp_path):
    pieces = sp_pieces()
    write_sp_model(tmp_path / "t.model", pieces, dummy_prefix=True, collapse_spaces=True)
    tok = sentencepiece_tokenizer(read_sentencepiece(tmp_path / "t.model"))
    for text in ["hello world", "  the   red cube ", "the cube"]:
        ids = tok.encode(text).ids
        assert ids == sp_bpe_reference(" " + " ".join(text.split()), pieces), text
        assert tok.decode(ids) == " ".join(text.split())


def test_internlm2_tokenizer_matches_sentencepiece_bpe_and_round_trips(internlm2):
    tok = AutoTokenizer.from_pretrained(str(internlm2["dst"]))  # no remote code anywhere
    pieces = internlm2["pieces"]
    for text in ["hello world", "the red cube", "  the  thing é ✓ 42!", "Hello\nworld, helloing"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == sp_bpe_reference(text, pieces), text
        assert tok.decode(ids) == text
    assert tok("hello").input_ids[0] == tok.bos_token_id == 1  # InternLM2 adds <s>
    for t in ["<|im_end|>", "<|im_start|>", "<|action_start|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    n_sp = len(pieces)
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<img>", "</box>"]) == [n_sp - 2, n_sp, n_sp + 8]
    assert image_tokens(tok) == ("<img>", "<IMG_CONTEXT>", "</img>") and tok.video_token == "<video>"
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "</s>")


def test_internlm2_chat_template_is_internvl2_5s_with_bos(internlm2):
    tok = AutoTokenizer.from_pretrained(str(internlm2["dst"]))
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text == (f"<s><|im_start|>system\n{SYS_25}<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                    "<|im_start|>assistant\n")  # fmt: skip
    assert (internlm2["dst"] / "chat_template.jinja").is_file()


def test_qwen2_chat_template_with_an_image_and_a_system_message(qwen2):
    tok = AutoTokenizer.from_pretrained(str(qwen2["dst"]))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
            {"role": "assistant", "content": "red"}]  # fmt: skip
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (f"<|im_start|>system\n{SYS_25}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nwhat colour?"
                    "<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")  # fmt: skip
    own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                  tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>"
    text = "hello world, naïve ✓"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert image_tokens(tok) == ("<img>", "<IMG_CONTEXT>", "</img>")
    assert len(tok("<video>", add_special_tokens=False).input_ids) == 1


def test_internvl2_templates_have_no_newline_between_turns_and_unknown_ones_are_refused():
    import jinja2

    jinja, turn_end = chat_template("Hermes-2", bos=False)
    text = jinja2.Environment().from_string(jinja).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True, bos_token="<s>"
    )
    sys_2 = TEMPLATES["Hermes-2"][1]
    assert text == f"<|im_start|>system\n{sys_2}<|im_end|><|im_start|>user\nhi<|im_end|><|im_start|>assistant\n"
    assert turn_end == "<|im_end|>"
    with pytest.raises(ValueError, match="vicuna"):
        chat_template("vicuna", bos=False)


def test_generation_config_stops_on_eos_and_im_end(internlm2, qwen2):
    tok = AutoTokenizer.from_pretrained(str(internlm2["dst"]))
    gen = json.loads((internlm2["dst"] / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert {tok.eos_token_id, im_end} <= set(gen["eos_token_id"])
    assert internlm2["model"].generation_config.eos_token_id == gen["eos_token_id"]
    qtok = AutoTokenizer.from_pretrained(str(qwen2["dst"]))
    qgen = json.loads((qwen2["dst"] / "generation_config.json").read_text())
    assert qgen["eos_token_id"] == [qtok.convert_tokens_to_ids("<|im_end|>")]


def test_processor_configs(internlm2):
    import sys

    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    dst = internlm2["dst"]
    pre = json.loads((dst / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "GotOcr2ImageProcessor" and pre["crop_to_patches"] is True
    assert (pre["min_patches"], pre["max_patches"], pre["size"]) == (1, 12, {"height": IMAGE, "width": IMAGE})
    assert pre["image_mean"] == [0.485, 0.456, 0.406] and pre["resample"] == 3
    assert json.loads((dst / "processor_config.json").read_text()) == {"processor_class": "InternVLProcessor", "image_seq_length": 4}
    proc = GotOcr2ImageProcessorPil.from_pretrained(str(dst))
    out = proc(Image.new("RGB", (2 * IMAGE, IMAGE), (200, 10, 10)), return_tensors="pt")
    assert out["pixel_values"].shape[1:] == (3, IMAGE, IMAGE) and out["pixel_values"].shape[0] == 3  # 2 tiles + thumbnail
    assert "torchvision" not in sys.modules


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def test_a_native_checkpoint_is_refused_with_the_message(internlm2, tmp_path):
    with pytest.raises(ValueError, match="already in the transformers layout, load it directly"):
        convert_internvl(internlm2["dst"], tmp_path / "again", progress=False)


def test_an_unknown_layout_errors_naming_the_file_and_architectures(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"bert/config\.json.*BertModel"):
        checkpoint_layout(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"BertModel"):
        convert_internvl(tmp_path / "bert", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint_layout(tmp_path)


def test_load_internvl_refuses_the_opengvlab_layout_naming_the_command(internlm2):
    assert checkpoint_layout(internlm2["src"]) == "opengvlab"
    with pytest.raises(ValueError, match="perceptio convert-internvl"):
        load_internvl(internlm2["src"])


def test_an_unmapped_key_is_an_error_naming_it_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    c = write_internlm2_checkpoint(src)
    w = dict(c["weights"], **{"vision_model.encoder.layers.0.attn.mystery": torch.zeros(2)})
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"vision_model\.encoder\.layers\.0\.attn\.mystery"):
        convert_internvl(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_pickled_weights_and_a_non_empty_destination_are_refused(tmp_path):
    src = tmp_path / "src"
    write_internlm2_checkpoint(src)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        convert_internvl(src, tmp_path / "busy", progress=False)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        convert_internvl(src, tmp_path / "out", progress=False)
