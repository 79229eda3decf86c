"""Hostile input to the dataset readers (issue 19): every record-level fault is quarantined with the
file and the record named and a reason in words, and the rest is read; a file-level fault sets that
file aside as a whole and the other datasets are read. Fixtures are built here, in the published
layouts (REFER, ADE20k SceneParsing, AURORA's HardBLINK, VLMEvalKit TSV, MME)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio_core.config import DataConfig
from perceptio_core.data.ade20k import read_ade20k
from perceptio_core.data.hardblink import read_hardblink
from perceptio_core.data.limits import MAX_SENTENCE_CHARS
from perceptio_core.data.mcq import read_mcq_tsv
from perceptio_core.data.mme import mme_files, read_mme
from perceptio_core.data.refer import read_refer
from perceptio_core.data.sources import read_training_sources

TRAINING_ONLY = dict(refer_datasets=["refcoco"], ade20k="", hardblink="", mcq={}, mme="", captions="",
                     llava_json=None, glamm_json=None)
SQUARE = [[1, 1, 5, 1, 5, 4, 1, 4]]


def _jpeg(path: Path, seed: int, size=(40, 30)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_declaring(path: Path, width: int, height: int, mode_byte: int = 0) -> None:
    """A valid-looking PNG header declaring ``width`` x ``height`` grey pixels with a tiny IDAT:
    what a decompression bomb looks like before it is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _sent(sid, text) -> dict:
    return {"tokens": text.split() if isinstance(text, str) else [], "raw": text, "sent_id": sid, "sent": text}


def _ref(ref_id, ann_id: int, image_id: int, sents: list, split: str = "train") -> dict:
    return {"sent_ids": [0], "ann_id": ann_id, "ref_id": ref_id, "file_name": f"x_{ann_id}.jpg",
            "image_id": image_id, "split": split, "sentences": sents, "category_id": 1}


def _ann(ann_id: int, image_id: int, **over) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": SQUARE, "area": 12.0,
            "bbox": [1, 1, 4, 3], "iscrowd": 0, **over}


def _refer_tree(root: Path, images: dict[int, str], anns: list[dict], refs: list | bytes,
                dataset: str = "refcoco") -> Path:
    """``root/<dataset>/{instances.json, refs(unc).p}`` on ``root/images`` (image 1 a real JPEG)."""
    imgs = root / "images"
    imgs.mkdir(parents=True, exist_ok=True)
    if not (imgs / "good.jpg").exists():
        _jpeg(imgs / "good.jpg", 1)
    tree = root / dataset
    tree.mkdir(parents=True)
    instances = {"images": [{"id": i, "file_name": n, "width": 40, "height": 30} for i, n in images.items()],
                 "annotations": anns, "categories": [{"id": 1, "name": "ball"}]}
    (tree / "instances.json").write_text(json.dumps(instances))
    data = refs if isinstance(refs, bytes) else pickle.dumps(refs, protocol=2)
    (tree / "refs(unc).p").write_bytes(data)
    return tree


def _read(root: Path, **cfg):
    return read_training_sources(root, DataConfig(**{**TRAINING_ONLY, "coco_images": "images", **cfg}))


def _no_memory_address(entries) -> None:
    for q in entries:
        assert " at 0x" not in q.reason and "object at" not in q.reason, q.reason


# 1 ------------------------------------------------------------------------------------------------


