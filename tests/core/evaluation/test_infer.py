"""``infer`` (ARCHITECTURE ``perceptio infer``) and the evaluators with the real tiny model (random
weights): files written for an image outside every dataset, loading from a saved directory, clear
errors for bad inputs, and ``make_predictors`` / ``base_predictor`` through ``run_evaluation``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from perceptio_core.config import DataConfig, EvaluateConfig
from perceptio_core.evaluation.evaluate import base_predictor, make_predictors, run_evaluation
from perceptio_core.data.image_io import CorruptImageError, MissingImageError
from perceptio_core.evaluation.infer import ModelNotFoundError, colorize_depth, infer, resolve_model_dir
from perceptio_core.data.sources import read_sources

from perceptio_helpers import StandInDepthTokenizer, build_tiny

FORCE = "[SEG]<d_start>"  # a random model does not emit the block by itself: force it


@pytest.fixture(scope="module")
def model():
    return build_tiny().eval()


@pytest.fixture()
def new_image(tmp_path):
    """A picture that is in no dataset: a gradient with a disc, 50 x 36."""
    yy, xx = np.mgrid[0:36, 0:50]
    arr = np.stack([xx * 5, yy * 7, np.full_like(xx, 90)], -1).astype(np.uint8)
    arr[(yy - 18) ** 2 + (xx - 25) ** 2 < 64] = (250, 30, 30)
    path = tmp_path / "new.png"
    Image.fromarray(arr).save(path)
    return path


def test_infer_writes_mask_and_depth(model, new_image, tmp_path):
    out = tmp_path / "out"
    r = infer(model, new_image, "the red disc", out, template="refer_seg", response_prefix=FORCE,
              max_new_tokens=model.num_depth_tokens + 4)  # fmt: skip
    assert r.status == "ok" and r.text.startswith(FORCE)
    with Image.open(r.mask_png) as m:
        assert m.size == (50, 36) and m.mode == "L" and set(np.unique(np.asarray(m))) <= {0, 255}
    with Image.open(r.depth_png) as d:
        assert d.size == (50, 36) and d.mode == "RGB"
    assert r.overlay_png.is_file() and np.load(r.depth_npy).shape == (12, 12)
    meta = json.loads((out / "result.json").read_text())
    assert meta["status"] == "ok" and meta["mask_png"] == str(r.mask_png) and len(meta["depth_indices"]) == 9
    assert meta["prompt"].startswith("Please segment the object described as: the red disc.")


def test_infer_writes_every_mask(model, new_image, tmp_path):
    """An answer with two [SEG] (forced): mask_0.png and mask_1.png, mask.png the first."""
    out = tmp_path / "two"
    r = infer(model, new_image, "Segment the disc and the background.", out,
              response_prefix="[SEG] the disc [SEG] the background", max_new_tokens=0)  # fmt: skip
    assert [p.name for p in r.masks_png] == ["mask_0.png", "mask_1.png"]
    assert r.mask_png.read_bytes() == r.masks_png[0].read_bytes()
    for p in r.masks_png:
        with Image.open(p) as m:
            assert m.size == (50, 36) and m.mode == "L"
    meta = json.loads((out / "result.json").read_text())
    assert meta["masks_png"] == [str(p) for p in r.masks_png] and meta["depth_png"] is None


def test_infer_without_block_writes_no_mask(model, new_image, tmp_path):
    r = infer(model, new_image, "Describe the image.", tmp_path / "o", max_new_tokens=5)
    if r.status == "no_block":  # a random model: most likely no block
        assert r.mask_png is None and r.depth_png is None and not (tmp_path / "o" / "mask.png").exists()
    assert (tmp_path / "o" / "result.json").is_file()


def test_infer_from_a_saved_directory(model, new_image, tmp_path):
    model.save_pretrained(tmp_path / "artifact" / "model")
    kw = dict(template="refer_seg", response_prefix=FORCE, max_new_tokens=model.num_depth_tokens + 4)
    a = infer(model, new_image, "the red disc", tmp_path / "a", **kw)
    b = infer(tmp_path / "artifact", new_image, "the red disc", tmp_path / "b",
              depth_tokenizer=StandInDepthTokenizer(), **kw)  # the finetune artifact: <dir>/model
    assert a.text == b.text
    assert np.array_equal(np.asarray(Image.open(a.mask_png)), np.asarray(Image.open(b.mask_png)))


def test_bad_inputs_are_clear_errors(tmp_path, new_image):
    missing = tmp_path / "nope.png"
    with pytest.raises(MissingImageError, match="nope.png"):
        infer(tmp_path / "no-model", missing, "q", tmp_path / "o")  # the image is checked first
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CorruptImageError, match="bad.png"):
        infer(tmp_path / "no-model", bad, "q", tmp_path / "o")
    with pytest.raises(ModelNotFoundError, match="no-model"):
        infer(tmp_path / "no-model", new_image, "q", tmp_path / "o")
    with pytest.raises(ModelNotFoundError):
        resolve_model_dir(tmp_path)


def test_colorize_depth():
    rgb = colorize_depth(np.arange(6, dtype=np.float32).reshape(2, 3), (4, 6))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert colorize_depth(np.ones((2, 2))).shape == (2, 2, 3)  # constant map: no division by zero


def test_real_model_through_the_evaluators(model, tiny_world, tmp_path):
    from perceptio_core.model.internvl import build_tiny_internvl
    from perceptio_core.config import TinyVLMConfig

    src = read_sources(tiny_world, DataConfig(), cache_dir=tmp_path / "cache")
    cfg = EvaluateConfig(refer_datasets=["refcoco"], refer_splits=["val"], refer_limit=1, hardblink_limit=1,
                         mcq_limit=1, mme_limit=1, unconstrained_limit=1, max_new_tokens=model.num_depth_tokens + 4)
    tok = model.tokenizer
    base = build_tiny_internvl(TinyVLMConfig(), tok, seed=1).eval()
    preds = make_predictors(model, cfg, base_model=base, base_tokenizer=tok)
    ev = run_evaluation(
        preds["predict"], src, cfg, base_predict=preds["base_predict"],
        predict_unconstrained=preds["predict_unconstrained"], depth_spec=model.depth_spec)
    m = ev.metrics
    assert m["refcoco.val.n"] == 1 and 0.0 <= m["refcoco.val.ciou"] <= 1.0
    assert m["base.refcoco.val.ciou"] == 0.0  # text only: empty masks
    assert {m[f"hardblink.{n}.n"] for n in (3, 4, 5)} == {1.0} and 0 <= m["hardblink.mean.accuracy"] <= 1
    assert "mcq.mmbench.accuracy" in m and "base.mcq.mmbench.accuracy" in m
    assert m["mme.count.n"] == 2 and "base.mme.perception.score" in m
    assert 0 <= m["perception_block.wellformed"] <= 1 and m["perception_block.n_unconstrained"] == 1
    p = base_predictor(base, tok, model.depth_spec, max_new_tokens=3)(src.mcq[0].image_path, "What is it?")
    assert p.mask is None and p.depth_map is None and len(p.token_ids) <= 3


def test_predictors_need_room_for_the_models_block(model):
    n = model.num_depth_tokens  # the codec's N (9): [SEG], 2 markers and N codes = 12 tokens
    with pytest.raises(ValueError, match=f"N = {n}"):
        make_predictors(model, EvaluateConfig(max_new_tokens=n + 3))
    assert make_predictors(model, EvaluateConfig(max_new_tokens=n + 4))["predict"] is not None


def test_evaluation_tiles_images_up_to_evaluate_max_tiles(model, monkeypatch, tmp_path):
    """InternVL evaluates with more tiles than it trains with: ``evaluate.max_tiles`` sets the bound
    for the model and for the base alike; each prompt holds tokens_per_tile x tiles context tokens."""
    from PIL import Image

    import perceptio_core.model.generation as generation
    from perceptio_core.model.internvl import build_tiny_internvl
    from perceptio_core.config import TinyVLMConfig

    seen = []
    real = generation.generate_ids

    def spy(lm, prompt_ids, pixel_values, *a, **kw):
        seen.append((list(prompt_ids).count(model.tokenizer.context_image_token_id), pixel_values.shape[0]))
        return real(lm, prompt_ids, pixel_values, *a, **kw)

    monkeypatch.setattr(generation, "generate_ids", spy)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (200, 60), (10, 200, 30)).save(wide)  # aspect 3.3: a 3 x 1 grid + thumbnail
    tok = model.tokenizer
    base = build_tiny_internvl(TinyVLMConfig(), tok, seed=1).eval()
    per_tile = model.image_processor.tokens_per_tile
    for tiles, expected in ((0, 1), (4, 4)):  # 0: the model's own max_tiles (1)
        seen.clear()
        preds = make_predictors(model, EvaluateConfig(max_new_tokens=model.num_depth_tokens + 4, max_tiles=tiles),
                                base_model=base, base_tokenizer=tok)  # fmt: skip
        preds["predict"](wide, "What is it?")
        preds["base_predict"](wide, "What is it?")
        assert seen == [(per_tile * expected, expected)] * 2


def test_batched_evaluation_equals_one_at_a_time(model, tiny_world, tmp_path):
    """evaluate.batch_size decodes several prompts at once (left-padded, greedy): every metric, the
    Perceptio model's and the base's, equals the one-at-a-time evaluation's."""
    from perceptio_core.model.internvl import build_tiny_internvl
    from perceptio_core.config import TinyVLMConfig

    src = read_sources(tiny_world, DataConfig(), cache_dir=tmp_path / "cache")
    tok = model.tokenizer
    base = build_tiny_internvl(TinyVLMConfig(), tok, seed=1).eval()
    metrics = []
    for batch_size in (1, 5):
        cfg = EvaluateConfig(refer_datasets=["refcoco"], refer_splits=["val"], refer_limit=3, hardblink_limit=1,
                             mcq_limit=3, mme_limit=1, unconstrained_limit=2, batch_size=batch_size,
                             max_new_tokens=model.num_depth_tokens + 4)
        preds = make_predictors(model, cfg, base_model=base, base_tokenizer=tok)
        assert hasattr(preds["predict"], "batch") and hasattr(preds["base_predict"], "batch")
        ev = run_evaluation(preds["predict"], src, cfg, base_predict=preds["base_predict"],
                            predict_unconstrained=preds["predict_unconstrained"], depth_spec=model.depth_spec)
        metrics.append(ev.metrics)
    one, batched = metrics
    assert one.keys() == batched.keys() and len(one) > 30
    for k in one:
        assert one[k] == pytest.approx(batched[k], abs=1e-6, nan_ok=True), k
