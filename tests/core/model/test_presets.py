"""The released InternVL shapes (perceptio_core/model/presets.py): parameter counts equal the
published sizes (OpenGVLab's model cards: 0.94B, 3.7B, 8.1B, 7.9B), built on the meta device."""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from perceptio_core.model.presets import PRESETS, preset_config

PUBLISHED = {"internvl2.5-1b": 0.938, "internvl2.5-4b": 3.713, "internvl2.5-8b": 8.075, "internvl3-8b": 7.944}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_has_the_released_parameter_count_and_an_untied_head(name):
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(preset_config(name))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], abs=0.001)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.config.image_seq_length == 256  # 448 px tiles, patch 14, pixel shuffle 0.5


def test_overrides_cut_the_shape_for_a_smoke_run():
    cfg = preset_config("internvl2.5-8b", num_hidden_layers=1, vision_layers=1, vocab_size=4096, image_token_id=7)
    assert cfg.text_config.num_hidden_layers == 1 and cfg.vision_config.num_hidden_layers == 1
    assert cfg.text_config.vocab_size == 4096 and cfg.image_token_id == 7
    assert type(cfg.text_config).__name__ == "LlamaConfig"
    with pytest.raises(KeyError, match="unknown InternVL preset"):
        preset_config("internvl9-1t")
