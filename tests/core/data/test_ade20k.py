"""read_ade20k on the world's ADEChallengeData2016 tree, and its quarantine of bad records."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from perceptio_core.data.ade20k import read_ade20k, read_object_info
from perceptio_core.data.records import DatasetNotFoundError


def test_world_ade(tiny_world):
    res = read_ade20k(tiny_world / "ADEChallengeData2016", depth_dir=tiny_world / "depth")
    assert res.quarantine == []
    assert res.classes == {1: "wall", 2: "sky", 3: "floor", 4: "ball", 5: "box", 6: "cylinder", 7: "cone"}
    assert [r.split for r in res.records].count("validation") == 2 and len(res.records) == 8
    for r in res.records:
        ann = np.asarray(Image.open(r.annotation_path))
        assert r.present_classes == tuple(int(v) for v in np.unique(ann) if v)
        assert 3 in r.present_classes  # the floor is always there
        assert r.depth_path and len(r.digest) == 64
        assert r.image_record().source == "ade20k"
    assert res.records[0].image_id == 1


@pytest.fixture()
def ade_copy(tiny_world, tmp_path):
    dst = tmp_path / "ADEChallengeData2016"
    shutil.copytree(tiny_world / "ADEChallengeData2016", dst)
    return dst


def test_bad_ade_records(ade_copy):
    tr_img, tr_ann = ade_copy / "images" / "training", ade_copy / "annotations" / "training"
    (tr_ann / "ADE_train_00000001.png").unlink()
    Image.open(tr_img / "ADE_train_00000002.jpg").save(tr_ann / "ADE_train_00000002.png")  # RGB
    Image.new("L", (10, 10)).save(tr_ann / "ADE_train_00000003.png")
    data = (tr_img / "ADE_train_00000004.jpg").read_bytes()
    (tr_img / "ADE_train_00000004.jpg").write_bytes(data[:200])
    Image.fromarray(np.full((48, 64), 200, np.uint8)).save(tr_ann / "ADE_train_00000005.png")
    res = read_ade20k(ade_copy)
    reasons = {q.record: q.reason for q in res.quarantine}
    assert reasons.pop("training/ADE_train_00000004.jpg").startswith("corrupt image: ")
    assert reasons == {
        "training/ADE_train_00000001.jpg": "missing annotation",
        "training/ADE_train_00000002.jpg":
            "malformed record: annotation is RGB, not single-channel class indices",
        "training/ADE_train_00000003.jpg": "image size mismatch: annotation 10x10, image 64x48",
        "training/ADE_train_00000005.jpg":
            "malformed record: class index 200 beyond the class table (max 7)",
    }
    assert len(res.records) == 3


def test_class_table_txt_and_missing(ade_copy):
    csv_path = ade_copy / "objectInfo150.csv"
    rows = csv_path.read_text().splitlines()
    (ade_copy / "objectInfo150.txt").write_text("\n".join(r.replace(",", "\t") for r in rows) + "\n")
    csv_path.unlink()
    assert read_object_info(ade_copy)[3] == "floor"
    (ade_copy / "objectInfo150.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="objectInfo150.csv"):
        read_ade20k(ade_copy)
