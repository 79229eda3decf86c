"""read_hardblink on the world's set: the answer is the point of least true depth; bad records
are quarantined."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from perceptio_core.data.hardblink import read_hardblink
from perceptio_core.data.records import DatasetNotFoundError
from perceptio_core.format.prompts import HARDBLINK_QUESTION


def test_world_hardblink(tiny_world):
    res = read_hardblink(tiny_world / "HardBLINK", depth_dir=tiny_world / "depth")
    assert res.quarantine == [] and len(res.records) == 6
    for r in res.records:
        assert r.question == HARDBLINK_QUESTION and r.n_points in (3, 4, 5)
        depth = np.load(r.depth_path)
        at = [depth[int(y), int(x)] for x, y in r.points]
        assert r.answer == f"({r.labels[int(np.argmin(at))]})"


def test_bad_hardblink_records(tiny_world, tmp_path):
    dst = tmp_path / "HardBLINK"
    shutil.copytree(tiny_world / "HardBLINK", dst)
    recs = json.loads((dst / "annotations.json").read_text())
    recs[0]["answer"] = "(Z)"
    recs[1]["points"][0] = [500, 5]
    recs[2]["image"] = "images/absent.png"
    recs[3]["n_points"] = 9
    recs[4]["answer"] = "B"  # a bare letter is fine
    del recs[5]["question"]
    (dst / "annotations.json").write_text(json.dumps(recs))
    res = read_hardblink(dst)
    reasons = [q.reason for q in res.quarantine]
    assert reasons == [
        "malformed record: answer '(Z)' names none of the labels ['A', 'B', 'C']",
        "malformed record: a point lies outside the 64x48 image",
        "missing image",
        f"malformed record: n_points=9 but {len(recs[3]['points'])} points",
        "malformed record: missing key(s) question",
    ]
    assert [r.answer for r in res.records] == ["(B)"]


def test_missing_annotations(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="annotations.json"):
        read_hardblink(tmp_path)
