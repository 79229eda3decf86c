"""The depth teacher (SPEC §2): Depth Anything V2 built, fitted, saved and loaded like a released
checkpoint; batched inference that quarantines bad images instead of raising."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import DepthAnythingForDepthEstimation

from perceptio_core.config import ConfigError, TeacherConfig, TeacherFitConfig
from perceptio_core.depth.teacher import (
    align_positive,
    bare_forward_throughput,
    build_teacher_config,
    build_teacher_processor,
    fit_teacher,
    gradient_matching_loss,
    load_teacher,
    predict_depth,
    resolve_checkpoint,
    split_holdout,
    ssi_loss,
)
from perceptio_core.data.records import ImageRecord

TINY_FIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, fusion_hidden_size=16,
                steps=12, batch_size=4, lr=1e-3, seed=0)
INPUT = 42  # 3 x 3 patches of 14


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny Depth Anything V2 saved exactly as a released one is."""
    out = tmp_path_factory.mktemp("tiny_teacher")
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(build_teacher_config(TeacherFitConfig(**TINY_FIT), INPUT))
    model.save_pretrained(out)
    build_teacher_processor(INPUT).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 48), (50, 50), (64, 48)]):
        p = out / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def world_images(root: Path) -> list[ImageRecord]:
    recs = []
    for i, p in enumerate(sorted((root / "images" / "train2014").glob("*.jpg"))):
        d = root / "depth" / (p.stem + ".npy")
        recs.append(ImageRecord(i, p.name, str(p), 64, 48, "coco", str(d)))
    return recs


# ---- building ---------------------------------------------------------------------------------


def test_teacher_config_is_a_scaled_depth_anything_v2():
    cfg = build_teacher_config(TeacherFitConfig(), 112)
    assert cfg.model_type == "depth_anything" and cfg.depth_estimation_type == "relative"
    bb = cfg.backbone_config
    assert bb.model_type == "dinov2" and bb.hidden_size == 64 and bb.num_hidden_layers == 4
    assert list(bb.out_indices) == [1, 2, 3, 4] and bb.patch_size == 14
    assert list(cfg.neck_hidden_sizes) == [8, 16, 32, 64] and list(cfg.reassemble_factors) == [4, 2, 1, 0.5]
    small = build_teacher_config(
        TeacherFitConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, fusion_hidden_size=64), 518
    )  # the Depth-Anything-V2-Small architecture
    assert list(small.backbone_config.out_indices) == [3, 6, 9, 12]
    assert list(small.neck_hidden_sizes) == [48, 96, 192, 384]
    assert small.fusion_hidden_size == 64 and small.head_hidden_size == 32


