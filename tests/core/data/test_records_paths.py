"""Sources / Benchmarks JSON holds no absolute path into the data root or the artifact: a copied or
moved workdir reads its own files (issue 19)."""

import json

from perceptio_core.data.records import Benchmarks, ImageRecord, McqRecord, MmeRecord, Sources


def test_paths_are_relative_and_located_where_the_json_is_read(tmp_path):
    root, art = tmp_path / "world", tmp_path / "store" / "benchmarks" / "k"
    img = ImageRecord(1, "a.jpg", str(root / "images" / "a.jpg"), 8, 8, "coco", str(root / "depth" / "a.npy"))
    outside = ImageRecord(2, "b.jpg", "/datasets/coco/b.jpg", 8, 8, "coco")
    src = Sources(root=str(root), coco_images={1: img, 2: outside})
    text = src.to_json()
    data = json.loads(text)
    assert data["format"] == 3
    assert [r["path"] for r in data["coco_images"]] == ["images/a.jpg", "/datasets/coco/b.jpg"]
    assert data["coco_images"][0]["depth_path"] == "depth/a.npy"
    assert Sources.from_json(text) == src  # read where it was written: equal
    moved = Sources.from_json(text, root=tmp_path / "copy" / "world")
    assert moved.coco_images[1].path == str(tmp_path / "copy" / "world" / "images" / "a.jpg")
    assert moved.coco_images[2].path == "/datasets/coco/b.jpg"  # outside the root: kept as given

    mcq = McqRecord("0", str(art / "mcq-images" / "f00d.png"), "q?", {"A": "x", "B": "y"}, "A")
    mme = MmeRecord("count/1/0", "count", "count/1", str(root / "MME" / "count" / "1.jpg"), "q?", "Yes")
    bench = Benchmarks(root=str(root), mcq=[mcq], mme=[mme])
    btext = bench.to_json(artifact=art)
    assert json.loads(btext)["mcq"][0]["image_path"] == "artifact:mcq-images/f00d.png"
    assert json.loads(btext)["mme"][0]["image_path"] == "MME/count/1.jpg"
    assert str(tmp_path) not in btext.replace(json.dumps(str(root))[1:-1], "")  # only the informational root
    again = Benchmarks.from_json(btext, root=root, artifact=art)
    assert again == bench
    copy = Benchmarks.from_json(btext, root=tmp_path / "w2", artifact=tmp_path / "s2")
    assert copy.mcq[0].image_path == str(tmp_path / "s2" / "mcq-images" / "f00d.png")


def test_format_2_json_with_absolute_paths_still_reads(tmp_path):
    data = {"format": 2, "root": "/old", "hardblink": [], "mme": [], "quarantine": [],
            "mcq": [{"qid": "0", "image_path": "/old/cache/x.png", "question": "q", "options": {"A": "a", "B": "b"},
                     "answer": "A"}]}
    b = Benchmarks.from_json(json.dumps(data), root=tmp_path)
    assert b.mcq[0].image_path == "/old/cache/x.png"
