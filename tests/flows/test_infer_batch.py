"""``perceptio infer`` on many queries through ``flows.cli.main``: a JSONL file and a folder of images,
on a tiny saved model (random weights, LoRA nudged off its initialisation as in test_export_cli.py).

What is checked: one ``results.jsonl`` entry per non-blank line, in order, each bad line (not JSON,
a missing field, an unreadable or missing image) an error entry naming the file and line while the
others are answered; the model loaded once for the whole batch; a batch answer equal to the
single-image ``perceptio infer`` answer of the same image and query (greedy decoding: the same
model, the same prompt); the mask and depth PNGs under ``<out>/<line>/`` at the image's size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import main as cli_main
from perceptio_core.evaluation.infer import infer_batch, read_queries
from perceptio_core.format.target import ParseStatus

from perceptio_helpers import build_tiny, one_torch_thread  # noqa: F401

FORCE = "[SEG]<d_start>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model = build_tiny()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(out)
    return out


def picture(path: Path, w: int, h: int, seed: int) -> Path:
    """A new picture (in no dataset): a gradient with a coloured box, w x h."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 200 // w, yy * 200 // h, np.full_like(xx, 80)], -1).astype(np.uint8)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture()
def count_loads(monkeypatch):
    from perceptio_core.model.perceptio_model import PerceptioModel

    loads = []
    real = PerceptioModel.from_pretrained.__func__

    def counting(cls, *a, **kw):
        loads.append(a[0] if a else kw)
        return real(cls, *a, **kw)

    monkeypatch.setattr(PerceptioModel, "from_pretrained", classmethod(counting))
    return loads


