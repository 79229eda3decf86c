"""read_mmbench_tsv: the world's TSV and hand-written MMBench rows, good and bad."""

from __future__ import annotations

import base64
import csv
import io

import numpy as np
from PIL import Image

from perceptio_core.data.vqa import options_text, read_mmbench_tsv


def test_world_vqa(tiny_world, tmp_path):
    cache = tmp_path / "cache"
    res = read_mmbench_tsv(tiny_world / "vqa" / "mmbench_world.tsv", cache)
    assert res.quarantine == [] and len(res.records) == 12
    for r in res.records:
        assert r.answer in r.options and 2 <= len(r.options) <= 4
        assert Image.open(r.image_path).size == (64, 48)
        assert r.split in ("train", "dev") and r.hint == ""
    files = sorted(cache.iterdir())
    assert files and all(p.suffix == ".jpg" for p in files)
    again = read_mmbench_tsv(tiny_world / "vqa" / "mmbench_world.tsv", cache)
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
    res = read_mmbench_tsv(tsv, tmp_path / "imgs")
    assert [r.qid for r in res.records] == ["1", "2"]
    r1, r2 = res.records
    assert r1.options == {"A": "cat", "B": "dog"} and r1.hint == "" and r1.split == "dev"
    assert r2.image_path == r1.image_path and r2.question == "Same image?\twith tab"
    assert options_text(r1) == "A. cat\nB. dog"
    reasons = {q.record: q.reason for q in res.quarantine}
    assert reasons["index=3"].startswith("corrupt image: not base64")
    assert reasons["index=7"].startswith("corrupt image: ")
    assert reasons["index=4"] == "malformed record: answer 'D' is not one of the options ['A', 'B']"
    assert reasons["index=5"] == "malformed record: 1 option(s), at least 2 needed"
    assert reasons["index=6"] == "missing image"
