"""The released InternVL architectures, as transformers-layout configs (SPEC §4): for benchmarks and
memory estimates at the real shapes with random (or meta-device) weights, never for loading.

Each preset is the ``InternVLConfig`` the checkpoint has in the transformers layout (the "-hf"
release, or ``perceptio convert-internvl`` of OpenGVLab's): InternViT-300M-448px (24 layers, 1024,
16 heads, MLP 4096, 448 px tiles, patch 14, layer scale; 256 image tokens per tile after the 0.5
pixel shuffle) and the language model:

=================  ==============  ======  ======  =========  ======  =======  ====
preset             language model  layers  hidden  heads/KV   MLP     vocab    head
=================  ==============  ======  ======  =========  ======  =======  ====
internvl2.5-1b     Qwen2.5-0.5B    24      896     14 / 2     4864    151674   untied
internvl2.5-4b     Qwen2.5-3B      36      2048    16 / 2     11008   151674   untied
internvl2.5-8b     InternLM2.5-7B  32      4096    32 / 8     14336   92554    untied
internvl3-8b       Qwen2.5-7B      28      3584    28 / 4     18944   151674   untied
=================  ==============  ======  ======  =========  ======  =======  ====

InternLM2.5-7B is a Llama once converted (``perceptio_core.model.convert``); its 92553-token
vocabulary gains ``<video>`` there (92554). Rope theta: 1e6 for all four.
"""

from __future__ import annotations

from typing import Any

from transformers import InternVLConfig, LlamaConfig, Qwen2Config
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

INTERNVIT_300M: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    image_size=448, patch_size=14, use_qk_norm=False, layer_scale_init_value=0.1,
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "internvl2.5-1b": dict(family="qwen2", text=dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151674, max_position_embeddings=32768)),
    "internvl2.5-4b": dict(family="qwen2", text=dict(
        hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        intermediate_size=11008, vocab_size=151674, max_position_embeddings=32768)),
    "internvl2.5-8b": dict(family="llama", text=dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=92554, max_position_embeddings=32768)),
    "internvl3-8b": dict(family="qwen2", text=dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=151674, max_position_embeddings=32768)),
}  # fmt: skip


def preset_config(name: str, **text_overrides: Any) -> InternVLConfig:
    """The ``InternVLConfig`` of preset ``name`` (untied head, rope theta 1e6); ``text_overrides``
    replace text-config fields (``vocab_size``, token ids, ``num_hidden_layers`` for a cut-down
    smoke shape). ``vision_layers`` in the overrides cuts the vision tower the same way."""
    if name not in PRESETS:
        raise KeyError(f"unknown InternVL preset {name!r} (known: {', '.join(PRESETS)})")
    spec = PRESETS[name]
    vision = dict(INTERNVIT_300M)
    if "vision_layers" in text_overrides:
        vision["num_hidden_layers"] = int(text_overrides.pop("vision_layers"))
    image_token_id = text_overrides.pop("image_token_id", None)
    text = {**spec["text"], "rope_theta": 1000000.0, "tie_word_embeddings": False, **text_overrides}
    text_config = (LlamaConfig if spec["family"] == "llama" else Qwen2Config)(**text)
    grid = vision["image_size"] // vision["patch_size"]
    kw = {"image_token_id": image_token_id} if image_token_id is not None else {}
    return InternVLConfig(
        vision_config=InternVLVisionConfig(**vision), text_config=text_config,
        image_seq_length=(grid // 2) ** 2, downsample_ratio=0.5, tie_word_embeddings=False, **kw,
    )  # fmt: skip


__all__ = ["INTERNVIT_300M", "PRESETS", "preset_config"]