def test_jsonl_one_entry_per_line_bad_lines_named(model_dir, tmp_path, capsys, count_loads):
    qdir = tmp_path / "batch"
    picture(qdir / "pics" / "a.png", 50, 36, 0)
    picture(qdir / "b.jpg", 40, 60, 1)
    (qdir / "broken.png").write_bytes(b"not an image at all")
    lines = [
        json.dumps({"image": "pics/a.png", "query": "the box"}),  # 1: relative to the JSONL's folder
        json.dumps({"image": str((qdir / "b.jpg").resolve()), "query": "Describe the image.",
                    "template": "none"}),  # 2: absolute path, the query is the prompt
        '{"image": "pics/a.png", "query": ',  # 3: not JSON
        json.dumps({"image": "pics/a.png"}),  # 4: no query
        json.dumps({"image": "broken.png", "query": "the box"}),  # 5: unreadable image
        "",  # 6: blank, skipped
        json.dumps({"image": "nowhere.png", "query": "the box"}),  # 7: missing image
        json.dumps(["pics/a.png", "the box"]),  # 8: JSON, not an object
        json.dumps({"image": "b.jpg", "query": "the box", "template": "semantic_seg"}),  # 9
    ]
    (qdir / "queries.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers"
    capsys.readouterr()
    rc = cli_main(["infer", "--model", str(model_dir), "--queries", str(qdir / "queries.jsonl"),
                   "--out", str(out), "--max-new-tokens", "6"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 1  # some lines failed; the others answered
    assert len(count_loads) == 1  # one model for the whole batch
    entries = results(out)
    assert [e["line"] for e in entries] == [1, 2, 3, 4, 5, 7, 8, 9]
    errors = {e["line"]: e["error"] for e in entries if e["error"]}
    assert set(errors) == {3, 4, 5, 7, 8}
    assert errors[3].startswith("queries.jsonl line 3: not JSON")
    assert errors[4].startswith("queries.jsonl line 4:") and "'query'" in errors[4]
    assert errors[5].startswith("queries.jsonl line 5:") and "broken.png" in errors[5]
    assert errors[7].startswith("queries.jsonl line 7:") and "nowhere.png" in errors[7]
    assert errors[8].startswith("queries.jsonl line 8: not a JSON object")
    for e in entries:
        if e["error"]:
            assert e["status"] == "error" and e["answer"] is None and not (out / str(e["line"])).exists()
            continue
        assert e["status"] in {s.value for s in ParseStatus} and isinstance(e["answer"], str)
        assert Path(e["out"]) == out / str(e["line"]) and Path(e["result_json"]).is_file()
        assert Path(e["model"]) == model_dir.resolve()
    prompts = {e["line"]: json.loads(Path(e["result_json"]).read_text())["prompt"] for e in entries if not e["error"]}
    assert "the box" in prompts[1] and prompts[1] != "the box"  # the default template, refer_seg
    assert prompts[2] == "Describe the image."  # "template": "none"
    assert "the box" in prompts[9] and prompts[9] != prompts[1]  # semantic_seg, not refer_seg
    assert "3 answered, 5 failed" in printed and "queries.jsonl line 5" in printed

    # the batch answer of line 1 is what single-image infer answers (and writes no results.jsonl)
    single = tmp_path / "single"
    capsys.readouterr()
    assert cli_main(["infer", "--model", str(model_dir), "--image", str(qdir / "pics" / "a.png"),
                     "--query", "the box", "--out", str(single), "--max-new-tokens", "6"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("answer: ")
    assert json.loads((single / "result.json").read_text())["answer"] == entries[0]["answer"]
    assert not (single / "results.jsonl").exists()


def test_folder_every_image_with_the_one_query(model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    picture(folder / "b.png", 44, 30, 2)
    picture(folder / "a.JPG", 30, 44, 3)
    (folder / "c.webp").write_bytes(b"\x00" * 64)  # an image suffix, unreadable bytes
    (folder / "notes.txt").write_text("not an image")  # left out
    (folder / "sub").mkdir()
    picture(folder / "sub" / "d.png", 20, 20, 4)  # not recursive
    out = tmp_path / "answers"
    rc = cli_main(["infer", "--model", str(model_dir), "--image", str(folder), "--query", "the box",
                   "--out", str(out), "--max-new-tokens", "4"])  # fmt: skip
    assert rc == 1
    entries = results(out)
    assert [(e["line"], Path(e["image"]).name) for e in entries] == [(1, "a.JPG"), (2, "b.png"), (3, "c.webp")]
    assert [e["error"] is None for e in entries] == [True, True, False]
    assert entries[2]["error"].startswith("image 3 (c.webp):") and "c.webp" in entries[2]["error"]
    assert all(e["query"] == "the box" and e["template"] == "refer_seg" for e in entries)
    assert (out / "1" / "result.json").is_file() and (out / "2" / "result.json").is_file()


def test_forced_block_writes_mask_and_depth_per_line(model_dir, tmp_path):
    """The core batch with the perception block forced: each answered line's mask and depth PNGs in
    ``<out>/<line>/`` at its own image's size."""
    from perceptio_core.evaluation.infer import load_model

    picture(tmp_path / "a.png", 50, 36, 5)
    picture(tmp_path / "b.png", 28, 64, 6)
    (tmp_path / "q.jsonl").write_text("\n".join([
        json.dumps({"image": "a.png", "query": "the box"}), "nonsense",
        json.dumps({"image": "b.png", "query": "the box"})]) + "\n")
    model = load_model(model_dir)
    seen = []
    entries = infer_batch(model, read_queries(tmp_path / "q.jsonl", template="refer_seg"), tmp_path / "out",
                          response_prefix=FORCE, max_new_tokens=model.num_depth_tokens + 4,
                          on_result=seen.append)  # fmt: skip
    assert seen == entries == results(tmp_path / "out")
    assert entries[1]["error"] == "q.jsonl line 2: not JSON (Expecting value)"
    for e, size in ((entries[0], (50, 36)), (entries[2], (28, 64))):
        assert e["status"] == "ok" and e["model"] is None
        assert e["mask_png"] == str(tmp_path / "out" / str(e["line"]) / "mask.png")
        for key in ("mask_png", "overlay_png", "depth_png"):
            with Image.open(e[key]) as im:
                assert im.size == size, (key, e["line"])


def test_argument_errors(model_dir, tmp_path, capsys):
    img = picture(tmp_path / "a.png", 20, 20, 7)
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "query": "x"}) + "\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--image", str(img)], "--image needs --query"),
        (["--queries", str(tmp_path / "q.jsonl"), "--query", "x"], "--query goes with --image"),
        (["--image", str(tmp_path / "empty"), "--query", "x"], "nothing to answer"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert cli_main(["infer", "--model", str(model_dir), *extra, "--out", str(tmp_path / "o")]) == 2, extra
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # one of --image and --queries
        cli_main(["infer", "--model", str(model_dir), "--image", str(img), "--queries", str(tmp_path / "q.jsonl")])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()
