"""read_sources: good records pass, each bad one is quarantined with its reason, nothing raises;
Sources round-trips through JSON; the data fingerprint follows the content."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio_core.config import DataConfig
from perceptio_core.atomic_io import file_digest
from perceptio_core.data.records import DatasetNotFoundError, ImageRecord, Sources
from perceptio_core.data.masks import encode_mask, mask_to_uncompressed_rle
from perceptio_core.data.sources import data_fingerprint, data_path, read_sources, resolve_paths

ONLY_REFCOCO = dict(refer_datasets=["refcoco"], ade20k="", hardblink="", mcq={}, mme="", captions="", llava_json=None, glamm_json=None)


def _jpeg(path: Path, seed: int, size=(40, 30)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def _sent(sid: int, text: str) -> dict:
    return {"tokens": text.split(), "raw": text, "sent_id": sid, "sent": text}


def _ref(ref_id: int, ann_id: int, image_id: int, sents: list[dict], split: str = "train") -> dict:
    return {"sent_ids": [s["sent_id"] for s in sents], "ann_id": ann_id, "ref_id": ref_id,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "image_id": image_id,
            "split": split, "sentences": sents, "category_id": 1}


@pytest.fixture()
def broken_tree(tmp_path: Path) -> Path:
    """A REFER tree with one defect of each kind (ids chosen so each ref has one problem)."""
    root = tmp_path / "data"
    imgs = root / "images" / "train2014"
    imgs.mkdir(parents=True)
    names = {i: f"COCO_train2014_{i:012d}.jpg" for i in range(1, 6)}
    _jpeg(imgs / names[1], 1)
    _jpeg(imgs / names[2], 2)
    good = (imgs / names[1]).read_bytes()
    (imgs / names[3]).write_bytes(good[: len(good) // 2])  # truncated: corrupt
    # image 4 is listed but its file is missing
    _jpeg(imgs / names[5], 5)
    crowd = np.zeros((30, 40), np.uint8)
    crowd[5:9, 10:20] = 1
    blob = np.zeros((30, 40), np.uint8)
    blob[20:25, 2:6] = 1
    square = [[1, 1, 5, 1, 5, 4, 1, 4]]  # 12 pixels
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": square, "area": 12.0,
         "bbox": [1, 1, 4, 3], "iscrowd": 0},
        {"id": 11, "image_id": 2, "category_id": 1, "segmentation": [[3, 3, 3, 3, 3, 3]],
         "area": 0.0, "bbox": [3, 3, 0, 0], "iscrowd": 0},  # zero-area polygon
        {"id": 12, "image_id": 1, "category_id": 1, "segmentation": mask_to_uncompressed_rle(crowd),
         "area": 40.0, "bbox": [10, 5, 10, 4], "iscrowd": 1},  # crowd RLE
        {"id": 13, "image_id": 3, "category_id": 1, "segmentation": square, "area": 12.0,
         "bbox": [1, 1, 4, 3], "iscrowd": 0},  # on the corrupt image
        {"id": 14, "image_id": 4, "category_id": 1, "segmentation": square, "area": 12.0,
         "bbox": [1, 1, 4, 3], "iscrowd": 0},  # on the missing image
        {"id": 15, "image_id": 5, "category_id": 1, "segmentation": encode_mask(blob),
         "area": 20.0, "bbox": [2, 20, 4, 5], "iscrowd": 0},
        {"id": 16, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5]],
         "area": 0.0, "bbox": [0, 0, 0, 0], "iscrowd": 0},  # odd coordinate count
    ]
    instances = {"images": [{"id": i, "file_name": n, "width": 40, "height": 30}
                            for i, n in names.items()],
                 "annotations": anns, "categories": [{"id": 1, "name": "ball", "supercategory": "shape"}]}
    refs = [
        _ref(0, 10, 1, [_sent(0, "red ball"), _sent(1, "the ball on the left")]),
        _ref(1, 11, 2, [_sent(2, "flat thing")]),
        _ref(2, 12, 1, [_sent(3, "the crowd")]),
        _ref(3, 13, 3, [_sent(4, "ball in a broken file")]),
        _ref(4, 14, 4, [_sent(5, "ball in no file")]),
        _ref(5, 99, 1, [_sent(6, "nothing there")]),
        _ref(6, 15, 5, [_sent(7, "small blob"), _sent(8, "   ")], split="val"),
        _ref(7, 16, 2, [_sent(9, "odd polygon")]),
    ]
    tree = root / "refcoco"
    tree.mkdir()
    (tree / "instances.json").write_text(json.dumps(instances))
    (tree / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


def test_bad_records_are_quarantined_with_their_reason(broken_tree):
    s = read_sources(broken_tree, DataConfig(**ONLY_REFCOCO))
    kept = [(r.ref_id, r.sent_id, r.sentence) for r in s.refs]
    assert kept == [(0, 0, "red ball"), (0, 1, "the ball on the left"), (6, 7, "small blob")]
    reasons = {q.record.split(" ")[0] + ("/" + q.record.split(" ")[1] if "sent_id" in q.record else ""):
               q.reason for q in s.quarantine}
    assert reasons.pop("ref_id=3").startswith("corrupt image: ")
    assert reasons == {
        "ref_id=1": "zero-area mask",
        "ref_id=2": "crowd annotation",
        "ref_id=4": "missing image",
        "ref_id=5": "missing annotation",
        "ref_id=6/sent_id=8": "empty sentence",
        "ref_id=7": "malformed mask: polygon has an odd number of coordinates (5)",
    }
    assert all(q.source == "refcoco" for q in s.quarantine)
    assert sorted(s.coco_images) == [1, 5]  # only images of kept refs
    for rec in s.coco_images.values():
        assert rec.digest == file_digest(rec.path) and (rec.width, rec.height) == (40, 30)
    ref15 = next(r for r in s.refs if r.ann_id == 15)
    assert ref15.split == "val" and isinstance(ref15.segmentation["counts"], str)


def test_dataset_level_problems_raise_naming_the_path(tmp_path, broken_tree):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nowhere")):
        read_sources(tmp_path / "nowhere", DataConfig(**ONLY_REFCOCO))
    (broken_tree / "refcoco" / "refs(unc).p").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"refcoco/refs\(unc\)\.p"):
        read_sources(broken_tree, DataConfig(**ONLY_REFCOCO))
    with pytest.raises(DatasetNotFoundError, match="refcoco\\+"):
        read_sources(broken_tree, DataConfig(**{**ONLY_REFCOCO, "refer_datasets": ["refcoco+"]}))
    with pytest.raises(DatasetNotFoundError, match=r"data\.llava_json.*" + str(broken_tree / "llava.json")):
        read_sources(broken_tree, DataConfig(**{**ONLY_REFCOCO, "refer_datasets": [], "llava_json": "llava.json"}))
    with pytest.raises(DatasetNotFoundError, match=r"data\.glamm_json.*/nowhere/gcg\.json"):
        read_sources(broken_tree, DataConfig(**{**ONLY_REFCOCO, "refer_datasets": [], "glamm_json": "/nowhere/gcg.json"}))


def test_conversation_jsons_are_resolved_under_the_root_and_fingerprinted(broken_tree):
    cfg = DataConfig(**{**ONLY_REFCOCO, "refer_datasets": [], "llava_json": "llava/mix.json"})
    (broken_tree / "llava").mkdir()
    (broken_tree / "llava" / "mix.json").write_text("[]")
    assert resolve_paths(broken_tree, cfg).llava_json == (broken_tree / "llava" / "mix.json").resolve()
    before = data_fingerprint(broken_tree, cfg)
    (broken_tree / "llava" / "mix.json").write_text('[{"id": 1}]')  # curation would read other samples
    assert data_fingerprint(broken_tree, cfg) != before
    assert data_path(broken_tree, "/abs/x.json") == Path("/abs/x.json")


def test_world_sources_round_trip(tiny_world, tmp_path):
    s = read_sources(tiny_world, DataConfig(), cache_dir=tmp_path / "cache")
    assert s.quarantine == []
    counts = s.counts()
    assert counts["coco_images"] == 24 and counts["ade20k"] == 8 and counts["hardblink"] == 6
    assert counts["mcq"] == 12 and counts["mme"] == 16 and counts["captions"] >= 24
    assert {"refs.refcoco", "refs.refcoco+", "refs.refcocog"} <= set(counts)
    assert s.ade_classes[3] == "floor"
    for rec in list(s.coco_images.values()) + [a.image_record() for a in s.ade]:
        assert rec.digest == file_digest(rec.path)
        assert rec.depth_path and np.load(rec.depth_path).shape == (rec.height, rec.width)
    again = Sources.from_json(s.to_json())
    assert again == s
    assert again.to_json() == s.to_json()
    depth = s.depth_images()
    assert len(depth) == len({r.digest for r in depth}) == len({r.image_id for r in s.refs}) + 8
    assert {r.source for r in depth} == {"coco", "ade20k"}
    assert len(s.depth_images(ade_splits=("training",))) == len(depth) - 2


def test_depth_images_deduplicates_by_digest():
    a = ImageRecord(1, "a.jpg", "/d/a.jpg", 4, 3, "coco", digest="x" * 64)
    b = ImageRecord(2, "b.jpg", "/d/b.jpg", 4, 3, "coco", digest="x" * 64)  # same bytes
    c = ImageRecord(3, "c.jpg", "/d/c.jpg", 4, 3, "coco", digest="y" * 64)
    s = Sources(root="/d", coco_images={1: a, 2: b, 3: c})
    from perceptio_core.data.records import RefRecord

    s.refs = [RefRecord("refcoco", "unc", i, i, i, i, "train", "x", 1, "ball", (0, 0, 1, 1), [], 0, 1.0)
              for i in (1, 2, 3)]
    assert s.depth_images() == [a, c]


def test_fingerprint_follows_content(tiny_world, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_world, root)
    cfg = DataConfig()
    fp = data_fingerprint(root, cfg)
    assert fp == data_fingerprint(root, cfg) and len(fp) == 64
    assert data_fingerprint(root, DataConfig(mcq={})) != fp  # the config is part of it
    refs = root / "refcocog" / "refs(umd).p"
    data = pickle.loads(refs.read_bytes())
    refs.write_bytes(pickle.dumps(data[:-1], protocol=2))
    fp2 = data_fingerprint(root, cfg)
    assert fp2 != fp
    _jpeg(root / "images" / "train2014" / "extra.jpg", 9)
    assert data_fingerprint(root, cfg) != fp2


def test_fingerprint_reads_the_hardblink_jsonl(tiny_world, tmp_path):
    """An answer edited in place (same size) changes the fingerprint: the JSONL files are hashed."""
    root = tmp_path / "copy"
    shutil.copytree(tiny_world, root)
    cfg = DataConfig()
    fp = data_fingerprint(root, cfg)
    answers = root / "HardBLINK" / "answers" / "blink_3pointscenter_answers.jsonl"
    text = answers.read_text()
    flipped = text.replace('"(A)"', '"(Z)"', 1) if '"(A)"' in text else text.replace('"(B)"', '"(Z)"', 1)
    assert len(flipped) == len(text) and flipped != text
    answers.write_text(flipped)
    assert data_fingerprint(root, cfg) != fp


def _py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's ``pickle.dump(obj, f)`` writes it (protocol 0, the default REFER's refs
    files were written with): dicts and lists built item by item, ints as ``I``, Python 2 ``str``
    (bytes, here UTF-8) as quoted ``S`` strings, ``unicode`` as ``V`` raw-unicode-escape lines."""
    out: list[bytes] = []

    def w(o):
        if isinstance(o, dict):
            out.append(b"(d")
            for k, v in o.items():
                w(k)
                w(v)
                out.append(b"s")
        elif isinstance(o, list):
            out.append(b"(l")
            for v in o:
                w(v)
                out.append(b"a")
        elif isinstance(o, bool) or o is None:
            raise TypeError(o)
        elif isinstance(o, int):
            out.append(b"I%d\n" % o)
        elif isinstance(o, bytes):  # a Python 2 str: repr with single quotes, bytes >= 0x80 as \\xNN
            body = "".join(chr(b) if 32 <= b < 127 and b not in (39, 92) else f"\\x{b:02x}" for b in o)
            out.append(b"S'" + body.encode("ascii") + b"'\n")
        elif isinstance(o, str):  # unicode
            out.append(b"V" + o.encode("raw-unicode-escape") + b"\n")
        else:
            raise TypeError(o)

    w(obj)
    return b"".join(out) + b"."


