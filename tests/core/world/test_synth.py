"""The synthetic world: deterministic, in the real formats, and true to its own scene truth."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from perceptio_core.config import ConfigError, SynthConfig
from perceptio_core.data.refer import ann_to_mask
from perceptio_core.data.safe_pickle import safe_load
from perceptio_core.format.prompts import HARDBLINK_QUESTION
from perceptio_core.world.expressions import SHAPE_WORDS
from perceptio_core.world.scenes import COLOURS
from perceptio_core.world.synth import WorldError, generate_world
from perceptio_core.format.prompts import hardblink_text
from perceptio_core.world.writers import ADE_CLASSES, hardblink_min_separation

REFER_KEYS = {"sent_ids", "file_name", "ann_id", "ref_id", "image_id", "split", "sentences",
              "category_id"}
TREES = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))
WORD_TO_SHAPE = {w: s for s, words in SHAPE_WORDS.items() for w in words}
LOCATION_WORDS = {"left", "right", "leftmost", "rightmost", "closest", "nearest", "front",
                  "farthest", "back", "furthest", "behind"}
QUALIFIERS = {"left": "left", "leftmost": "left", "right": "right", "rightmost": "right",
              "closest": "nearest", "nearest": "nearest", "front": "nearest", "farthest": "farthest",
              "furthest": "farthest", "back": "farthest", "big": "big", "large": "big",
              "small": "small", "little": "small"}


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refs(root: Path, dataset: str, split_by: str) -> list[dict]:
    return safe_load(root / dataset / f"refs({split_by}).p")


def _instances(root: Path) -> dict:
    return json.loads((root / "annotations" / "instances_train2014.json").read_text())


# --------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = SynthConfig(images=4, ade_images=2, hardblink_per_count=1, vqa_questions=4,
                      width=64, height=48, seed=3)
    a = generate_world(tmp_path / "a", cfg)
    b = generate_world(tmp_path / "b", cfg)
    assert a == b
    da, db = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert da == db and len(da) > 20
    other = SynthConfig(**{**cfg.__dict__, "seed": 4})
    generate_world(tmp_path / "c", other)
    dc = _digests(tmp_path / "c")
    assert dc["images/train2014/COCO_train2014_000000000001.jpg"] != \
        da["images/train2014/COCO_train2014_000000000001.jpg"]
    # no temporary folders are left beside the worlds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_existing_world_is_reused_replaced_or_protected(tmp_path):
    cfg = SynthConfig(images=2, ade_images=1, hardblink_per_count=0, vqa_questions=2,
                      width=48, height=36, seed=0)
    out = tmp_path / "w"
    info = generate_world(out, cfg)
    marker = out / "images" / "train2014" / "COCO_train2014_000000000001.jpg"
    mtime = marker.stat().st_mtime_ns
    assert generate_world(out, cfg) == info
    assert marker.stat().st_mtime_ns == mtime  # not regenerated
    bigger = SynthConfig(**{**cfg.__dict__, "images": 3})
    info3 = generate_world(out, bigger)
    assert info3["counts"]["coco_images"] == 3 and info3["config"]["images"] == 3
    assert json.loads((out / "WORLD.json").read_text()) == info3
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(WorldError, match="not a synthetic world"):
        generate_world(foreign, cfg)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_config_checks_sizes():
    with pytest.raises(ConfigError, match="HardBLINK needs images of at least 64x48"):
        SynthConfig(width=48, height=36)
    with pytest.raises(ConfigError, match="too small"):
        SynthConfig(width=16, height=16, hardblink_per_count=0)
    SynthConfig(width=48, height=36, hardblink_per_count=0)


def test_world_json_records_config_and_counts(tiny_world, tiny_world_config):
    info = json.loads((tiny_world / "WORLD.json").read_text())
    assert info["config"] == tiny_world_config.__dict__
    assert info["counts"]["coco_images"] == tiny_world_config.images
    assert info["counts"]["hardblink"] == 3 * tiny_world_config.hardblink_per_count
    assert info["version"]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2
def test_pycocotools_loads_instances_with_every_encoding(tiny_world, capsys):
    coco = COCO(str(tiny_world / "annotations" / "instances_train2014.json"))
    capsys.readouterr()
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"ball", "box", "cylinder", "cone"}
    assert all(c["supercategory"] == "shape" for c in coco.dataset["categories"])
    kinds = set()
    for ann in coco.dataset["annotations"]:
        seg = ann["segmentation"]
        kind = "polygon" if isinstance(seg, list) else (
            "uncompressed" if isinstance(seg["counts"], list) else "compressed")
        kinds.add(kind)
        assert (kind == "uncompressed") == bool(ann["iscrowd"])
        m = coco.annToMask(ann)
        assert int(m.sum()) == int(ann["area"]) > 0
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1 - x, ys.max() + 1 - y) == (x, y, w, h)
    assert kinds == {"polygon", "uncompressed", "compressed"}
    for tree, _ in TREES:  # REFER ships a copy of the instances in each tree
        assert (tiny_world / tree / "instances.json").read_bytes() == \
            (tiny_world / "annotations" / "instances_train2014.json").read_bytes()


def test_refer_pickles_read_plainly(tiny_world):
    inst = _instances(tiny_world)
    anns = {a["id"]: a for a in inst["annotations"]}
    imgs = {i["id"]: i for i in inst["images"]}
    unc_split: dict[int, str] = {}
    for dataset, split_by in TREES:
        raw = (tiny_world / dataset / f"refs({split_by}).p").read_bytes()
        assert raw[:2] == b"\x80\x02"  # protocol 2, as the public files
        refs = _refs(tiny_world, dataset, split_by)
        assert isinstance(refs, list) and refs
        splits = {"train", "val", "testA", "testB"} if split_by == "unc" else {"train", "val", "test"}
        by_image: dict[int, set[str]] = {}
        for ref in refs:
            assert set(ref) == REFER_KEYS
            assert 1 <= len(ref["sentences"]) <= 3
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            for s in ref["sentences"]:
                assert set(s) == {"tokens", "raw", "sent_id", "sent"}
                assert s["sent"] == " ".join(s["tokens"]) and s["tokens"]
            ann = anns[ref["ann_id"]]  # every ref's annotation exists ...
            assert ann["iscrowd"] == 0 and ann["image_id"] == ref["image_id"]
            assert ann["category_id"] == ref["category_id"]
            im = imgs[ref["image_id"]]
            assert ann_to_mask(ann["segmentation"], im["height"], im["width"]).any()  # ... non-empty
            assert ref["file_name"] == im["file_name"].replace(".jpg", f"_{ref['ann_id']}.jpg")
            assert ref["split"] in splits
            by_image.setdefault(ref["image_id"], set()).add(ref["split"])
        assert all(len(s) == 1 for s in by_image.values())  # split by image
        for i, s in by_image.items():  # one image partition: umd test = unc testA + testB
            split = next(iter(s)).replace("testA", "test").replace("testB", "test")
            assert unc_split.setdefault(i, split) == split
        assert {s for v in by_image.values() for s in v} == splits


def _parse(sentence: str) -> tuple[str | None, str | None, set[str]]:
    toks = sentence.split()
    colour = next((t for t in toks if t in COLOURS), None)
    shape = next((WORD_TO_SHAPE[t] for t in toks if t in WORD_TO_SHAPE), None)
    quals = {QUALIFIERS[t] for t in toks if t in QUALIFIERS}
    return colour, shape, quals


def _is_extreme(t: dict, group: list[dict], rel: str) -> bool:
    others = [g for g in group if g is not t]
    if rel == "left":
        return all(t["cx"] < g["cx"] for g in others)
    if rel == "right":
        return all(t["cx"] > g["cx"] for g in others)
    if rel == "nearest":
        return all(t["depth"] < g["depth"] for g in others)
    if rel == "farthest":
        return all(t["depth"] > g["depth"] for g in others)
    if rel == "big":
        return t["size"] == "large" and all(g["size"] == "small" for g in others)
    return t["size"] == "small" and all(g["size"] == "large" for g in others)


@pytest.mark.parametrize("dataset", ["refcoco", "refcoco+"])
def test_expressions_single_out_their_object(tiny_world, dataset):
    inst = _instances(tiny_world)
    by_image: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append({**a["attributes"], "id": a["id"]})
    checked = 0
    for ref in _refs(tiny_world, dataset, "unc"):
        objs = by_image[ref["image_id"]]
        target = next(o for o in objs if o["id"] == ref["ann_id"])
        for s in ref["sentences"]:
            colour, shape, quals = _parse(s["sent"])
            if dataset == "refcoco+":
                assert not LOCATION_WORDS & set(s["tokens"]), s["sent"]
            assert colour in (None, target["color"]) and shape in (None, target["shape"]), s["sent"]
            group = [o for o in objs if colour in (None, o["color"]) and shape in (None, o["shape"])]
            if not quals:
                assert group == [target], s["sent"]  # e.g. "the red ball": only one red ball
            else:
                (rel,) = quals
                assert _is_extreme(target, group, rel), s["sent"]
            checked += 1
    assert checked > 20


def test_refcocog_is_longer_and_names_colour_and_shape(tiny_world):
    inst = _instances(tiny_world)
    attrs = {a["id"]: a["attributes"] for a in inst["annotations"]}
    lengths = {}
    for dataset, split_by in TREES:
        sents = [(r, s) for r in _refs(tiny_world, dataset, split_by) for s in r["sentences"]]
        lengths[dataset] = np.mean([len(s["tokens"]) for _, s in sents])
        if dataset == "refcocog":
            for r, s in sents:
                colour, shape, _ = _parse(s["sent"])
                assert (colour, shape) == (attrs[r["ann_id"]]["color"], attrs[r["ann_id"]]["shape"])
                assert s["raw"].endswith(".")
    assert lengths["refcocog"] > 2 * lengths["refcoco"]


def test_depth_for_every_image_matches_its_size(tiny_world):
    images = list((tiny_world / "images" / "train2014").glob("*.jpg"))
    images += list((tiny_world / "ADEChallengeData2016" / "images").rglob("*.jpg"))
    images += list((tiny_world / "HardBLINK" / "images").rglob("*.png"))
    assert len(images) == 24 + 8 + 6
    for p in images:
        d = np.load(tiny_world / "depth" / f"{p.stem}.npy")
        with Image.open(p) as im:
            assert d.shape == (im.height, im.width) and im.mode == "RGB"
        assert d.dtype == np.float32 and np.isfinite(d).all() and d.min() > 0


def test_depth_follows_perspective(tiny_world):
    """The ground recedes up the image; farther objects stand higher (their base is higher)."""
    d = np.load(tiny_world / "depth" / "COCO_train2014_000000000001.npy")
    assert np.median(d[-1]) < np.median(d[d.shape[0] // 2]) < np.median(d[0])
    anns = [a for a in _instances(tiny_world)["annotations"]
            if not a["iscrowd"] and a["attributes"]["visible_fraction"] == 1.0]
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    agree = total = 0
    for group in by_image.values():
        for a, b in combinations(group, 2):
            da, db = a["attributes"]["depth"], b["attributes"]["depth"]
            if max(da, db) > 1.5 * min(da, db):
                near, far = (a, b) if da < db else (b, a)
                total += 1
                agree += (far["bbox"][1] + far["bbox"][3]) < (near["bbox"][1] + near["bbox"][3])
    assert total > 10 and agree / total > 0.9


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hardblink_is_in_the_public_layout_plus_points(tiny_world):
    """AURORA's files and nothing else, except the world's own points/ folder."""
    hb = tiny_world / "HardBLINK"
    files = sorted(p.relative_to(hb).as_posix() for p in hb.rglob("*") if p.is_file())
    expected = []
    for n in (3, 4, 5):
        expected += [f"answers/blink_{n}pointscenter_answers.jsonl",
                     *(f"images/blink{n}pointscenter/hardblink_{n}pt_{i:04d}.png" for i in range(2)),
                     f"points/blink_{n}pointscenter_points.jsonl",
                     f"questions/blink_{n}pointscenter_questions.jsonl"]
    assert files == sorted(expected)
    choices = "\nSelect from the following choices.\n(A) A\n(B) B\n(C) C"
    assert hardblink_text(["A", "B", "C"]) == HARDBLINK_QUESTION + choices
    for n in (3, 4, 5):
        qs = _jsonl(hb / "questions" / f"blink_{n}pointscenter_questions.jsonl")
        assert [set(q) for q in qs] == [{"question_id", "image", "text", "category"}] * 2
        assert [q["question_id"] for q in qs] == [0, 1]
        assert [q["text"] for q in qs] == [hardblink_text(list("ABCDE"[:n]))] * 2
        ans = _jsonl(hb / "answers" / f"blink_{n}pointscenter_answers.jsonl")
        assert [set(a) for a in ans] == [{"question_id", "text"}] * 2


def test_hardblink_answer_is_the_nearest_point(tiny_world):
    hb = tiny_world / "HardBLINK"
    recs = []
    for n in (3, 4, 5):
        name = f"blink_{n}pointscenter"
        qs = _jsonl(hb / "questions" / f"{name}_questions.jsonl")
        ans = _jsonl(hb / "answers" / f"{name}_answers.jsonl")
        pts = _jsonl(hb / "points" / f"{name}_points.jsonl")
        for q, a, p in zip(qs, ans, pts, strict=True):
            assert q["question_id"] == a["question_id"] == p["question_id"]
            recs.append(dict(n_points=n, image=f"images/blink{n}pointscenter/{q['image']}", points=p["points"],
                             labels=p["labels"], answer=a["text"], point_depths=p["point_depths"]))
    assert sorted(r["n_points"] for r in recs) == [3, 3, 4, 4, 5, 5]
    sep = hardblink_min_separation(64, 48)
    for r in recs:
        assert r["labels"] == list("ABCDE"[: r["n_points"]]) and len(r["points"]) == r["n_points"]
        depth = np.load(tiny_world / "depth" / f"{Path(r['image']).stem}.npy")
        at = [float(depth[y, x]) for x, y in r["points"]]
        assert r["point_depths"] == [round(v, 4) for v in at]
        assert r["answer"] == f"({r['labels'][int(np.argmin(at))]})"
        s = sorted(at)
        assert s[1] >= 1.25 * s[0]  # the closest is clearly the closest
        for (x1, y1), (x2, y2) in combinations(r["points"], 2):
            assert math.hypot(x1 - x2, y1 - y2) >= sep
        img = np.asarray(Image.open(tiny_world / "HardBLINK" / r["image"]))
        for x, y in r["points"]:  # a red ring around each point
            win = img[max(0, y - 5): y + 6, max(0, x - 5): x + 6].reshape(-1, 3)
            assert ((win[:, 0] == 255) & (win[:, 1] == 0) & (win[:, 2] == 0)).sum() >= 6


def test_mmbench_tsv_parses(tiny_world):
    csv.field_size_limit(sys.maxsize)
    with open(tiny_world / "vqa" / "mmbench_world.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 12
    assert list(rows[0])[:10] == ["index", "question", "hint", "A", "B", "C", "D", "answer",
                                  "category", "image"]
    for row in rows:
        assert row["answer"] in "ABCD" and row[row["answer"]]
        assert row["A"] and row["B"] and row["question"].endswith("?")
        Image.open(io.BytesIO(base64.b64decode(row["image"]))).verify()
        assert row["split"] in {"train", "dev"}
        if row["question"].startswith("How many"):
            assert row[row["answer"]].isdigit()
    assert {r["split"] for r in rows} == {"train", "dev"}


def test_llava_json_holds_the_train_questions_as_multi_turn_conversations(tiny_world):
    """One conversation per train scene: its TSV questions as the first turns (``<image>`` in the
    first only, the evaluation prompt each), then a yes/no turn; a text-only conversation after
    every third image one, as LLaVA-665K mixes text-only samples in."""
    from perceptio_core.format.prompts import format_mc_prompt

    csv.field_size_limit(sys.maxsize)
    with open(tiny_world / "vqa" / "mmbench_world.tsv", newline="") as f:
        train = [r for r in csv.DictReader(f, delimiter="\t") if r["split"] == "train"]
    entries = json.loads((tiny_world / "llava" / "llava_world.json").read_text())
    with_image = [e for e in entries if "image" in e]
    text_only = [e for e in entries if "image" not in e]
    assert len(with_image) == 3 and len(text_only) == 1 and entries[3] is text_only[0]
    assert [t["from"] for t in text_only[0]["conversations"]] == ["human", "gpt"] * 2
    assert "<image>" not in json.dumps(text_only)
    rows = iter(train)
    for e in with_image:
        turns = e["conversations"]
        assert len(turns) % 2 == 0 and len(turns) >= 4  # at least one question and the yes/no turn
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
        image = (tiny_world / "llava" / e["image"]).read_bytes()
        for human, gpt in zip(turns[:-2:2], turns[1:-2:2]):
            row = next(rows)
            options = {k: row[k] for k in "ABCD" if row[k]}
            assert human["value"].removeprefix("<image>\n") == format_mc_prompt(row["question"], options)
            assert gpt["value"] == row["answer"]
            assert image == base64.b64decode(row["image"])  # the very JPEG the TSV carries
        assert turns[-2]["value"].endswith("Please answer yes or no.") and turns[-1]["value"] in ("Yes", "No")
    assert next(rows, None) is None  # every train question, no dev question


def test_captions_and_ade_layout(tiny_world):
    caps = json.loads((tiny_world / "annotations" / "captions_train2014.json").read_text())
    per_image: dict[int, int] = {}
    for c in caps["annotations"]:
        per_image[c["image_id"]] = per_image.get(c["image_id"], 0) + 1
        assert c["caption"].endswith(".")
    assert set(per_image) == {im["id"] for im in caps["images"]}
    assert set(per_image.values()) <= {1, 2}
    ade = tiny_world / "ADEChallengeData2016"
    with open(ade / "objectInfo150.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Idx", "Ratio", "Train", "Val", "Name"]
    assert [(int(r[0]), r[4]) for r in rows[1:]] == ADE_CLASSES
    assert abs(sum(float(r[1]) for r in rows[1:]) - 1.0) < 0.01
    for png in (ade / "annotations").rglob("*.png"):
        with Image.open(png) as im:
            assert im.mode == "L"
            assert int(np.asarray(im).max()) <= len(ADE_CLASSES)
    assert len(list((ade / "images" / "validation").glob("ADE_val_*.jpg"))) == 2