def test_processor_matches_released_settings():
    p = build_teacher_processor(112)
    assert p.size["height"] == p.size["width"] == 112
    assert list(p.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(p.image_std) == pytest.approx([0.229, 0.224, 0.225])
    assert p.ensure_multiple_of == 14 and not p.keep_aspect_ratio
    with pytest.raises(ValueError, match="multiple"):
        build_teacher_processor(100)


def test_config_checks():
    with pytest.raises(ConfigError, match="multiple"):
        TeacherConfig(input_size=100)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        TeacherFitConfig(num_hidden_layers=3)


# ---- loading ----------------------------------------------------------------------------------


def test_tiny_checkpoint_loads_like_a_released_one(tiny_checkpoint):
    names = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert names == ["config.json", "model.safetensors", "preprocessor_config.json"]
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "DPTImageProcessor"  # as the released checkpoints say
    model, processor = load_teacher(str(tiny_checkpoint), "cpu")
    assert type(model).__name__ == "DepthAnythingForDepthEstimation" and not model.training
    assert type(processor).__name__.startswith("DPTImageProcessor")
    assert next(model.parameters()).dtype == torch.float32


def test_missing_paths_fail_clearly_without_hub_access(tmp_path, monkeypatch):
    for missing in (str(tmp_path / "nope"), "./no-such-teacher", "~/no/such/teacher"):
        with pytest.raises(FileNotFoundError, match="not found"):
            load_teacher(missing, "cpu")
    # a relative path whose first component exists is a path, not an "org/name" hub id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    with pytest.raises(FileNotFoundError, match="work/teacher"):
        load_teacher("work/teacher", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher(str(tmp_path / "empty"), "cpu")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        load_teacher(str(tmp_path / "file.bin"), "cpu")
    assert resolve_checkpoint("depth-anything/Depth-Anything-V2-Small-hf") == (
        "depth-anything/Depth-Anything-V2-Small-hf", False)


def test_hub_id_offline_reads_the_cache_only(monkeypatch, tmp_path, tiny_checkpoint):
    """A hub id goes through the same from_pretrained path; offline, only the local cache is read."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--depth-anything--Depth-Anything-V2-Small-hf"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in tiny_checkpoint.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_teacher("depth-anything/Depth-Anything-V2-Small-hf", "cpu")
    local, _ = load_teacher(str(tiny_checkpoint), "cpu")
    x = torch.rand(1, 3, INPUT, INPUT)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).predicted_depth, local(pixel_values=x).predicted_depth)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_teacher("perceptio-test/no-such-depth-model", "cpu")


# ---- inference --------------------------------------------------------------------------------


def test_predict_depth_gives_normalised_maps_in_order(tiny_checkpoint, images):
    model, processor = load_teacher(str(tiny_checkpoint), "cpu")
    res = list(predict_depth(model, processor, images[:3], batch_size=2, device="cpu", map_size=20))
    assert [r.index for r in res] == [0, 1, 2]
    for r in res:
        assert r.error is None
        assert r.map.shape == (20, 20) and r.map.dtype == np.float32
        assert r.map.min() == 0.0 and r.map.max() == 1.0
        assert r.raw_max > r.raw_min
    # stateless: the same image alone gives the same map
    again = next(iter(predict_depth(model, processor, images[1:2], device="cpu", map_size=20)))
    np.testing.assert_allclose(again.map, res[1].map, atol=1e-5)


def test_worker_processes_and_mixed_shapes(tiny_checkpoint, images):
    """Workers preprocess in parallel; a processor keeping aspect ratios (as released ones do) gives
    batches of several shapes, forwarded group by group, still yielded in input order."""
    model, processor = load_teacher(str(tiny_checkpoint), "cpu")
    ref = list(predict_depth(model, processor, images, batch_size=2, device="cpu", map_size=16))
    par = list(predict_depth(model, processor, images, batch_size=2, num_workers=1, device="cpu", map_size=16))
    assert [r.index for r in par] == list(range(len(images)))
    for a, b in zip(ref, par):
        np.testing.assert_array_equal(a.map, b.map)
    processor.keep_aspect_ratio = True
    mixed = list(predict_depth(model, processor, images, batch_size=5, device="cpu", map_size=16))
    assert [r.index for r in mixed] == list(range(len(images)))
    assert all(r.error is None and r.map.shape == (16, 16) for r in mixed)


def test_unreadable_image_is_reported_not_raised(tiny_checkpoint, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    model, processor = load_teacher(str(tiny_checkpoint), "cpu")
    paths = [images[0], str(bad), images[2], str(tmp_path / "missing.png")]
    res = list(predict_depth(model, processor, paths, batch_size=3, device="cpu", map_size=16))
    assert [r.index for r in res] == [0, 1, 2, 3]
    assert res[0].error is None and res[2].error is None
    assert res[1].error.startswith("unreadable image") and res[1].map is None
    assert res[3].error.startswith("unreadable image")


def test_non_finite_output_is_reported_not_stored(tiny_checkpoint, images, monkeypatch):
    model, processor = load_teacher(str(tiny_checkpoint), "cpu")
    original = model.forward

    def nan_for_second(*args, **kwargs):
        out = original(*args, **kwargs)
        out.predicted_depth[1] = float("nan")
        return out

    monkeypatch.setattr(model, "forward", nan_for_second)
    res = list(predict_depth(model, processor, images[:3], batch_size=3, device="cpu", map_size=16))
    assert res[1].error is not None and "non-finite" in res[1].error and res[1].map is None
    assert res[0].error is None and res[2].error is None
    assert np.isfinite(res[0].map).all()


def test_bare_forward_throughput(tiny_checkpoint, images):
    model, processor = load_teacher(str(tiny_checkpoint), "cpu")
    assert bare_forward_throughput(model, processor, images, batch_size=2, device="cpu") > 0


# ---- fitting ----------------------------------------------------------------------------------


def test_ssi_loss_is_affine_invariant_and_rejects_inverted_predictions():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 12, 12, generator=g) + 0.1
    mask = torch.ones(2, 12, 12, dtype=torch.bool)
    zero, residual = ssi_loss(3.0 * target + 2.0, target, mask)
    assert zero.item() == pytest.approx(0.0, abs=1e-5)
    assert gradient_matching_loss(residual, mask).item() == pytest.approx(0.0, abs=1e-5)
    pred = torch.rand(2, 12, 12, generator=g)
    a, _ = ssi_loss(pred, target, mask)
    b, _ = ssi_loss(5.0 * pred - 1.0, target, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    # an inverted (depth-like) prediction: least squares would align it with a negative scale;
    # the positive-scale alignment keeps it wrong, so the loss is large
    inverted, _ = ssi_loss(-target, target, mask)
    assert inverted.item() > 1.0
    assert torch.allclose(align_positive(-target, target, mask).mean(), target.mean(), atol=0.2)


def test_split_holdout_is_seeded_and_disjoint():
    tr, ho = split_holdout(20, 0.1, 0)
    assert len(ho) == 2 and not set(tr) & set(ho) and sorted(tr + ho) == list(range(20))
    assert split_holdout(20, 0.1, 0) == (tr, ho)
    assert split_holdout(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])


def test_fit_teacher_saves_a_loadable_checkpoint_deterministically(tiny_world, tmp_path):
    recs = world_images(tiny_world)[:12]
    cfg = TeacherFitConfig(**TINY_FIT, holdout_fraction=0.25)
    m1 = fit_teacher(recs, cfg, INPUT, tmp_path / "a", "cpu", map_size=16)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert m1["train_images"] == 9 and m1["holdout_images"] == 3
    for key in ("loss", "holdout_absrel", "holdout_pair_order", "train_absrel", "train_delta1"):
        assert np.isfinite(m1[key]), key
    model, processor = load_teacher(str(tmp_path / "a"), "cpu")
    r = next(iter(predict_depth(model, processor, [recs[0].path], device="cpu", map_size=16)))
    assert r.error is None and r.map.shape == (16, 16)
    fit_teacher(recs, cfg, INPUT, tmp_path / "b", "cpu", map_size=16)
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fit_teacher_needs_true_depth(tmp_path, images):
    recs = [ImageRecord(0, "x.png", images[0], 64, 48, "coco", None)]
    with pytest.raises(ValueError, match="no true depth"):
        fit_teacher(recs, TeacherFitConfig(**TINY_FIT, holdout_fraction=0.0), INPUT, tmp_path, "cpu")


# ---- device and figures -----------------------------------------------------------------------


def test_device_and_precision_resolution():
    from perceptio_core.device import autocast, resolve_device, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with autocast(cpu, "fp32") as dtype:
        assert dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16") as dtype:
        assert dtype == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_depth_figures_are_pngs(tmp_path, images):
    import io

    from perceptio_core.evaluation import viz
    true = np.linspace(2.0, 20.0, 48 * 64, dtype=np.float32).reshape(48, 64)  # metres
    teacher = np.random.default_rng(0).uniform(0, 1, (20, 20)).astype(np.float32)
    rows = [(viz.load_rgb(images[0]), true, teacher, teacher), (np.asarray(viz.load_rgb(images[1])), None, teacher,
                                                                 torch.from_numpy(teacher))]
    viz.depth_grid(rows, ["image", "true depth", "teacher", "VQ-VAE"], tmp_path / "grid.png")
    buf = io.BytesIO()
    viz.loss_curves([{"step": 1.0, "loss": 1.0, "mse": 0.5, "batch_usage": 0.2, "lr": 1e-3},
                     {"step": 2.0, "loss": 0.5, "mse": 0.2, "batch_usage": 0.6, "lr": 1e-3}], buf, title="t")
    viz.map_grid([teacher] * 3, tmp_path / "maps.png", ncols=2)
    for data in ((tmp_path / "grid.png").read_bytes(), buf.getvalue(), (tmp_path / "maps.png").read_bytes()):
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # metric depth is drawn as normalised inverse depth: nearest = 1, farthest = 0
    shown = viz.inverse_depth_display(true)
    assert shown[0, 0] == 1.0 and shown[-1, -1] == 0.0
    with pytest.raises(ValueError, match="cells"):
        viz.depth_grid([(teacher,)], ["a", "b"], tmp_path / "bad.png")