def test_refs_written_by_python2_read_with_their_text(broken_tree):
    """REFER's refs(unc).p as released: a Python 2 protocol-0 pickle whose strings are byte strings
    (UTF-8 where not ASCII) and sometimes unicode; ``file_name`` carries the annotation suffix, and the
    image is found through ``image_id`` in instances.json."""
    sent = {b"tokens": [b"the", b"caf\xc3\xa9", b"ball"], b"raw": b"the caf\xc3\xa9 ball", b"sent_id": 0,
            b"sent": "the café ball"}
    ref = {b"sent_ids": [0], b"file_name": b"COCO_train2014_000000000001_10.jpg", b"ann_id": 10, b"ref_id": 0,
           b"image_id": 1, b"split": b"train", b"sentences": [sent], b"category_id": 1}
    data = _py2_pickle([ref])
    assert data.startswith(b"(l(dS'sent_ids'\n(lI0\na") and b"S'caf\\xc3\\xa9'" in data
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # what a plain Python 3 load (ASCII) does with it
    (broken_tree / "refcoco" / "refs(unc).p").write_bytes(data)
    s = read_sources(broken_tree, DataConfig(**ONLY_REFCOCO))
    assert s.quarantine == []
    (r,) = s.refs
    assert (r.ref_id, r.sent_id, r.sentence, r.split, r.ann_id) == (0, 0, "the café ball", "train", 10)
    assert s.coco_images[1].file_name == "COCO_train2014_000000000001.jpg"  # through image_id, not file_name


