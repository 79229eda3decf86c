"""read_mme: MME's release layout (flat and images/ + questions_answers_YN/ subtasks, the nested copy),
the world's MME, and bad records quarantined one by one."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from perceptio_core.data.mme import group_of, mme_files, read_mme
from perceptio_core.data.records import DatasetNotFoundError


def _jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(path)


def _release(root):
    """A miniature of MME_Benchmark_release_version as published: ``existence`` and
    ``code_reasoning`` flat (image and .txt side by side), ``artwork`` split into ``images/`` and
    ``questions_answers_YN/``; the questions verbatim in MME's style."""
    _jpg(root / "existence" / "000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    _jpg(root / "code_reasoning" / "0001.png")
    (root / "code_reasoning" / "0001.txt").write_text(
        "The image shows a python code. Is the output of the code 'Hello'? Please answer yes or no.\tYes\n"
        "The image shows a python code. Is the output of the code 'World'? Please answer yes or no.\tNo\n\n")
    _jpg(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\r\n"
        "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\r\n")


def test_public_layout_reads_without_quarantine(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    _release(root)
    res = read_mme(root)
    assert res.quarantine == []
    assert [(r.subtask, r.image_key, r.answer) for r in res.records] == [
        ("artwork", "artwork/10002", "Yes"), ("artwork", "artwork/10002", "No"),
        ("code_reasoning", "code_reasoning/0001", "Yes"), ("code_reasoning", "code_reasoning/0001", "No"),
        ("existence", "existence/000000006040", "Yes"), ("existence", "existence/000000006040", "No")]
    art = res.records[0]
    assert art.question == "Does this artwork exist in the form of painting? Please answer yes or no."
    assert art.image_path == str((root / "artwork" / "images" / "10002.jpg").resolve())
    assert art.qid == "artwork/10002/1"
    assert res.records[2].image_path.endswith("0001.png")
    assert [group_of(t) for t in ("existence", "artwork", "code_reasoning", "mine")] == [
        "perception", "perception", "cognition", "other"]
    assert [p.name for p in mme_files(root)] == ["10002.txt", "0001.txt", "000000006040.txt"]


def test_a_nested_copy_reads_and_an_empty_folder_is_named(tmp_path):
    _release(tmp_path / "MME" / "MME_Benchmark")
    assert len(read_mme(tmp_path / "MME").records) == 6
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="holds no subtask folder"):
        read_mme(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="MME folder not found"):
        read_mme(tmp_path / "nowhere")


def test_bad_records_are_quarantined_and_the_rest_goes_on(tmp_path):
    root = tmp_path / "mme"
    _release(root)
    count = root / "count"
    _jpg(count / "a.jpg")
    (count / "a.txt").write_text("How many? Please answer yes or no.\tMaybe\nNo tab here\n\tYes\nFine? Yes or no.\tno\n")
    (count / "b.txt").write_text("Is there an image?\tYes\n")  # no b.jpg
    (count / "c.jpg").write_bytes(b"not a jpeg")
    (count / "c.txt").write_text("Corrupt?\tYes\n")
    _jpg(count / "d.jpg")
    (count / "d.txt").write_bytes(b"Caf\xe9?\tYes\n")
    res = read_mme(root)
    reasons = {q.record: q.reason for q in res.quarantine}
    assert reasons["count/a.txt:1"] == "malformed record: answer 'Maybe' is not Yes or No"
    assert reasons["count/a.txt:2"] == "malformed record: no tab between question and answer"
    assert reasons["count/a.txt:3"] == "malformed record: empty question"
    assert reasons["count/b"] == "missing image"
    assert reasons["count/c"].startswith("corrupt image")
    assert reasons["count/d.txt"].startswith("malformed record: not UTF-8 text")
    assert {q.source for q in res.quarantine} == {"mme"}
    kept = [r for r in res.records if r.subtask == "count"]
    assert [(r.qid, r.answer) for r in kept] == [("count/a/4", "No")]
    assert len(res.records) == 7


def test_the_world_writes_mme_in_the_release_layout(tiny_world):
    res = read_mme(tiny_world / "MME_Benchmark_release_version")
    assert res.quarantine == []
    by_task: dict[str, list[str]] = {}
    for r in res.records:
        by_task.setdefault(r.subtask, []).append(r.answer)
    assert sorted(by_task) == ["color", "count", "existence", "position"]
    assert all(v == ["Yes", "No"] * 2 for v in by_task.values())  # 2 images, a Yes and a No each
    assert all(r.question.endswith("Please answer yes or no.") for r in res.records)