def test_ade_annotation_bomb_is_quarantined_before_decoding(tmp_path):
    """Before: PIL's DecompressionBombError (not an OSError) escaped read_ade20k and stopped the run.
    Now the annotation's declared size is compared with the image's before anything is decoded, and
    an image that declares more than MAX_IMAGE_PIXELS is quarantined as too large."""
    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images" / "training").mkdir(parents=True)
    (ade / "annotations" / "training").mkdir(parents=True)
    (ade / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n2,0.1,1,1,floor\n")
    for k in (1, 2, 3, 5):
        _jpeg(ade / "images" / "training" / f"ADE_train_{k:08d}.jpg", k, (32, 32))
    _png_declaring(ade / "annotations" / "training" / "ADE_train_00000005.png", 8000, 8000)
    Image.fromarray(np.ones((32, 32), np.uint8)).save(ade / "annotations" / "training" / "ADE_train_00000001.png")
    _png_declaring(ade / "annotations" / "training" / "ADE_train_00000002.png", 200_000, 200_000)
    _png_declaring(ade / "images" / "training" / "ADE_train_00000004.png", 9000, 9000)  # under PIL's limit
    Image.fromarray(np.ones((32, 32), np.uint8)).save(ade / "annotations" / "training" / "ADE_train_00000004.png")
    os.mkfifo(ade / "annotations" / "training" / "ADE_train_00000003.png")
    res = read_ade20k(ade)
    assert [r.image_id for r in res.records] == [1]
    reasons = {q.record: q.reason for q in res.quarantine}
    assert reasons["training/ADE_train_00000002.jpg"].startswith(  # PIL's open refuses it first
        "too large: annotation declares more than 67108864 pixels (MAX_IMAGE_PIXELS; DecompressionBombError")
    assert reasons["training/ADE_train_00000005.jpg"] == \
        "image size mismatch: annotation 8000x8000, image 32x32"  # under PIL's limit: never decoded
    assert reasons["training/ADE_train_00000003.jpg"] == "missing annotation"  # a FIFO is not a file
    assert reasons["training/ADE_train_00000004.png"].startswith(
        "too large: image declares 9000x9000 = 81000000 pixels, at most 67108864 (MAX_IMAGE_PIXELS)")
    assert {q.source for q in res.quarantine} == {"ade20k"}


# 2 ------------------------------------------------------------------------------------------------


def test_refer_file_names_dev_zero_fifo_and_outside_are_quarantined(tmp_path):
    """Before: ``file_name: /dev/zero`` was joined to the image folder (an absolute path wins) and
    read until memory ran out; a FIFO hung. Now names are confined under the image folder and only
    regular files under MAX_IMAGE_BYTES are read."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    os.mkfifo(root / "images" / "fifo.jpg")
    os.symlink("/dev/zero", root / "images" / "zero.jpg")
    _jpeg(tmp_path / "outside.jpg", 3)
    names = {1: "good.jpg", 2: "/dev/zero", 3: "fifo.jpg", 4: "zero.jpg", 5: "../../outside.jpg"}
    anns = [_ann(10 + i, i) for i in names]
    refs = [_ref(i, 10 + i, i, [_sent(i, "a ball")]) for i in names]
    _refer_tree(root, names, anns, refs)
    s = _read(root)
    assert [(r.ref_id, r.sentence) for r in s.refs] == [(1, "a ball")]
    reasons = {q.record.split(" ")[0]: q.reason for q in s.quarantine}
    assert reasons["ref_id=2"].startswith("path outside the data root: file_name '/dev/zero'")
    assert reasons["ref_id=3"] == "corrupt image: not a regular file (a FIFO, a device or a socket)"
    assert reasons["ref_id=4"] == "corrupt image: not a regular file (a FIFO, a device or a socket)"
    assert reasons["ref_id=5"].startswith("path outside the data root")


def test_captions_with_dev_zero_are_quarantined(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    _jpeg(root / "images" / "good.jpg", 1)
    caps = {"images": [{"id": 1, "file_name": "good.jpg"}, {"id": 2, "file_name": "/dev/zero"},
                       {"id": "three", "file_name": "x.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a ball"},
                            {"id": 2, "image_id": 2, "caption": "zeros"},
                            {"id": 3, "image_id": "one", "caption": "bad id"},
                            {"id": 4, "image_id": 1, "caption": ["not", "text"]},
                            {"id": 5, "image_id": 1, "caption": "x" * 5000}]}
    (root / "captions.json").write_text(json.dumps(caps))
    s = _read(root, refer_datasets=[], captions="captions.json")
    assert s.captions == [(1, "a ball")]
    reasons = {q.record: q.reason for q in s.quarantine}
    assert reasons["image #2"] == "malformed record: captions.json: image id is 'three', not an integer"
    assert reasons["image_id=2 (/dev/zero)"].startswith("path outside the data root")
    assert reasons["caption id=3"] == "malformed record: captions.json: caption #2 image_id is 'one', not an integer"
    assert reasons["caption id=4 image_id=1"] == "malformed record: captions.json: caption is a list, not text"
    assert reasons["caption id=5 image_id=1"] == (
        "text too long: captions.json: caption of 5000 characters, at most 4096 (MAX_CAPTION_CHARS)")


# 3 ------------------------------------------------------------------------------------------------


def test_non_numeric_coco_fields_are_quarantined_naming_file_and_record(tmp_path):
    """Before: ``int("yes")``, ``int("tall")``, ``float("a")`` raised a bare ValueError out of
    ``sources``. Now the ref is quarantined, the reason naming instances.json and the field."""
    root = tmp_path / "data"
    names = {1: "good.jpg", 2: "good.jpg", 3: "good.jpg", 4: "good.jpg"}
    anns = [_ann(11, 1), _ann(12, 2, bbox="abc"), _ann(13, 3, iscrowd="yes"), _ann(14, 4)]
    refs = [_ref(i, 10 + i, i, [_sent(i, "a ball")]) for i in names]
    tree = _refer_tree(root, names, anns, refs)
    inst = json.loads((tree / "instances.json").read_text())
    inst["images"][3]["height"] = "tall"
    (tree / "instances.json").write_text(json.dumps(inst))
    s = _read(root)
    assert [r.ref_id for r in s.refs] == [1]
    reasons = {q.record: q.reason for q in s.quarantine}
    assert reasons == {
        "ref_id=2 ann_id=12 image_id=2":
            "malformed record: instances.json: annotation 12 bbox is 'abc', not [x, y, w, h]",
        "ref_id=3 ann_id=13 image_id=3": "malformed record: instances.json: annotation 13 iscrowd is 'yes', not an integer",
        "ref_id=4 ann_id=14 image_id=4": "malformed record: instances.json: image 4 height is 'tall', not an integer",
    }


def _hardblink(tmp_path: Path, points_rows: list[dict]) -> Path:
    hb = tmp_path / "hardblink"
    for sub in ("questions", "answers", "images/blink3pointscenter", "points"):
        (hb / sub).mkdir(parents=True)
    n = len(points_rows)
    for i in range(n):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(hb / "images" / "blink3pointscenter" / f"{i}.png")
    q = [{"question_id": i, "image": f"{i}.png", "text": "Which point is closer? (A) (B) (C)"} for i in range(n)]
    a = [{"question_id": i, "text": "(A)"} for i in range(n)]
    (hb / "questions" / "blink_3pointscenter_questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in q))
    (hb / "answers" / "blink_3pointscenter_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (hb / "points" / "blink_3pointscenter_points.jsonl").write_text(
        "".join(json.dumps({"question_id": i, **r}) + "\n" for i, r in enumerate(points_rows)))
    return hb


def test_hardblink_points_of_the_wrong_type_are_quarantined(tmp_path):
    """Before: ``labels: 5`` raised TypeError out of the reader. Now each bad points row is
    quarantined naming the file, line and question."""
    ok = {"points": [[1, 1], [2, 2], [3, 3]], "labels": ["A", "B", "C"]}
    hb = _hardblink(tmp_path, [ok, {**ok, "points": "a"}, {**ok, "points": [["a", 1], [2, 2], [3, 3]]},
                               {**ok, "labels": 5}, {**ok, "points": [[float("nan"), 1], [2, 2], [3, 3]]}])
    res = read_hardblink(hb)
    assert [r.qid for r in res.records] == ["3pt/0"]
    got = [(q.record, q.reason) for q in res.quarantine]
    not_xy = "malformed record: points is not a list of [x, y] (two finite numbers each)"
    assert got == [
        ("points/blink_3pointscenter_points.jsonl:2 question_id=1", not_xy),
        ("points/blink_3pointscenter_points.jsonl:3 question_id=2", not_xy),
        ("points/blink_3pointscenter_points.jsonl:4 question_id=3",
         "malformed record: points row labels is 5, not a list of letters"),
        ("points/blink_3pointscenter_points.jsonl:5 question_id=4", not_xy),
    ]


def test_hardblink_bad_lines_and_texts_are_quarantined(tmp_path):
    ok = {"points": [[1, 1], [2, 2], [3, 3]], "labels": ["A", "B", "C"]}
    hb = _hardblink(tmp_path, [ok, ok, ok, ok])
    qfile = hb / "questions" / "blink_3pointscenter_questions.jsonl"
    lines = qfile.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"question_id": 1, "image": "1.png", "text": "caf\xff (A) (B) (C)"}\n'  # not UTF-8
    lines[2] = json.dumps({"question_id": 2, "image": "/dev/zero", "text": "(A) (B) (C)"}).encode() + b"\n"
    lines[3] = json.dumps({"question_id": 3, "image": "3.png", "text": ["(A)"]}).encode() + b"\n"
    qfile.write_bytes(b"".join(lines) + b"[" * 100_000 + b"\n")
    res = read_hardblink(hb)
    assert [r.qid for r in res.records] == ["3pt/0"]
    reasons = [q.reason for q in res.quarantine]
    assert reasons[0].startswith("malformed record: not UTF-8 text")
    assert reasons[1] == "malformed record: JSON nested too deep"
    assert any(r.startswith("path outside the data root: image '/dev/zero'") for r in reasons)
    assert "malformed record: text is a list, not text" in reasons


# 4, 5, 6, 7 -----------------------------------------------------------------------------------------


def _with_deep_sentence(refs: list, depth: int) -> bytes:
    """``refs`` pickled (protocol 2) with the string ``"DEEP"`` replaced by a list nested ``depth``
    levels (which ``pickle.dumps`` itself cannot write: it recurses)."""
    data = pickle.dumps(refs, protocol=2)
    marker = b"X" + struct.pack("<I", 4) + b"DEEP"
    assert data.count(marker) == 1
    return data.replace(marker, b"]" * depth + b"a" * (depth - 1))


def test_wrong_types_in_refs_are_quarantined_per_ref_or_sentence(tmp_path):
    """Before: ``tokens: [1, 2, 3]`` raised TypeError (join), ``sent_id: "zero"`` ValueError,
    ``ref_id: inf`` OverflowError, and a sentence nested 200,000 deep RecursionError (``str``).
    Now each is quarantined by itself; nothing is recursed into or printed whole."""
    root = tmp_path / "data"
    refs = [
        _ref(0, 10, 1, [_sent(0, "a red ball"), {"tokens": [1, 2, 3], "raw": "", "sent_id": 1, "sent": ""},
                        {**_sent(2, "x"), "sent_id": "zero"}, {**_sent(3, "x"), "sent": "DEEP"},
                        _sent(4, "the ball on the left")]),
        _ref(float("inf"), 10, 1, [_sent(5, "a ball")]),
        _ref(2, 10, 1, [_sent(6, "x" * 5_000_000)]),
        _ref(3, 10, 1, [_sent(7, "lone \ud800 surrogate")]),
        _ref(4, 10, 1, [_sent(8, "a ball again")], split=["not", "text"]),
    ]
    _refer_tree(root, {1: "good.jpg"}, [_ann(10, 1)], _with_deep_sentence(refs, 200_000))
    s = _read(root)
    assert [(r.ref_id, r.sent_id) for r in s.refs] == [(0, 0), (0, 4)]
    got = {q.record: q.reason for q in s.quarantine}
    assert got == {
        "ref_id=0 sentence #1 (good.jpg)":
            "malformed record: refs(unc).p: ref_id 0 sentence #1: tokens is a list, not a list of words",
        "ref_id=0 sentence #2 (good.jpg)":
            "malformed record: refs(unc).p: ref_id 0 sentence #2: sent_id is 'zero', not an integer",
        "ref_id=0 sentence #3 (good.jpg)": "malformed record: refs(unc).p: ref_id 0 sentence #3: sent is a list, not text",
        "ref #1": "malformed record: refs(unc).p: ref #1 ref_id is inf, not an integer",
        "ref_id=2 sentence #0 (good.jpg)":
            f"text too long: sentence of 5000000 characters, at most {MAX_SENTENCE_CHARS} (MAX_SENTENCE_CHARS)",
        "ref_id=3 sentence #0 (good.jpg)": "invalid text: sentence holds a lone surrogate or bytes that are not UTF-8",
        "ref_id=4 ann_id=10 image_id=1": "malformed record: refs(unc).p: ref_id 4 split is a list, not text",
    }
    json.loads(s.to_json())  # what the sources stage writes: encodable


def test_a_repeated_ref_and_sent_id_keeps_the_first(tmp_path):
    """Before: both went through and the tar writer downstream failed on the repeated key."""
    root = tmp_path / "data"
    refs = [_ref(0, 10, 1, [_sent(0, "a red ball"), _sent(0, "the same id again")]),
            _ref(0, 10, 1, [_sent(0, "a third time"), _sent(1, "another sentence")])]
    _refer_tree(root, {1: "good.jpg"}, [_ann(10, 1)], refs)
    s = _read(root)
    assert [(r.ref_id, r.sent_id, r.sentence) for r in s.refs] == [(0, 0, "a red ball"), (0, 1, "another sentence")]
    assert [(q.record, q.reason.split(" (")[0]) for q in s.quarantine] == [
        ("ref_id=0 sent_id=0 (good.jpg)", "duplicate record: refs(unc).p repeats ref_id 0 sent_id 0"),
        ("ref_id=0 sent_id=0 (good.jpg)", "duplicate record: refs(unc).p repeats ref_id 0 sent_id 0"),
    ]


# 8 ------------------------------------------------------------------------------------------------


def _py2_refs(refs_repr: list[tuple[int, bytes]]) -> bytes:
    """A Python 2 protocol-0 refs pickle (byte strings as ``S'...'``): one ref per (ref_id, sentence)."""
    def s(b: bytes) -> bytes:
        return b"S'" + "".join(chr(c) if 32 <= c < 127 and c not in (39, 92) else f"\\x{c:02x}"
                               for c in b).encode("ascii") + b"'\n"
    out = [b"(l"]
    for ref_id, sent in refs_repr:
        out += [b"(d", s(b"ref_id"), b"I%d\n" % ref_id, b"s", s(b"ann_id"), b"I10\n", b"s", s(b"image_id"),
                b"I1\n", b"s", s(b"split"), s(b"train"), b"s", s(b"sentences"), b"(l(d", s(b"sent_id"),
                b"I%d\n" % ref_id, b"s", s(b"sent"), s(sent), b"sa", b"s", b"a"]
    return b"".join(out) + b"."


def test_one_bad_byte_in_a_python2_pickle_spoils_only_its_record(tmp_path):
    """Before: one string that was not UTF-8 made the loader decode the whole file as Latin-1 (every
    "café" became "cafÃ©"). Now each string is decoded on its own; only the bad one is quarantined."""
    root = tmp_path / "data"
    data = _py2_refs([(0, b"the caf\xc3\xa9 ball"), (1, b"a bad \xff byte"), (2, b"na\xc3\xafve ball")])
    _refer_tree(root, {1: "good.jpg"}, [_ann(10, 1)], data)
    s = _read(root)
    assert [(r.ref_id, r.sentence) for r in s.refs] == [(0, "the café ball"), (2, "naïve ball")]
    assert [(q.record, q.reason) for q in s.quarantine] == [
        ("ref_id=1 sentence #0 (good.jpg)", "invalid text: sentence holds a lone surrogate or bytes that are not UTF-8")]


# 9 ------------------------------------------------------------------------------------------------


def test_a_code_running_refs_pickle_sets_its_dataset_aside_and_the_others_go_on(tmp_path):
    """Before: the refused pickle's UnsafePickleError stopped the whole ``sources`` stage. Now the
    refs file is quarantined as one entry (naming the file and the refused global) and RefCOCO+ and
    ADE20k are read."""
    root = tmp_path / "data"
    refs = [_ref(0, 10, 1, [_sent(0, "a red ball")])]
    _refer_tree(root, {1: "good.jpg"}, [_ann(10, 1)], b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    _refer_tree(root, {1: "good.jpg"}, [_ann(10, 1)], refs, dataset="refcoco+")
    _refer_tree(root, {1: "good.jpg"}, [_ann(10, 1)], refs, dataset="refcocog")
    (root / "refcocog" / "instances.json").write_text("{not json")
    ade = root / "ade"
    (ade / "images" / "training").mkdir(parents=True)
    (ade / "annotations" / "training").mkdir(parents=True)
    (ade / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n")
    _jpeg(ade / "images" / "training" / "ADE_train_00000001.jpg", 1, (32, 32))
    Image.fromarray(np.ones((32, 32), np.uint8)).save(ade / "annotations" / "training" / "ADE_train_00000001.png")
    s = _read(root, refer_datasets=["refcoco", "refcoco+", "refcocog"], refer_split_by={"refcocog": "unc"},
              ade20k="ade")
    assert [(r.dataset, r.ref_id) for r in s.refs] == [("refcoco+", 0)]
    assert len(s.ade) == 1
    (pick, js) = s.quarantine
    assert (pick.source, pick.record) == ("refcoco", str(root / "refcoco" / "refs(unc).p"))
    assert pick.reason.startswith("unreadable dataset file: UnsafePickleError: ")
    assert "refused global 'os.system'" in pick.reason
    assert (js.source, js.record) == ("refcocog", str(root / "refcocog"))
    assert js.reason.startswith("unreadable dataset file: ValueError: ") and "instances.json: not valid JSON" in js.reason
    _no_memory_address(s.quarantine)


# 10 -----------------------------------------------------------------------------------------------


def _b64_png() -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_an_unbalanced_quote_loses_only_its_row(tmp_path):
    """Before: the csv reader ran the quoted field on to the end of the file, and 10 of 12 rows
    vanished without a word. Now the broken row is quarantined naming the file and line, and the
    11 others are read; a ``\\xff`` byte quarantines its own row only."""
    img = _b64_png()
    lines = ["index\tquestion\tA\tB\tanswer\timage"]
    for i in range(1, 13):
        q = '"What is this' if i == 2 else f"Question {i}?"
        lines.append(f"{i}\t{q}\tyes\tno\tA\t{img}")
    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    res = read_mcq_tsv(tsv, tmp_path / "imgs", benchmark="mmbench")
    assert [r.qid for r in res.records] == [str(i) for i in range(1, 13) if i != 2]
    (q,) = res.quarantine
    assert q.source == "mcq.mmbench" and q.record == "index=2 (MMBench_DEV_EN.tsv line 3)"
    assert q.reason.startswith("malformed record: an unbalanced quote runs this row on over 10 following line(s)")

    raw = tsv.read_bytes().replace(b"Question 5?", b"Question \xff5?")
    tsv.write_bytes(raw)
    res = read_mcq_tsv(tsv, tmp_path / "imgs", benchmark="mmbench")
    assert len(res.records) == 10
    assert [(q.record, q.reason) for q in res.quarantine][1] == (
        "index=5 (MMBench_DEV_EN.tsv line 6)", "malformed record: not UTF-8 text")
    tsv.write_bytes(raw.replace(b"\n7\t", b"\n7\xff\t"))  # in the index itself: the record stays printable
    res = read_mcq_tsv(tsv, tmp_path / "imgs", benchmark="mmbench")
    assert [q.record for q in res.quarantine][2] == "index=7\\udcff (MMBench_DEV_EN.tsv line 8)"
    assert all(q.record.encode("utf-8") for q in res.quarantine)


# 12 (MME) -------------------------------------------------------------------------------------------


def test_mme_fifo_question_file_and_long_question(tmp_path):
    """A FIFO named like a question file would hang both the reader and the fingerprint's listing;
    it is not a question file. A question over MAX_QUESTION_CHARS is quarantined with the limit."""
    mme = tmp_path / "MME" / "existence"
    mme.mkdir(parents=True)
    _jpeg(mme / "a.jpg", 1)
    (mme / "a.txt").write_text("Is there a ball?\tYes\n" + "Is " + "x" * 20000 + "?\tNo\n")
    _jpeg(mme / "b.jpg", 2)
    os.mkfifo(mme / "b.txt")
    res = read_mme(tmp_path / "MME")
    assert [r.qid for r in res.records] == ["existence/a/1"]
    assert [(q.record, q.reason) for q in res.quarantine] == [
        ("existence/a.txt:2", "text too long: question of 20004 characters, at most 16384 (MAX_QUESTION_CHARS)")]
    assert [p.name for p in mme_files(tmp_path / "MME")] == ["a.txt"]


def test_read_refer_alone_raises_only_dataset_level_errors(tmp_path):
    """read_refer itself still raises for a file-level fault (the caller quarantines the file)."""
    root = tmp_path / "data"
    tree = _refer_tree(root, {1: "good.jpg"}, [_ann(10, 1)], b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="refused global 'os.system'"):
        read_refer(tree, root / "images")


def test_a_reason_names_no_memory_address():
    """PIL's "cannot identify image file <_io.BytesIO object at 0x...>" becomes words."""
    import re

    from perceptio_core.data.image_io import CorruptImageError, decode_image_bytes

    with pytest.raises(CorruptImageError) as e:
        decode_image_bytes(b"not an image", "x.png")
    assert "UnidentifiedImageError: not an image PIL can identify" in str(e.value)
    assert not re.search(r"0x[0-9a-f]{6,}", str(e.value))
