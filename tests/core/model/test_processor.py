"""Dynamic tiling (perceptio_core/model/processor.py) against transformers' own InternVL processor:
same grid, same tiles, same ``<IMG_CONTEXT>`` count and the same prompt ids, on non-square images,
from the same checkpoint files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from perceptio_core.config import TinyVLMConfig
from perceptio_core.model.batching import encode_prompt
from perceptio_core.model.internvl import tiny_internvl_config
from perceptio_core.model.processor import TileProcessor, candidate_grids, tile_grid

from perceptio_helpers import tiny_tokenizer


class _ImageOnlyProcessor(InternVLProcessor):
    """transformers' InternVLProcessor without its video processor (whose class needs torchvision,
    which this project never imports): the image path is the library's, untouched."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_the_grid_rule_is_transformers_on_every_aspect_ratio(max_tiles):
    sizes = [(w, h) for w in (17, 100, 300, 448, 640, 897, 1000, 2000, 4000) for h in (20, 224, 333, 448, 900, 3000)]
    for w, h in sizes:
        cols, rows = get_optimal_tiled_canvas((h, w), (448, 448), 1, max_tiles)
        assert tile_grid(w, h, 448, 1, max_tiles) == (cols, rows), (w, h)
    assert candidate_grids(1, 4) == ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1))


def test_tile_counts_at_the_released_size_by_hand():
    proc = TileProcessor(tile_size=448, tokens_per_tile=256, max_tiles=12)
    # 1000 x 300: aspect 3.33 -> 3 x 1 (diff 0.33) beats 4 x 1 (0.67): 3 tiles + thumbnail
    assert proc.grid(1000, 300) == (3, 1) and proc.num_tiles(1000, 300) == 4
    assert proc.num_image_tokens(1000, 300) == 4 * 256
    # a square image: (1, 1), (2, 2) and (3, 3) tie on ratio; 2 x 2 while the image covers more
    # than half of its 896 x 896 canvas (area 640^2 > 0.5 * 896^2), not 3 x 3 (640^2 < 0.5 * 1344^2)
    assert proc.grid(640, 640) == (2, 2) and proc.num_tiles(640, 640) == 5
    assert proc.grid(300, 300) == (1, 1) and proc.num_tiles(300, 300) == 1  # one tile: no thumbnail
    assert proc.with_max_tiles(6).grid(4000, 300) == (6, 1)
    assert TileProcessor(tile_size=448, tokens_per_tile=256).num_tiles(1000, 300) == 1  # max_tiles 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint folder as the pipeline saves one: tokenizer (chat template inside) and
    processor files, read back by transformers' classes."""
    folder = tmp_path_factory.mktemp("ckpt")
    tok = tiny_tokenizer()
    tok.save_pretrained(str(folder))
    cfg = tiny_internvl_config(TinyVLMConfig(image_size=56, patch_size=7), tok)  # 16 tokens per tile
    proc = TileProcessor.for_model(cfg, max_tiles=12)
    proc.save_pretrained(folder)
    return folder, tok, cfg, proc


@pytest.mark.parametrize("size", [(200, 60), (60, 170), (130, 100), (56, 56), (300, 290)])
def test_same_tiles_and_tokens_as_transformers_internvl_processor(checkpoint, size):
    folder, tok, cfg, proc = checkpoint
    image = _photo(*size, seed=size[0])
    hf_images = GotOcr2ImageProcessorPil.from_pretrained(str(folder))
    assert hf_images.max_patches == 12 and hf_images.crop_to_patches and hf_images.size.height == 56
    hf = _ImageOnlyProcessor(image_processor=hf_images, tokenizer=tok, video_processor=None,
                             image_seq_length=json.loads((folder / "processor_config.json").read_text())["image_seq_length"])  # fmt: skip
    prompt = "Which point is the closest to the camera?"
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        tokenize=False, add_generation_prompt=True,
    )
    out = hf(images=[image], text=[text], return_tensors="pt")

    ours = proc(image)
    assert ours.shape == out["pixel_values"].shape  # same number of tiles, thumbnail included
    assert torch.allclose(ours, out["pixel_values"].float(), atol=1e-5)
    ids = encode_prompt(tok, prompt, proc.num_image_tokens(*image.size))
    assert ids == out["input_ids"][0].tolist()  # same chat template, same <IMG_CONTEXT> count
    assert ids.count(tok.context_image_token_id) == 16 * len(ours)


def test_a_processor_file_that_disagrees_with_the_vision_tower_is_named(checkpoint, tmp_path):
    folder, tok, cfg, _ = checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    data = json.loads((folder / "preprocessor_config.json").read_text())
    data["size"] = {"height": 448, "width": 448}
    (bad / "preprocessor_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="preprocessor_config.json: tile size 448"):
        TileProcessor.for_model(cfg, [bad])
    read = TileProcessor.for_model(cfg, [tmp_path / "missing", folder])  # the first folder that has one
    assert (read.max_tiles, read.tile_size, read.tokens_per_tile) == (12, 56, 16)
    assert TileProcessor.for_model(cfg, [folder], max_tiles=6).max_tiles == 6
