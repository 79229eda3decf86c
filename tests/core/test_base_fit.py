"""The base fit's grounding examples: which referred objects, and the sentence each one gets."""

from __future__ import annotations

from perceptio_core.base_fit import GROUNDING_PROMPT, grounding_examples
from perceptio_core.records import ImageRecord, RefRecord, Sources


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
