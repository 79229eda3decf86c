"""read_hardblink on AURORA's public layout (no points) and on the world's (points attached, the
answer is the point of least true depth); bad lines are quarantined and named by file and line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from perceptio_core.data.hardblink import answer_letter, dataset_files, option_labels, read_hardblink
from perceptio_core.data.records import DatasetNotFoundError
from perceptio_core.format.prompts import HARDBLINK_QUESTION

Q3 = "questions/blink_3pointscenter_questions.jsonl"
A3 = "answers/blink_3pointscenter_answers.jsonl"
P3 = "points/blink_3pointscenter_points.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_public_layout_reads_without_quarantine(public_hardblink):
    res = read_hardblink(public_hardblink)
    assert res.quarantine == []
    assert [r.n_points for r in res.records] == [3] * 3 + [4] * 3 + [5] * 3
    for r in res.records:
        n, qid = r.n_points, int(r.qid.split("/")[1])
        assert r.qid == f"{n}pt/{qid}" and r.points == () and r.depth_path is None
        assert r.labels == tuple("ABCDE"[:n]) and r.answer == f"({'ABC'[qid]})"  # the fixture's answers
        assert r.question.startswith(HARDBLINK_QUESTION) and f"({r.labels[-1]})" in r.question
        assert Path(r.image_path) == (public_hardblink / "images" / f"blink{n}pointscenter" / f"{qid}.png").resolve()
    assert [p.relative_to(public_hardblink).as_posix() for p in dataset_files(public_hardblink)] == [
        f"{kind}/blink_{n}pointscenter_{kind}.jsonl" for n in (3, 4, 5) for kind in ("questions", "answers")]


def test_world_hardblink_has_points_and_the_nearest_answer(tiny_world):
    res = read_hardblink(tiny_world / "HardBLINK", depth_dir=tiny_world / "depth")
    assert res.quarantine == [] and len(res.records) == 6
    for r in res.records:
        assert r.question.startswith(HARDBLINK_QUESTION) and r.n_points in (3, 4, 5)
        assert r.labels == tuple("ABCDE"[: r.n_points]) and len(r.points) == r.n_points
        depth = np.load(r.depth_path)
        at = [depth[int(y), int(x)] for x, y in r.points]
        assert r.answer == f"({r.labels[int(np.argmin(at))]})"


def test_world_without_its_points_file_reads_as_the_public_set(tiny_world, tmp_path):
    dst = tmp_path / "HardBLINK"
    shutil.copytree(tiny_world / "HardBLINK", dst)
    with_points = read_hardblink(dst).records
    shutil.rmtree(dst / "points")
    res = read_hardblink(dst)
    assert res.quarantine == [] and all(r.points == () for r in res.records)
    assert res.records == [dataclasses.replace(r, points=()) for r in with_points]


def test_bad_public_records_are_quarantined_and_named(public_hardblink, tmp_path):
    dst = tmp_path / "hardblink"
    shutil.copytree(public_hardblink, dst)
    qs = _rows(dst / Q3)
    extra = dict(qs[0], question_id=7, image="7.png")  # no image file
    wrong_opts = dict(qs[0], question_id=8, text=HARDBLINK_QUESTION + "\n(A) A\n(B) B")
    no_answer = dict(qs[0], question_id=9)
    _write(dst / Q3, [qs[0], "{not json", qs[1], qs[2], extra, dict(qs[1]), {"question_id": 10, "image": "0.png"},
                      wrong_opts, no_answer])
    ans = _rows(dst / A3)
    _write(dst / A3, [ans[0], dict(ans[1], text="maybe B"), dict(ans[2], text="(D)"), {"question_id": 7, "text": "A"},
                      {"question_id": 8, "text": "(A)"}, {"question_id": 42, "text": "(A)"}])
    res = read_hardblink(dst)
    got = [(q.source, q.record, q.reason) for q in res.quarantine]
    assert got == [
        ("hardblink", f"{Q3}:2", "malformed record: not JSON (Expecting property name enclosed in double quotes)"),
        ("hardblink", f"{Q3}:7 question_id=10", "malformed record: missing key(s) text"),
        ("hardblink", f"{Q3}:6 question_id=1",
         f"malformed record: question_id repeated in the questions (first at {Q3}:3)"),
        ("hardblink", f"{A3}:6 question_id=42", f"malformed record: an answer without a question in {Q3}"),
        ("hardblink", f"{A3}:2 question_id=1", "malformed record: answer 'maybe B' is not one of the options A, B, C"),
        ("hardblink", f"{A3}:3 question_id=2", "malformed record: answer '(D)' is not one of the options A, B, C"),
        ("hardblink", f"{Q3}:5 question_id=7 (7.png)", "missing image"),
        ("hardblink", f"{Q3}:8 question_id=8 (0.png)",
         "malformed record: the text offers 2 options (A, B) for 3 points"),
        ("hardblink", f"{Q3}:9 question_id=9 (0.png)", f"malformed record: no answer in {A3}"),
    ]
    # the rest is read: question 0 of the 3-point file and every 4- and 5-point question
    assert [r.qid for r in res.records] == ["3pt/0"] + [f"{n}pt/{i}" for n in (4, 5) for i in range(3)]


def test_bad_points_rows_are_quarantined(tiny_world, tmp_path):
    dst = tmp_path / "HardBLINK"
    shutil.copytree(tiny_world / "HardBLINK", dst)
    pts = _rows(dst / P3)
    _write(dst / P3, [dict(pts[0], points=[[500, 5]] + pts[0]["points"][1:]), {"question_id": 5, "points": [],
                                                                               "labels": []}])
    res = read_hardblink(dst)
    assert [(q.record, q.reason) for q in res.quarantine] == [
        (f"{P3}:2 question_id=5", f"malformed record: a points row without a question in {Q3}"),
        (f"{P3}:1 question_id=0", "malformed record: a point lies outside the 64x48 image"),
        (f"{Q3}:2 question_id=1 (hardblink_3pt_0001.png)", f"malformed record: no row in {P3}"),
    ]
    assert sorted(r.qid for r in res.records) == ["4pt/0", "4pt/1", "5pt/0", "5pt/1"]


def test_question_ids_match_as_text_and_bare_letters_are_normalised(public_hardblink, tmp_path):
    dst = tmp_path / "hardblink"
    shutil.copytree(public_hardblink, dst)
    _write(dst / A3, [{"question_id": str(a["question_id"]), "text": a["text"].strip("()")}
                      for a in _rows(dst / A3)])
    res = read_hardblink(dst)
    assert res.quarantine == [] and [r.answer for r in res.records[:3]] == ["(A)", "(B)", "(C)"]


def test_options_and_letters():
    assert option_labels("Which is closest?\n(A) A\n(B) B\n(C) C", 3) == ("A", "B", "C")
    assert option_labels("Which is closest? (C) or (A) or (B)", 3) == ("A", "B", "C")
    assert option_labels(HARDBLINK_QUESTION, 4) == ("A", "B", "C", "D")  # no options listed: N letters
    assert [answer_letter(a) for a in ("(B)", "B", " ( c ) ", "(B) or (C)", "", "BB")] == ["B", "B", "C", None,
                                                                                             None, None]


def test_missing_dataset_parts_raise(public_hardblink, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"blink_\{3,4,5\}pointscenter_questions.jsonl"):
        read_hardblink(tmp_path)
    dst = tmp_path / "hardblink"
    shutil.copytree(public_hardblink, dst)
    (dst / "answers" / "blink_4pointscenter_answers.jsonl").unlink()
    with pytest.raises(DatasetNotFoundError, match="blink_4pointscenter_answers.jsonl"):
        read_hardblink(dst)
    shutil.rmtree(dst / "images" / "blink3pointscenter")
    with pytest.raises(DatasetNotFoundError, match="blink3pointscenter"):
        read_hardblink(dst)
