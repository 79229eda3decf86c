"""The fit_sam2 stage's core: examples, prompts, IoU, Meta-format checkpoint, the fit itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptio_core.config import load_config
from perceptio_core.data.records import ImageRecord, RefRecord, Sources
from perceptio_core.model.sam2_decoder import build_sam2, load_sam2_checkpoint
from perceptio_core.training.sam2_fit import (
    CHECKPOINT,
    PROMPT_PHASE_DIR,
    Sam2FitTask,
    centre_point,
    fit_sam2,
    mask_examples,
    batch_mask_iou,
    prompt_masks,
    sample_prompts,
    save_sam2_checkpoint,
    split_examples,
)

from perceptio_helpers import one_torch_thread  # noqa: F401


def _ref(image_id: int, ann_id: int, split: str, dataset: str = "refcoco", iscrowd: int = 0) -> RefRecord:
    seg = [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0, 2.0, 10.0]]
    return RefRecord(dataset=dataset, split_by="unc", ref_id=ann_id * 10 + len(split), sent_id=ann_id,
                     ann_id=ann_id, image_id=image_id, split=split, sentence="the cube", category_id=1,
                     category="cube", bbox=(2.0, 2.0, 8.0, 8.0), segmentation=seg, iscrowd=iscrowd,
                     area=64.0)  # fmt: skip


def test_mask_examples_use_training_images_only_one_per_annotation():
    images = {i: ImageRecord(i, f"{i}.jpg", f"/x/{i}.jpg", 16, 16, "coco", digest=f"{i:064x}") for i in (1, 2, 3)}
    refs = [
        _ref(1, 11, "train"), _ref(1, 11, "train", dataset="refcoco+"),  # same object twice: one example
        _ref(1, 12, "train"),
        _ref(2, 21, "train"), _ref(2, 22, "val", dataset="refcocog"),  # image 2 is evaluated on: all out
        _ref(3, 31, "train", iscrowd=1),  # crowd regions are not objects
        _ref(4, 41, "train"),  # no image record
    ]
    ex = mask_examples(Sources(root="/x", coco_images=images, refs=refs))
    assert [(e.image_path, e.record) for e in ex] == [("/x/1.jpg", "refcoco ann_id=11"), ("/x/1.jpg", "refcoco ann_id=12")]
    m = ex[0].mask()
    assert m.shape == (16, 16) and m[5, 5] and not m[12, 12]


def test_split_examples_by_image_digest_is_stable():
    images = {i: ImageRecord(i, f"{i}.jpg", f"/x/{i}.jpg", 16, 16, "coco", digest=f"{i * 0x11111111:08x}" + "0" * 56)
              for i in range(1, 15)}  # fmt: skip
    refs = [_ref(i, 100 + i, "train") for i in images]
    ex = mask_examples(Sources(root="/x", coco_images=images, refs=refs))
    train, hold = split_examples(ex, 0.25)
    # digest prefix i * 0x11111111 / 0xFFFFFFFF = i / 15 < 0.25 for i = 1, 2, 3
    assert sorted(e.image_digest[:8] for e in hold) == ["11111111", "22222222", "33333333"]
    assert len(train) == 11 and split_examples(ex, 0.25) == (train, hold)


def test_sample_prompts_draw_points_inside_the_mask_and_its_box():
    mask = np.zeros((20, 30), bool)
    mask[4:9, 10:16] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        points, labels, box = sample_prompts(mask, rng, max_points=3, box_prob=1.0)
        n = int((labels == 1).sum())
        assert 1 <= n <= 3 and (labels[n:] == -1).all() and points.shape == (3, 2)
        for x, y in points[:n]:
            assert mask[int(y), int(x)]
        assert box.tolist() == [10, 4, 16, 9]  # x0, y0, x1, y1 (exclusive ends)
    assert sample_prompts(mask, rng, 1, box_prob=0.0)[2] is None


def test_centre_point_lies_on_the_object_even_for_a_ring():
    ring = np.zeros((21, 21), bool)
    ring[2:19, 2:19] = True
    ring[5:16, 5:16] = False  # centre of mass (10, 10) is in the hole
    x, y = centre_point(ring)
    assert ring[int(y), int(x)]
    assert min(abs(x - 10), abs(y - 10)) == 0  # the nearest ring pixel to the centre, on an axis


def test_mask_iou_by_hand():
    gt = torch.zeros(2, 4, 4)
    gt[0, :2, :2] = 1  # 4 px
    logits = torch.full((2, 4, 4), -1.0)
    logits[0, :2, :3] = 1.0  # 6 px, 4 of them right: IoU 4 / 6
    iou = batch_mask_iou(logits, gt)
    assert iou[0].item() == pytest.approx(4 / 6)
    assert iou[1].item() == 1.0  # both empty
    from perceptio_core.evaluation.metrics import mask_iou  # the evaluation's IoU: the same, row for row

    for row in range(2):
        assert iou[row].item() == pytest.approx(mask_iou((logits[row] > 0).numpy(), gt[row].numpy()))


def test_prompts_steer_the_mask_and_boxes_enter_as_corner_points():
    sam2 = build_sam2("tiny-test", seed=0, freeze_image_encoder=False)
    x = torch.randn(1, 3, 64, 64).repeat(2, 1, 1, 1)
    labels = torch.ones(2, 1, dtype=torch.long)
    low, iou = prompt_masks(sam2, x, torch.tensor([[[5.0, 5.0]], [[60.0, 50.0]]]), labels)
    assert low.shape == (2, 1, 16, 16) and iou.shape == (2, 1)
    assert (low[0] - low[1]).abs().max() > 1e-4  # same image, another point: another mask
    box = torch.tensor([[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 0.0, 0.0]])
    with_box, _ = prompt_masks(sam2, x, torch.tensor([[[5.0, 5.0]], [[5.0, 5.0]]]), labels, box,
                               torch.tensor([True, False]))  # fmt: skip
    without, _ = prompt_masks(sam2, x[:1], torch.tensor([[[5.0, 5.0]]]), labels[:1])
    assert (with_box[0] - without[0]).abs().max() > 1e-4
    # the box is two corner points (labels 2, 3) before the points; a row without one gets two
    # unused (-1) slots there, as SAM2 pads a batch of mixed prompts
    as_points, _ = prompt_masks(sam2, x[:1], torch.tensor([[[4.0, 4.0], [20.0, 20.0], [5.0, 5.0]]]),
                                torch.tensor([[2, 3, 1]]))  # fmt: skip
    torch.testing.assert_close(with_box[0], as_points[0], rtol=0, atol=1e-5)
    padded, _ = prompt_masks(sam2, x[:1], torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]]),
                             torch.tensor([[-1, -1, 1]]))  # fmt: skip
    torch.testing.assert_close(with_box[1], padded[0], rtol=0, atol=1e-5)


def test_checkpoint_is_metas_layout_and_loads_through_the_release_loader(tmp_path):
    src = build_sam2("tiny-test", seed=1, freeze_image_encoder=False)
    path = save_sam2_checkpoint(src, tmp_path, "tiny-test")
    assert path.name == CHECKPOINT
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    assert set(blob) == {"model"} and any(k.startswith("image_encoder.trunk.") for k in blob["model"])
    dst = build_sam2("tiny-test", seed=2)
    assert load_sam2_checkpoint(dst, path)["dropped"] == 0
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_fit_sam2_on_a_tiny_world_writes_a_loadable_checkpoint_and_scores_it(tiny_world, tmp_path):
    from perceptio_core.data.sources import read_sources

    cfg = load_config("smoke", ["run.device=cpu", "sam2_fit.steps=4", "sam2_fit.refine_steps=3",
                                "sam2_fit.eval_examples=4", "sam2_fit.holdout_fraction=0.3"])  # fmt: skip
    sources = read_sources(tiny_world, cfg.data, cache_dir=tmp_path / "cache")
    m = fit_sam2(sources, cfg, tmp_path / "fit", resume=True)
    # two phases (tiny-test reads high-resolution features): 4 prompt steps, then 3 refine steps
    assert m["prompt_phase_steps"] == 4 and m["steps"] == 3
    assert m["train_examples"] > 0 and m["holdout_examples"] > 0
    for k in ("holdout_point_miou", "train_point_miou", "init_point_miou", "prompt_phase_holdout_point_miou"):
        assert 0.0 <= m[k] <= 1.0
    first = torch.load(str(tmp_path / "fit" / PROMPT_PHASE_DIR / "model" / CHECKPOINT), weights_only=True)["model"]
    final = torch.load(str(tmp_path / "fit" / "model" / CHECKPOINT), weights_only=True)["model"]
    for conv in ("conv_s0", "conv_s1"):  # zero (unread) in the first phase, trained in the second
        assert not first[f"sam_mask_decoder.{conv}.weight"].any()
        assert final[f"sam_mask_decoder.{conv}.weight"].abs().sum() > 0
    for t in ("mask_bce", "mask_dice", "iou_mse"):
        assert np.isfinite(m[f"{t}_first"]) and np.isfinite(m[f"{t}_last"])
    fitted = build_sam2("tiny-test", tmp_path / "fit" / "model" / CHECKPOINT)
    untrained = build_sam2("tiny-test", seed=cfg.sam2_fit.seed)
    key = "sam_mask_decoder.mask_tokens.weight"
    assert not torch.equal(fitted.state_dict()[key], untrained.state_dict()[key])  # it trained
    # the image encoder trained too (it is frozen only later, in fine-tuning)
    enc = "image_encoder.trunk.patch_embed.proj.weight"
    assert not torch.equal(fitted.state_dict()[enc], untrained.state_dict()[enc])
    from PIL import Image

    with Image.open(tmp_path / "fit" / "figures" / "prompted_masks.png") as fig:
        assert fig.width > 200 and fig.height > 100
    again = fit_sam2(sources, cfg, tmp_path / "fit", resume=True)  # resumes at the end: same weights
    assert again["holdout_point_miou"] == pytest.approx(m["holdout_point_miou"])


def test_prompt_phase_switches_the_high_res_path_off_without_changing_what_the_variant_predicts():
    cfg = load_config("smoke", ["run.device=cpu"])
    fit = Sam2FitTask([], cfg, "prompt").build_model()
    dec = fit.sam2.sam_mask_decoder
    assert not fit.sam2.uses_high_res
    for conv in (dec.conv_s0, dec.conv_s1):
        assert not conv.weight.any() and not conv.bias.any() and not conv.weight.requires_grad
    assert dec.mask_tokens.weight.requires_grad and fit.sam2.image_encoder.trunk.patch_embed.proj.weight.requires_grad
    # the same weights read as the variant (high-res path on, zero projections): the same masks
    as_variant = build_sam2("tiny-test", seed=None, freeze_image_encoder=False)
    as_variant.load_state_dict(fit.sam2.state_dict())
    assert as_variant.uses_high_res
    x = torch.randn(2, 3, 64, 64)
    pts, labels = torch.tensor([[[5.0, 9.0]], [[40.0, 30.0]]]), torch.ones(2, 1, dtype=torch.long)
    fit.eval(), as_variant.eval()
    with torch.no_grad():
        torch.testing.assert_close(prompt_masks(fit.sam2, x, pts, labels)[0], prompt_masks(as_variant, x, pts, labels)[0],
                                   rtol=0, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="refine"):
        Sam2FitTask([], cfg, "refine")  # the refine phase starts from the first phase's checkpoint
    refine = Sam2FitTask([], cfg, "refine", init="x.pt")
    assert refine.fingerprint()["phase"] == "refine" != Sam2FitTask([], cfg).fingerprint()["phase"]


def test_one_phase_when_refine_steps_is_zero(tiny_world, tmp_path):
    from perceptio_core.data.sources import read_sources

    cfg = load_config("smoke", ["run.device=cpu", "sam2_fit.steps=2", "sam2_fit.refine_steps=0",
                                "sam2_fit.eval_examples=2", "sam2_fit.holdout_fraction=0.3"])  # fmt: skip
    sources = read_sources(tiny_world, cfg.data, cache_dir=tmp_path / "cache")
    m = fit_sam2(sources, cfg, tmp_path / "fit", resume=True)
    assert m["steps"] == 2 and "prompt_phase_steps" not in m
    assert not (tmp_path / "fit" / PROMPT_PHASE_DIR).exists()
    final = torch.load(str(tmp_path / "fit" / "model" / CHECKPOINT), weights_only=True)["model"]
    assert not final["sam_mask_decoder.conv_s0.weight"].any()  # never read, never trained


def test_fit_sam2_without_training_masks_names_the_way_out(tmp_path):
    cfg = load_config("smoke", ["run.device=cpu"])
    with pytest.raises(RuntimeError, match="model.sam2_checkpoint"):
        fit_sam2(Sources(root="/nowhere"), cfg, tmp_path)


@pytest.mark.parametrize("override", ["sam2_fit.refine_steps=-1", "sam2_fit.box_prob=1.5", "sam2_fit.max_points=0", "sam2_fit.holdout_fraction=1.0"])
def test_bad_fit_settings_are_named(override):
    from perceptio_core.config import ConfigError

    with pytest.raises(ConfigError, match="sam2_fit"):
        load_config("tiny", [override])
