"""Plain records the readers return and the later stages consume (SPEC §5).

Every reader in ``perceptio_core`` (``refer.py``, ``ade20k.py``, ``hardblink.py``, ``vqa.py``) turns
a dataset tree in its real on-disk format into these records; nothing here knows about files,
Prefect or the artifact store. A record that cannot be used becomes a :class:`QuarantineEntry`
naming the record and the reason, and the rest goes on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class QuarantineEntry:
    """One bad input record: where it came from, which record, and why it was set aside."""

    source: str  # "refcoco", "refcoco+", "refcocog", "coco", "ade20k", "hardblink", "vqa", ...
    record: str  # a human-readable id: "ref_id=12", "image_id=3 (COCO_train2014_000000000003.jpg)"
    reason: str  # "missing image", "corrupt image: ...", "zero-area mask", "empty sentence", ...

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class ImageRecord:
    """An image on disk. ``path`` is absolute; ``depth_path`` is the true depth (.npy, metres, H x W)
    when the dataset has one (the synthetic world does; real COCO does not)."""

    image_id: int
    file_name: str
    path: str
    width: int
    height: int
    source: str  # "coco", "ade20k", "hardblink", "vqa"
    depth_path: str | None = None
    digest: str = ""  # sha256 of the image file's bytes: the key of its depth map and tokens


@dataclass(frozen=True)
class RefRecord:
    """One referring expression of RefCOCO / RefCOCO+ / RefCOCOg with its COCO annotation.

    ``segmentation`` is the COCO annotation's segmentation as stored (polygon list, RLE dict with
    list counts for crowd, or compressed RLE); decode it with ``refer.ann_to_mask``.
    """

    dataset: str  # "refcoco", "refcoco+", "refcocog"
    split_by: str  # "unc", "umd", "google"
    ref_id: int
    sent_id: int
    ann_id: int
    image_id: int
    split: str  # "train", "val", "testA", "testB", "test"
    sentence: str
    category_id: int
    category: str
    bbox: tuple[float, float, float, float]  # x, y, w, h (COCO convention)
    segmentation: Any
    iscrowd: int
    area: float
    attributes: dict[str, Any] = field(default_factory=dict)  # colour, shape, ... where known


@dataclass(frozen=True)
class AdeRecord:
    """One ADE20k (SceneParsing layout) image with its class-index annotation PNG (0 = other)."""

    image_id: int
    image_path: str
    annotation_path: str
    split: str  # "training" or "validation"
    present_classes: tuple[int, ...]  # class indices present in the annotation, 0 excluded
    width: int
    height: int
    depth_path: str | None = None


@dataclass(frozen=True)
class HardBlinkRecord:
    """A HardBLINK-style relative-depth question (SPEC §6): n marked points, one closest to camera."""

    qid: str
    image_path: str
    n_points: int
    points: tuple[tuple[float, float], ...]  # (x, y) pixel centres, in label order
    labels: tuple[str, ...]  # "A", "B", ...
    question: str
    answer: str  # "(A)"
    split: str = "test"
    source_image_id: int | None = None  # the world image it was drawn on, when known


@dataclass(frozen=True)
class VqaRecord:
    """A multiple-choice VQA question (MMBench-style)."""

    qid: str
    image_path: str
    question: str
    options: dict[str, str]  # {"A": "...", "B": "...", ...}
    answer: str  # the option letter
    hint: str = ""
    category: str = ""
    split: str = "test"


@dataclass
class Sources:
    """Everything the ``sources`` stage resolved: records per dataset plus the quarantine."""

    root: str
    coco_images: dict[int, ImageRecord] = field(default_factory=dict)
    refs: list[RefRecord] = field(default_factory=list)
    ade: list[AdeRecord] = field(default_factory=list)
    hardblink: list[HardBlinkRecord] = field(default_factory=list)
    vqa: list[VqaRecord] = field(default_factory=list)
    captions: list[tuple[int, str]] = field(default_factory=list)  # (image_id, caption)
    quarantine: list[QuarantineEntry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        by_dataset: dict[str, int] = {}
        for r in self.refs:
            by_dataset[r.dataset] = by_dataset.get(r.dataset, 0) + 1
        return {
            "coco_images": len(self.coco_images),
            **{f"refs.{k}": v for k, v in sorted(by_dataset.items())},
            "ade20k": len(self.ade),
            "hardblink": len(self.hardblink),
            "vqa": len(self.vqa),
            "captions": len(self.captions),
            "quarantined": len(self.quarantine),
        }
