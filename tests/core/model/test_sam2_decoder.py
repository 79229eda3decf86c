"""SAM2 for the [SEG] path (SPEC §1): real sam2 modules, no hydra, Meta's checkpoint layout."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio_core.model.processor import IMAGENET_MEAN, IMAGENET_STD
from perceptio_core.model.sam2_decoder import (
    SAM2_CONFIGS,
    SAM2Segmenter,
    build_sam2,
    load_sam2_checkpoint,
    sam2_config,
    sam2_pixel_values,
    sam2_state_from_meta,
)

from perceptio_helpers import one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def tiny():
    return build_sam2("tiny-test", seed=0)


def test_no_torchvision_and_no_hydra_build():
    assert "torchvision" not in sys.modules
    import perceptio_core.model.sam2_decoder as mod

    source = Path(mod.__file__).read_text()
    for banned in ("torchvision", "sam2.build_sam", "sam2_image_predictor", "sam2.utils.transforms", "hydra"):
        assert f"import {banned}" not in source and f"from {banned}" not in source, banned


def test_tiny_shapes_follow_sam2_image_predictor(tiny):
    px = torch.randn(2, 3, 64, 64)
    feats = tiny.encode_image(px)
    assert feats.image_embed.shape == (2, 32, 4, 4)  # stride 16
    assert [tuple(h.shape) for h in feats.high_res] == [(2, 32, 16, 16), (2, 32, 8, 8)]  # strides 4, 8
    low = tiny.decode_masks(feats, torch.randn(2, 1, 32))
    assert low.shape == (2, 1, 16, 16)  # 4 x the embedding
    assert tiny(px, torch.randn(2, 1, 32), output_size=(40, 48)).shape == (2, 1, 40, 48)
    assert tiny.uses_high_res


def test_image_embedding_is_the_stride16_level_plus_no_mem_embed(tiny):
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = tiny.image_encoder(px)["backbone_fpn"]
        feats = tiny.encode_image(px)
    assert torch.allclose(feats.image_embed, raw[-1] + tiny.no_mem_embed.view(1, -1, 1, 1))
    assert torch.equal(feats.high_res[0], raw[0])


def test_frozen_parts_get_no_gradient_and_the_decoder_and_prompt_do(tiny):
    tiny.zero_grad(set_to_none=True)
    prompt = torch.randn(2, 1, 32, requires_grad=True)
    tiny(torch.randn(2, 3, 64, 64), prompt, (64, 64)).sum().backward()
    assert prompt.grad is not None and float(prompt.grad.abs().sum()) > 0
    assert all(p.grad is None for p in tiny.image_encoder.parameters())
    assert all(not p.requires_grad for p in tiny.sam_prompt_encoder.parameters())
    assert not tiny.no_mem_embed.requires_grad
    dec = tiny.sam_mask_decoder
    assert dec.conv_s0.weight.grad is not None and dec.conv_s1.weight.grad is not None  # high-res path
    trainable = [n for n, p in dec.named_parameters() if p.requires_grad]
    assert all(dict(dec.named_parameters())[n].grad is not None for n in trainable)
    assert not any(n.startswith(("iou_prediction_head", "pred_obj_score_head")) for n in trainable)


def test_encoder_stays_in_eval_mode_when_training(tiny):
    tiny.train()
    assert not tiny.image_encoder.training and tiny.sam_mask_decoder.training
    tiny.eval()


def _meta_checkpoint(model: SAM2Segmenter, path) -> int:
    """Write ``model`` as Meta's released files are laid out: {"model": SAM2Base state dict}, with
    the video-only parts a real checkpoint also holds."""
    state = dict(model.state_dict())
    extra = {
        "maskmem_tpos_enc": torch.zeros(7, 1, 1, 64),
        "memory_attention.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
        "memory_encoder.mask_downsampler.encoder.0.weight": torch.zeros(4, 1, 3, 3),
        "obj_ptr_proj.layers.0.weight": torch.zeros(4, 4),
        "mask_downsample.weight": torch.zeros(1, 1, 4, 4),
    }
    state.update(extra)
    torch.save({"model": state}, str(path))
    return len(extra)


def test_meta_format_checkpoint_loads_through_the_same_code(tmp_path):
    src = build_sam2("tiny-test", seed=1)
    n_extra = _meta_checkpoint(src, tmp_path / "sam2.1_tiny_test.pt")
    # Meta's key names, as in the released sam2.1 checkpoints
    keys = set(src.state_dict())
    for k in [
        "image_encoder.trunk.patch_embed.proj.weight",
        "image_encoder.trunk.blocks.0.attn.qkv.weight",
        "image_encoder.neck.convs.0.conv.weight",
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "sam_prompt_encoder.no_mask_embed.weight",
        "sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "sam_mask_decoder.conv_s0.weight",
        "sam_mask_decoder.obj_score_token.weight",
        "no_mem_embed",
    ]:
        assert k in keys, k
    dst = build_sam2("tiny-test", seed=2)
    assert not torch.equal(dst.sam_mask_decoder.conv_s0.weight, src.sam_mask_decoder.conv_s0.weight)
    counts = load_sam2_checkpoint(dst, tmp_path / "sam2.1_tiny_test.pt")
    assert counts == {"loaded": len(keys), "dropped": n_extra}
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    px, prompt = torch.randn(1, 3, 64, 64), torch.randn(1, 1, 32)
    with torch.no_grad():
        assert torch.equal(src.eval()(px, prompt), dst.eval()(px, prompt))
    # and through build_sam2(checkpoint=...)
    again = build_sam2("tiny-test", checkpoint=tmp_path / "sam2.1_tiny_test.pt", seed=3)
    assert torch.equal(again.no_mem_embed, src.no_mem_embed)


def test_a_checkpoint_of_another_variant_is_refused(tmp_path):
    src = build_sam2("tiny-test")
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("sam_mask_decoder.conv_s")}
    torch.save({"model": state}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="does not fit"):
        load_sam2_checkpoint(build_sam2("tiny-test"), tmp_path / "bad.pt")


def test_sam2_state_from_meta_keeps_only_our_parts():
    state = {"image_encoder.a": 1, "sam_mask_decoder.b": 2, "no_mem_embed": 3, "memory_encoder.c": 4,
             "maskmem_tpos_enc": 5, "no_mem_pos_enc": 6}
    assert sam2_state_from_meta(state) == {"image_encoder.a": 1, "sam_mask_decoder.b": 2, "no_mem_embed": 3}


def test_released_configs_are_consistent():
    for name, cfg in SAM2_CONFIGS.items():
        e = cfg["trunk"]["embed_dim"]
        assert cfg["neck"]["backbone_channel_list"] == [8 * e, 4 * e, 2 * e, e], name
        if not name.startswith("sam2.1_"):  # the small offline variants
            continue
        assert cfg["image_size"] == 1024 and cfg["neck"]["d_model"] == 256
        assert cfg["decoder"]["use_high_res_features"]
    assert set(SAM2_CONFIGS) == {"sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus",
                                 "sam2.1_hiera_large", "tiny-test", "tiny-128"}
    with pytest.raises(KeyError, match="known"):
        sam2_config("sam2.1_hiera_huge")


def test_released_tiny_variant_builds_with_the_documented_size():
    model = build_sam2("sam2.1_hiera_tiny")
    n = sum(p.numel() for p in model.parameters())
    # SAM2.1 Hiera-T is 38.9M parameters in all; the image parts we keep are about 31.4M
    assert 31_000_000 < n < 32_000_000
    assert model.embedding_size == 64 and model.embed_dim == 256
    assert model.sam_mask_decoder.transformer.layers[0].mlp.layers[0].out_features == 2048


def test_sam2_pixel_values():
    img = Image.new("RGB", (50, 30), (0, 255, 0))
    px = sam2_pixel_values(img, 64)
    assert px.shape == (3, 64, 64)
    expected = (np.array([0.0, 1.0, 0.0]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(px[:, 5, 7].numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="expects 64x64"):
        build_sam2("tiny-test").encode_image(torch.zeros(1, 3, 32, 32))


def test_offline_default_variant_shapes():
    m = build_sam2("tiny-128", seed=0)
    assert m.image_size == 128 and m.embed_dim == 64 and m.uses_high_res  # as the released SAM2
    feats = m.encode_image(torch.zeros(1, 3, 128, 128))
    assert [tuple(h.shape[-2:]) for h in feats.high_res] == [(32, 32), (16, 16)]  # strides 4 and 8
    out = m(torch.zeros(2, 3, 128, 128), torch.zeros(2, 1, 64), output_size=(96, 128))
    assert out.shape == (2, 1, 96, 128)
    assert m.decode_masks(m.encode_image(torch.zeros(1, 3, 128, 128)), torch.zeros(1, 1, 64)).shape == (1, 1, 32, 32)
