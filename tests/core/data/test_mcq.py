"""read_mcq_tsv: the world's TSV and hand-written rows of VLMEvalKit's MCQ layouts, good and bad."""

from __future__ import annotations

import base64
import csv
import io

import numpy as np
from PIL import Image

from perceptio_core.data.mcq import options_text, read_mcq_tsv


def test_world_mcq(tiny_world, tmp_path):
    cache = tmp_path / "cache"
    res = read_mcq_tsv(tiny_world / "vqa" / "mmbench_world.tsv", cache)
    assert res.quarantine == [] and len(res.records) == 12
    for r in res.records:
        assert r.answer in r.options and 2 <= len(r.options) <= 4
        assert Image.open(r.image_path).size == (64, 48)
        assert r.split in ("train", "dev") and r.hint == "" and r.benchmark == "mmbench"
    files = sorted(cache.iterdir())
    assert files and all(p.suffix == ".jpg" for p in files)
    again = read_mcq_tsv(tiny_world / "vqa" / "mmbench_world.tsv", cache)
    assert again == res and sorted(cache.iterdir()) == files  # content-addressed: nothing new


def _b64_png() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_rows(tmp_path):
    img = _b64_png()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
              "source", "l2-category", "comment", "split"]
    rows = [
        ["1", "What is it?", "nan", "cat", "dog", "nan", "nan", "B", "x", img, "s", "l2", "nan", "dev"],
        ["2", "Same image?\twith tab", "a hint", "yes", "no", "", "", "A", "x", "1", "s", "", "", "dev"],
        ["3", "Broken image?", "", "a", "b", "c", "d", "C", "x", "!!notbase64!!" * 10, "", "", "", ""],
        ["4", "Bad answer?", "", "a", "b", "", "", "D", "x", img, "", "", "", ""],
        ["5", "One option?", "", "a", "", "", "", "A", "x", img, "", "", "", ""],
        ["6", "Dangling ref?", "", "a", "b", "", "", "A", "x", "77", "", "", "", ""],
        ["7", "Not an image?", "", "a", "b", "", "", "A", "x", base64.b64encode(b"hello" * 20).decode(),
         "", "", "", ""],
    ]
    tsv = tmp_path / "mmbench.tsv"
    with open(tsv, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    res = read_mcq_tsv(tsv, tmp_path / "imgs")
    assert [r.qid for r in res.records] == ["1", "2"]
    r1, r2 = res.records
    assert r1.options == {"A": "cat", "B": "dog"} and r1.hint == "" and r1.split == "dev"
    assert r2.image_path == r1.image_path and r2.question == "Same image?\twith tab"
    assert options_text(r1) == "A. cat\nB. dog"
    reasons = {q.record.split(" ")[0]: q.reason for q in res.quarantine}
    assert res.quarantine[0].record == "index=3 (mmbench.tsv line 4)"  # names the file and line
    assert reasons["index=3"].startswith("corrupt image: not base64")
    assert reasons["index=7"].startswith("corrupt image: ")
    assert reasons["index=4"] == "malformed record: answer 'D' is not one of the options ['A', 'B']"
    assert reasons["index=5"] == "malformed record: 1 option(s), at least 2 needed"
    assert reasons["index=6"] == "missing image"
    assert {q.source for q in res.quarantine} == {"mcq.mmbench"}


def _write_tsv(path, header, rows, encoding="utf-8"):
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding, errors="surrogateescape"))


def test_seedbench_scienceqa_and_mmstar_layouts(tmp_path):
    """SEED-Bench's TSV (no hint column, 4 options), ScienceQA's (an E column, empty where a
    question has fewer options) and MMStar's (its own categories and an extra column) all read."""
    img = _b64_png()
    seed = tmp_path / "SEEDBench_IMG.tsv"
    _write_tsv(seed, ["index", "question", "A", "B", "C", "D", "answer", "category", "image"],
               [["10", "How many towels are in the image?", "One", "Two", "Three", "Four", "A", "Instances Counting", img]])
    sqa = tmp_path / "ScienceQA_TEST.tsv"
    _write_tsv(sqa, ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "image", "split"],
               [["1", "Which is a mammal?", "Look.", "whale", "shark", "", "", "", "A", "biology", img, "test"],
                ["2", "Pick one.", "", "a", "b", "c", "d", "e", "E", "physics", img, "test"]])
    star = tmp_path / "MMStar.tsv"
    _write_tsv(star, ["index", "question", "A", "B", "C", "D", "answer", "category", "l2_category", "image",
                      "bench"],
               [["0", "Which option describes the object relationship?", "a", "b", "c", "d", "C",
                 "coarse perception", "image scene and topic", img, "MMBench"]])
    r_seed = read_mcq_tsv(seed, tmp_path / "imgs", benchmark="seedbench")
    r_sqa = read_mcq_tsv(sqa, tmp_path / "imgs", benchmark="scienceqa")
    r_star = read_mcq_tsv(star, tmp_path / "imgs", benchmark="mmstar")
    assert (r_seed.quarantine, r_sqa.quarantine, r_star.quarantine) == ([], [], [])
    (s1,) = r_seed.records
    assert s1.options == {"A": "One", "B": "Two", "C": "Three", "D": "Four"} and s1.hint == "" and s1.split == "test"
    assert s1.benchmark == "seedbench" and s1.category == "Instances Counting"
    q1, q2 = r_sqa.records
    assert q1.options == {"A": "whale", "B": "shark"} and q1.hint == "Look."
    assert sorted(q2.options) == list("ABCDE") and q2.answer == "E"
    assert r_star.records[0].category == "coarse perception" and r_star.records[0].answer == "C"


def test_bytes_that_are_not_utf8_quarantine_their_row_only(tmp_path):
    img = _b64_png()
    tsv = tmp_path / "bad.tsv"
    _write_tsv(tsv, ["index", "question", "A", "B", "answer", "image"],
               [["1", "Good?", "yes", "no", "A", img], ["2", "Bad \udcff byte?", "yes", "no", "A", img],
                ["3", "Also good?", "yes", "no", "B", img]])
    res = read_mcq_tsv(tsv, tmp_path / "imgs", benchmark="x")
    assert [r.qid for r in res.records] == ["1", "3"]
    assert [(q.source, q.record, q.reason) for q in res.quarantine] == [
        ("mcq.x", "index=2 (bad.tsv line 3)", "malformed record: not UTF-8 text")]
