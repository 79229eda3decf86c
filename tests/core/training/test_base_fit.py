"""The base fit's grounding examples (which referred objects, and the sentence each one gets) and
its image-reliance check."""

from __future__ import annotations

import math

from perceptio_core.data.records import ImageRecord, McqRecord, RefRecord, Sources
from perceptio_core.format.prompts import TEMPLATES, format_mc_prompt
from perceptio_core.training.base_fit import CAPTION_PROMPT, GROUNDING_PROMPT, base_examples, grounding_examples

from perceptio_helpers import one_torch_thread  # noqa: F401


def _ref(image_id: int, ann_id: int, split: str, sentence: str, x0: float, *, dataset: str = "refcoco",
         seg: object = None, iscrowd: int = 0) -> RefRecord:  # fmt: skip
    square = [[x0, 10.0, x0 + 10.0, 10.0, x0 + 10.0, 20.0, x0, 20.0]]  # 10 x 10 px, rows 10..20
    return RefRecord(dataset=dataset, split_by="unc", ref_id=ann_id * 10 + len(split), sent_id=ann_id * 7 + len(sentence),
                     ann_id=ann_id, image_id=image_id, split=split, sentence=sentence, category_id=1,
                     category="ball", bbox=(x0, 10.0, 10.0, 10.0), segmentation=square if seg is None else seg,
                     iscrowd=iscrowd, area=100.0, attributes={"size": "small", "color": "red"})  # fmt: skip


def test_grounding_examples_describe_training_objects_by_position():
    images = {i: ImageRecord(i, f"{i}.jpg", f"/w/{i}.jpg", 90, 30, "coco", digest=f"{i:064x}") for i in (1, 2, 3)}
    refs = [
        _ref(1, 11, "train", "the ball on the left.", 5.0),  # centre x 10: left third of 90 px
        _ref(1, 11, "train", "The  ball on the left", 5.0, dataset="refcoco+"),  # same object and words
        _ref(1, 12, "train", "right ball", 70.0),  # centre x 75: right third
        _ref(2, 21, "train", "ball", 40.0), _ref(2, 22, "val", "other ball", 5.0, dataset="refcocog"),  # evaluated on
        _ref(3, 31, "train", "crowd", 5.0, iscrowd=1),
        _ref(3, 32, "train", "broken", 5.0, seg=[[1.0, 2.0, 3.0]]),  # an odd polygon: skipped, not raised
        _ref(4, 41, "train", "no image", 5.0),
    ]
    ex = grounding_examples(Sources(root="/w", coco_images=images, refs=refs))
    assert ex == [
        ("/w/1.jpg", GROUNDING_PROMPT.format(expr="the ball on the left"),
         "A small red ball on the left side of the image."),
        ("/w/1.jpg", GROUNDING_PROMPT.format(expr="right ball"), "A small red ball on the right side of the image."),
    ]  # fmt: skip
    assert ex[0][1] == "Describe the ball on the left in one sentence."


def _png(path, colour) -> str:
    from PIL import Image

    Image.new("RGB", (32, 24), colour).save(path)
    return str(path)


def test_base_examples_are_captions_train_vqa_and_descriptions_and_texts_cover_the_prompts():
    images = {i: ImageRecord(i, f"{i}.jpg", f"/w/{i}.jpg", 90, 30, "coco", digest=f"{i:064x}") for i in (1, 2)}
    mcq = [McqRecord("q1", "/w/v1.jpg", "Which colour?", {"A": "red", "B": "blue"}, "A", split="train"),
           McqRecord("q2", "/w/v2.jpg", "Which shape?", {"A": "ball", "B": "cone"}, "B", split="dev")]
    src = Sources(root="/w", coco_images=images, refs=[_ref(1, 11, "train", "left ball", 5.0)], mcq=mcq,
                  captions=[(1, "A red ball."), (2, "Two cones."), (9, "no such image")])
    ex, texts = base_examples(src, grounding=True)
    assert ex == [
        ("/w/1.jpg", CAPTION_PROMPT, "A red ball."), ("/w/2.jpg", CAPTION_PROMPT, "Two cones."),
        ("/w/v1.jpg", format_mc_prompt("Which colour?", {"A": "red", "B": "blue"}), "A"),  # dev: never trained on
        ("/w/1.jpg", GROUNDING_PROMPT.format(expr="left ball"), "A small red ball on the left side of the image."),
    ]
    assert base_examples(src, grounding=False)[0] == ex[:3]
    assert set(texts) >= {t for ts in TEMPLATES.values() for t in ts} | {"left ball"}


def test_image_reliance_is_zero_when_every_example_has_the_same_image(tmp_path):
    import torch

    from perceptio_core.training.base_fit import LMCollator, image_reliance, lm_loss
    from perceptio_core.config import TinyVLMConfig
    from perceptio_core.model.internvl import build_tiny_internvl
    from perceptio_core.model.processor import TileProcessor
    from perceptio_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    model = build_tiny_internvl(TinyVLMConfig(), tok, seed=0)
    same = _png(tmp_path / "a.png", (200, 30, 30))
    ex = [(same, "Describe the image briefly.", t) for t in ("a red ball", "two blue cubes", "a green cone")]
    r = image_reliance(model, tok, ex, batch_size=2)  # two batches: the mean is per token over both
    assert r["image_gain"] == 0.0 and r["image_loss"] == r["shuffled_image_loss"]
    collate = LMCollator(tok, TileProcessor.for_model(model.config), 1 << 30)
    with torch.no_grad():
        whole = float(lm_loss(model.eval(), collate([(open(same, "rb").read(), p, a) for _, p, a in ex])))
    assert abs(r["image_loss"] - whole) < 1e-5  # one batch's token mean = the per-token mean of two

    other = [(_png(tmp_path / f"{i}.png", c), p, a) for i, (c, (_, p, a)) in
             enumerate(zip([(200, 30, 30), (20, 20, 220), (30, 200, 30)], ex))]  # fmt: skip
    r2 = image_reliance(model, tok, other)
    assert math.isfinite(r2["image_loss"]) and math.isfinite(r2["shuffled_image_loss"])
    assert r2["image_gain"] != 0.0  # each answer now sees another image: the loss moves
    assert abs(r2["image_gain"] - (r2["shuffled_image_loss"] - r2["image_loss"])) < 1e-12


def test_instruction_examples_leave_out_malformed_and_outside_entries(tmp_path):
    """The base fit reads the LLaVA file too: a malformed conversation (curate quarantines it) and an
    image named outside the image root are left out, never raised or read."""
    import json

    from perceptio_core.training.base_fit import instruction_examples

    (tmp_path / "a.png").write_bytes(b"x")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}
    bad_turn = {"image": "a.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": 3}]}
    outside = {"image": "../../etc/passwd", "conversations": good["conversations"]}
    (tmp_path / "llava.json").write_text(json.dumps([good, bad_turn, outside, 7]))
    assert instruction_examples(tmp_path / "llava.json") == [(str(tmp_path / "a.png"), "Q?", "A.")]
