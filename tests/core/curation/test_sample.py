"""The sample schema and its WebDataset form (SPEC §5)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from perceptio_core.data.masks import encode_mask
from perceptio_core.atomic_io import bytes_digest
from perceptio_core.curation.sample import Sample, from_wds, image_ext, make_key, sample_json, to_wds


def _png(seed=0, size=(12, 8)):
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _sample(**kw):
    img = _png()
    base = dict(
        key=make_key("refcoco+", "unc", "train", "r1", "s2"), source="refcoco+", split="train",
        task="refer_seg", image_digest=bytes_digest(img), image=img, prompt="Segment the cup.",
        target="[SEG] A cup.", answer="A cup.", masks_rle=[encode_mask(np.eye(8, 12, dtype=bool))],
        depth_tokens=[np.int64(3), 1, 2], upstream={"sources": "abc"}, meta={"ref_id": np.int32(1), "box": (1, 2)},
    )
    base.update(kw)
    return Sample(**base)


def test_key_and_ext():
    assert make_key("refcocog", "umd", "train", "r1", "s2") == "refcocog-umd-train-r1-s2"
    assert make_key("llava", "000/12.jpg") == "llava-000_12_jpg"
    assert image_ext(_png()) == "png"
    with pytest.raises(ValueError):
        _sample(key="bad.key")
    with pytest.raises(ValueError):
        _sample(task="nope")


def test_wds_round_trip():
    s = _sample()
    item = to_wds(s)
    assert list(item) == ["__key__", "json", "png"] and item["png"] == s.image
    back = from_wds(item)
    assert back.depth_tokens == [3, 1, 2] and back.meta == {"ref_id": 1, "box": [1, 2]}
    assert sample_json(back) == sample_json(s)  # deterministic bytes
    assert back.image == s.image and back.has_mask and back.has_depth
    item2 = dict(item, json=json.loads(item["json"]))  # already-decoded json is accepted
    assert from_wds(item2) == back


def test_multi_round_and_several_masks_round_trip():
    masks = [encode_mask(np.eye(8, 12, dtype=bool)), encode_mask(np.ones((8, 12), bool))]
    s = _sample(masks_rle=masks, target="[SEG] A cup.",
                rounds=[{"prompt": "Segment the plate.", "target": "[SEG] A plate."}])
    back = from_wds(to_wds(s))
    assert sample_json(back) == sample_json(s) and back.masks_rle == masks and back.mask_rle == masks[0]
    assert back.turns == [("Segment the cup.", "[SEG] A cup."), ("Segment the plate.", "[SEG] A plate.")]
    with pytest.raises(ValueError, match="round"):
        _sample(rounds=[{"prompt": "p"}])
    with pytest.raises(TypeError, match="list"):
        _sample(masks_rle=masks[0])


def test_text_only_sample_has_no_image_member():
    s = _sample(image=b"", image_digest="", masks_rle=[], task="instruct", target="Hello.", answer="Hello.")
    item = to_wds(s)
    assert list(item) == ["__key__", "json"]
    back = from_wds(item)
    assert sample_json(back) == sample_json(s) and back.image == b"" and not back.has_image and not back.has_mask and back.mask_rle is None
    with pytest.raises(ValueError, match="no undecoded image"):  # an image sample without its image
        from_wds({"__key__": "k", "json": sample_json(_sample())})


def test_version_1_json_is_still_read():
    """Shards curated before several masks (``mask_rle``: one mask or null) read as lists."""
    s = _sample()
    old = json.loads(sample_json(s))
    old["mask_rle"] = old.pop("masks_rle")[0]
    del old["rounds"]
    back = from_wds({"__key__": s.key, "json": json.dumps(old).encode(), "png": s.image})
    assert sample_json(back) == sample_json(s)
    old["mask_rle"] = None
    assert from_wds({"__key__": s.key, "json": old, "png": s.image}).masks_rle == []
