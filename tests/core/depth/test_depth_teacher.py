"""The depth teacher (SPEC §2): Depth Anything V2 built, saved and loaded like a released checkpoint;
batched inference that quarantines bad images instead of raising; the maps of a corpus written in
durable chunks that a rerun resumes; one scoring against true depth. (Its fit:
tests/core/training/test_teacher_fit.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DepthAnythingForDepthEstimation

from perceptio_core.atomic_io import atomic_open, file_digest
from perceptio_core.config import ConfigError, TeacherConfig, TeacherFitConfig
from perceptio_core.data.records import ImageRecord
from perceptio_core.depth import teacher as teacher_mod
from perceptio_core.depth.maps import DepthMaps
from perceptio_core.depth.metrics import teacher_scores
from perceptio_core.depth.teacher import (
    bare_forward_throughput,
    build_teacher_config,
    build_teacher_processor,
    evaluate_teacher,
    load_teacher,
    predict_depth,
    resolve_checkpoint,
    write_teacher_maps,
)

from perceptio_helpers import one_torch_thread  # noqa: F401

TINY_FIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, fusion_hidden_size=16,
                steps=12, batch_size=4, lr=1e-3, seed=0)
INPUT = 42  # 3 x 3 patches of 14


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


# ---- a corpus ----------------------------------------------------------------------------------


def _writer(folder: Path):
    def atomic(name: str, mode: str = "wb"):
        return atomic_open(folder / name, mode)

    return atomic


def test_write_teacher_maps_resumes_at_the_first_missing_chunk(tiny_checkpoint, images, tmp_path, monkeypatch):
    by_digest = {file_digest(p): p for p in images}
    cfg = TeacherConfig(input_size=INPUT, map_size=16, chunk_size=2, batch_size=2)
    out = tmp_path / "maps"
    out.mkdir()
    run = write_teacher_maps(str(tiny_checkpoint), by_digest, out, _writer(out), cfg, device="cpu")
    assert run == {"chunks": 3, "resumed_chunks": 0}
    maps = DepthMaps(out)
    assert sorted(maps.digests) == sorted(by_digest) and maps.map_size == 16 and not maps.errors
    first = {d: maps.get(d) for d in maps.digests}
    # a run killed before chunk 1's sidecar: only that chunk is predicted again, and the same
    (out / "maps-000001.json").unlink()
    (out / "maps-000001.npy").unlink()
    run = write_teacher_maps(str(tiny_checkpoint), by_digest, out, _writer(out), cfg, device="cpu")
    assert run == {"chunks": 3, "resumed_chunks": 2}
    again = DepthMaps(out)
    for d, m in first.items():
        np.testing.assert_array_equal(again.get(d), m)
    # nothing missing: the teacher is not even loaded
    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: pytest.fail("loaded a teacher for nothing"))
    assert write_teacher_maps(str(tiny_checkpoint), by_digest, out, _writer(out), cfg)["resumed_chunks"] == 3


def test_write_teacher_maps_records_failed_images(tiny_checkpoint, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    by_digest = {file_digest(images[0]): images[0], file_digest(bad): str(bad)}
    cfg = TeacherConfig(input_size=INPUT, map_size=16, chunk_size=4)
    out = tmp_path / "maps"
    out.mkdir()
    write_teacher_maps(str(tiny_checkpoint), by_digest, out, _writer(out), cfg, device="cpu")
    maps = DepthMaps(out)
    assert maps.digests == [file_digest(images[0])]
    assert maps.errors[file_digest(bad)].startswith("unreadable image")


def test_evaluate_teacher_is_the_one_scoring_of_stored_maps(tiny_checkpoint, tmp_path):
    """Scoring a teacher from its model and from its stored maps gives the same figures."""
    rng = np.random.default_rng(0)
    recs, true = [], []
    for i in range(3):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p)
        depth = rng.uniform(1.0, 10.0, (48, 64)).astype(np.float32)
        np.save(tmp_path / f"d{i}.npy", depth)
        recs.append(ImageRecord(i, p.name, str(p), 64, 48, "coco", str(tmp_path / f"d{i}.npy"), file_digest(p)))
        true.append(depth)
    model, processor = load_teacher(str(tiny_checkpoint), "cpu")
    got = evaluate_teacher(model, processor, recs, map_size=16, device="cpu")
    maps = [r.map for r in predict_depth(model, processor, [r.path for r in recs], device="cpu", precision="fp32",
                                         map_size=16)]  # fmt: skip
    want = teacher_scores((r.digest, m, t) for r, m, t in zip(recs, maps, true))
    assert got == {**want, "errors": 0.0} and got["images"] == 3
    with pytest.raises(ValueError, match="digest"):
        evaluate_teacher(model, processor, [ImageRecord(0, "x", recs[0].path, 64, 48, "coco", recs[0].depth_path)],
                         map_size=16)  # fmt: skip


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
