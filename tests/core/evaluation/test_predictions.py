"""The prediction cache believes nothing it has not checked: a chunk edited, truncated or with its
maps swapped is moved aside and its predictions are generated again (issue 19)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from perceptio_core.evaluation.predictions import QUARANTINE, PredictionCache


def _pred(text, depth=None, mask=None):
    return SimpleNamespace(text=text, raw_text=f"raw {text}", status="ok", depth_indices=[1, 2, 3],
                           mask=mask, depth_map=depth, error=None)


def _fill(folder):
    c = PredictionCache(folder)
    c.put([("k1", _pred("yes", depth=np.full((4, 4), 2.5, np.float32), mask=np.eye(4, dtype=bool))),
           ("k2", _pred("no"))])
    c.put([("k3", _pred("(B)"))])
    return sorted(folder.glob("chunk-*.json"))


def test_round_trip_of_a_whole_cache(tmp_path):
    _fill(tmp_path)
    c = PredictionCache(tmp_path)
    assert len(c) == 3 and c.damaged == []
    got = c.get("k1")
    assert got.text == "yes" and got.raw_text == "raw yes" and got.depth_indices == [1, 2, 3]
    assert np.array_equal(got.mask, np.eye(4, dtype=bool))
    assert np.allclose(got.depth_map, 2.5)


@pytest.mark.parametrize("damage", ["edit_text", "swap_npz", "delete_npz", "truncate_json"])
def test_a_damaged_chunk_is_moved_aside_and_the_rest_is_kept(tmp_path, damage):
    first, second = _fill(tmp_path)
    if damage == "edit_text":
        data = json.loads(first.read_text())
        data["predictions"][0]["text"] = "no"
        first.write_text(json.dumps(data))
    elif damage == "swap_npz":
        np.savez(first.with_suffix(".npz"), m0=np.zeros((4, 4), np.float16))
    elif damage == "delete_npz":
        first.with_suffix(".npz").unlink()
    elif damage == "truncate_json":
        first.write_text(first.read_text()[:40])
    c = PredictionCache(tmp_path)
    assert "k1" not in c and "k2" not in c  # generated again
    assert c.get("k3").text == "(B)"  # the whole chunk is kept
    assert [name for name, _ in c.damaged] == [first.name]
    assert (tmp_path / QUARANTINE / first.name).exists()
    assert not first.exists()