def test_an_image_id_two_datasets_give_different_files_is_quarantined(broken_tree):
    """A dataset of one's own that reuses a COCO image id for another picture: its refs on that id
    are quarantined naming the clash; the first dataset's and its other refs stay."""
    import shutil as sh

    other = broken_tree / "mine"
    sh.copytree(broken_tree / "refcoco", other)
    inst = json.loads((other / "instances.json").read_text())
    for im in inst["images"]:
        if im["id"] == 1:
            im["file_name"] = "mine_1.jpg"  # the same id, another file
    sh.copy(broken_tree / "images" / "train2014" / "COCO_train2014_000000000005.jpg",
            broken_tree / "images" / "train2014" / "mine_1.jpg")
    (other / "instances.json").write_text(json.dumps(inst))
    cfg = DataConfig(**{**ONLY_REFCOCO, "refer_datasets": ["refcoco", "mine"], "refer_split_by": {"mine": "unc"}})
    s = read_sources(broken_tree, cfg)
    mine = [(r.ref_id, r.sent_id) for r in s.refs if r.dataset == "mine"]
    assert mine == [(6, 7)]  # image 5's ref; those on image 1 quarantined
    clash = [q for q in s.quarantine if q.source == "mine" and "image ids are shared" in q.reason]
    assert [q.record for q in clash] == ["ref_id=0 sent_id=0", "ref_id=0 sent_id=1"]
    assert clash[0].reason.startswith("malformed record: image_id 1 is mine_1.jpg here but "
                                      "COCO_train2014_000000000001.jpg in an earlier dataset")
    assert s.coco_images[1].file_name == "COCO_train2014_000000000001.jpg"
