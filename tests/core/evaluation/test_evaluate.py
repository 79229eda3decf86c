"""Evaluators (SPEC §6) with fake predictors: hand-computed metrics per benchmark, honest counting,
the base comparison, the perception block rates, depth quality, progress, and the report."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from perceptio_core.config import DataConfig, EvaluateConfig
from perceptio_core.curation.curate import clean_expression as curate_clean_expression  # what curation uses
from perceptio_core.evaluation.report import metrics_table, write_report
from perceptio_core.evaluation.evaluate import (
    NO_POINTS,
    DepthQuality,
    block_status,
    format_mc_prompt,
    hardblink_prompt,
    refer_prompt,
    run_evaluation,
    spread,
    mcq_prompt,
    mme_prompt,
    token_depth_choice,
)
from perceptio_core.atomic_io import file_digest
from perceptio_core.data.image_io import MissingImageError
from perceptio_core.format.target import format_target
from perceptio_core.format.prompts import HARDBLINK_QUESTION, render_prompt
from perceptio_core.data.records import HardBlinkRecord, ImageRecord, McqRecord, MmeRecord, RefRecord, Sources
from perceptio_core.data.hardblink import read_hardblink
from perceptio_core.data.refer import ann_to_mask
from perceptio_core.data.sources import read_sources
from perceptio_core.depth.codec import DepthCodecSpec

SPEC = DepthCodecSpec(codebook_size=8, grid=2, map_size=16)  # the evaluated model's codec (fake)
N, K = SPEC.num_tokens, SPEC.codebook_size  # 4 depth tokens per block, 8 codes
W, H = 40, 30


def _png(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    return str(path)


def _box_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _ref(ds, split, ref_id, image_id, sentence, poly):
    return RefRecord(dataset=ds, split_by="unc", ref_id=ref_id, sent_id=ref_id * 10, ann_id=ref_id,
                     image_id=image_id, split=split, sentence=sentence, category_id=1, category="cube",
                     bbox=(0, 0, 1, 1), segmentation=poly, iscrowd=0, area=1.0)  # fmt: skip


@pytest.fixture()
def world(tmp_path):
    """Three images, refs on three datasets/splits (one train), HardBLINK 3 and 4, two multiple-choice
    benchmarks (one with a train row), MME existence on two images."""
    img = [_png(tmp_path / f"im{i}.png", i) for i in range(3)]
    depth = tmp_path / "im0.npy"
    yy, xx = np.mgrid[0:H, 0:W]
    np.save(depth, (1.0 + xx / W).astype(np.float32))  # metres: farther to the right
    recs = {i: ImageRecord(i, f"im{i}.png", img[i], W, H, "coco", str(depth) if i == 0 else None,
                           file_digest(img[i])) for i in range(3)}  # fmt: skip
    refs = [
        _ref("refcoco", "val", 1, 0, "the big cube.", _box_poly(0, 0, 30, 20)),
        _ref("refcoco", "val", 2, 1, "the tiny cube", _box_poly(1, 1, 3, 3)),
        _ref("refcoco", "testA", 3, 2, "left cube", _box_poly(0, 0, 10, 10)),
        _ref("refcoco", "train", 4, 0, "never evaluated", _box_poly(0, 0, 10, 10)),
        _ref("refcocog", "val", 5, 1, "a cube", _box_poly(4, 4, 14, 14)),
    ]
    hb = [
        HardBlinkRecord("3a", img[0], 3, ((5, 5), (20, 10), (35, 25)), ("A", "B", "C"), HARDBLINK_QUESTION, "(A)",
                        depth_path=str(depth)),
        HardBlinkRecord("3b", img[1], 3, ((5, 5), (20, 10), (35, 25)), ("A", "B", "C"), HARDBLINK_QUESTION, "(B)"),
        HardBlinkRecord("4a", img[2], 4, ((5, 5), (20, 10), (35, 25), (2, 28)), ("A", "B", "C", "D"),
                        HARDBLINK_QUESTION, "(C)"),
    ]
    opts = {"A": "dog", "B": "cat", "C": "cow", "D": "fish"}
    mcq = [
        McqRecord("1", img[0], "What animal is it?", opts, "B", category="Animal Recognition", benchmark="mmbench"),
        McqRecord("2", img[1], "Which animal swims?", opts, "D", hint="Look at the water.", category="water life",
                  benchmark="mmbench"),
        McqRecord("3", img[2], "What animal moos?", opts, "C", category="sounds", benchmark="seedbench"),
        McqRecord("4", img[2], "Trained on, never evaluated?", opts, "C", split="train", benchmark="mmbench"),
    ]
    yes_no = "Please answer yes or no."
    mme = [MmeRecord(f"existence/{i}/{k}", "existence", f"existence/{i}", img[i], f"Is there a {what}? {yes_no}", ans)
           for i in (0, 1) for k, (what, ans) in enumerate((("cube", "Yes"), ("cow", "No")), start=1)]
    src = Sources(root=str(tmp_path), coco_images=recs, refs=refs, hardblink=hb, mcq=mcq, mme=mme)
    return src, tmp_path


def _gt(src, ref_id):
    r = next(r for r in src.refs if r.ref_id == ref_id)
    im = src.coco_images[r.image_id]
    return ann_to_mask(r.segmentation, im.height, im.width).astype(bool)


def _block(seg=True, codes=(1, 2, 3, 4), answer=""):
    return format_target(seg, list(codes), answer)


class FakePerceptio:
    """Answers by prompt: the big cube right (mask = truth), the tiny cube without [SEG], etc."""

    def __init__(self, src):
        self.src = src
        self.calls = []
        self.teacher = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
        self.table = {
            refer_prompt("the big cube."): dict(mask=_gt(src, 1), raw=_block(True, answer="A big cube."), depth=True),
            refer_prompt("the tiny cube"): dict(mask=None, raw="A tiny cube.", depth=False),  # no [SEG]
            refer_prompt("left cube"): dict(mask=np.ones((H // 2, W // 2), bool), raw=_block(True), depth=True),
            refer_prompt("a cube"): dict(mask=_gt(src, 5)[::2, ::2], raw=_block(True, codes=(1, 2, 3)),
                                         depth=False),  # 3 codes: wrong count
            mcq_prompt(src.mcq[0]): dict(raw="B"),
            mcq_prompt(src.mcq[1]): dict(raw="It is a fish."),
            mcq_prompt(src.mcq[2]): dict(raw="(A) or (C)"),
            # MME: image 0 answers Yes twice (one wrong), image 1 both right
            **{(str(r.image_path), mme_prompt(r)): dict(raw="Yes" if r.image_key.endswith("/0") else f"{r.answer}.")
               for r in src.mme},
        }

    def __call__(self, image, prompt):
        self.calls.append((image, prompt))
        if prompt.startswith(HARDBLINK_QUESTION):
            img = Path(image).name
            ans = {"im0.png": "(A)", "im1.png": "(A) or (B)", "im2.png": "Point C"}[img]
            raw = _block(False, answer=ans)
            depth = self.teacher if img != "im1.png" else None
            return SimpleNamespace(text=ans, raw_text=raw, mask=None, depth_map=depth,
                                   depth_indices=[1, 2, 3, 4] if depth is not None else None)
        e = self.table.get((str(image), prompt)) or self.table[prompt]
        from perceptio_core.format.target import parse_generation

        p = parse_generation(e["raw"], N, K)
        return SimpleNamespace(text=p.answer, raw_text=e["raw"], mask=e.get("mask"),
                               depth_map=self.teacher if e.get("depth") else None, depth_indices=p.depth_indices)


def fake_base(image, prompt):
    text = "B" if "What animal is it?" in prompt else ("(B)" if prompt.startswith(HARDBLINK_QUESTION) else "no idea")
    return SimpleNamespace(text=text, mask=None, depth_map=None, depth_indices=None)


def test_prompts_match_training_templates():
    expr = " the big  cube. "
    assert refer_prompt(expr) == render_prompt("refer_seg", variant=0, expr=curate_clean_expression(expr))
    assert curate_clean_expression(expr) == "the big cube"
    assert hardblink_prompt(HARDBLINK_QUESTION) == render_prompt("depth_cot", variant=0,
                                                                 question=HARDBLINK_QUESTION)
    p = format_mc_prompt("What is it?", {"B": "dog", "A": "cat"}, hint="A pet.")
    assert p == ("A pet.\nWhat is it?\nA. cat\nB. dog\n"
                 "Answer with the option's letter from the given choices directly.")
    assert format_mc_prompt("Q?", {"A": "x", "B": "y"}) == render_prompt("vqa_mc", question="Q?", options="A. x\nB. y")


def test_spread_is_even_and_stable():
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread(list(range(4)), 0) == [0, 1, 2, 3] and spread(list(range(4)), 9) == [0, 1, 2, 3]


def test_all_benchmarks_hand_computed(world):
    src, tmp = world
    teacher_digest = src.coco_images[0].digest
    fake = FakePerceptio(src)
    loose = lambda image, prompt: SimpleNamespace(text="", raw_text="[SEG]<d_start><d_1>", mask=None,
                                                   depth_map=None, depth_indices=None)  # fmt: skip
    seen = []
    cfg = EvaluateConfig(unconstrained_limit=2, report_samples=1)
    ev = run_evaluation(fake, src, cfg, base_predict=fake_base, predict_unconstrained=loose,
                        teacher_maps={teacher_digest: fake.teacher}, depth_spec=SPEC,
                        progress=lambda d, t, info: seen.append((d, t, info["model"])))  # fmt: skip
    m = ev.metrics
    big, tiny = _gt(src, 1).sum(), _gt(src, 2).sum()
    # refcoco val: big cube perfect, tiny cube missed (no [SEG] -> empty mask, still counted)
    assert m["refcoco.val.ciou"] == pytest.approx(big / (big + tiny))
    assert m["refcoco.val.giou"] == pytest.approx(0.5)
    assert m["refcoco.val.p50"] == pytest.approx(0.5) and m["refcoco.val.n"] == 2
    # testA: a 15x20 all-ones mask resized to 30x40 = whole image vs a 10x10 box
    gt3 = _gt(src, 3)
    assert m["refcoco.testA.ciou"] == pytest.approx(gt3.sum() / (H * W))
    # refcocog val: prediction at half size, resized (nearest) back: exact for an even box
    assert m["refcocog.val.ciou"] == pytest.approx(1.0)
    assert not any(k.startswith("refcoco.train") for k in m) and "refcoco+.val.ciou" not in m
    # HardBLINK: 3 points 1/2 (two labels = wrong), 4 points 1/1; mean over counts
    assert m["hardblink.3.accuracy"] == 0.5 and m["hardblink.4.accuracy"] == 1.0
    assert m["hardblink.mean.accuracy"] == 0.75
    # multiple choice: mmbench 2/2 (a letter, an option text; its train row left out), seedbench 0/1
    # (two letters); per category
    assert m["mcq.mmbench.accuracy"] == 1.0 and m["mcq.mmbench.n"] == 2
    assert m["mcq.seedbench.accuracy"] == 0.0 and m["mcq.seedbench.n"] == 1
    assert m["mcq.mmbench.category.animal_recognition.accuracy"] == 1.0
    assert m["mcq.mmbench.category.water_life.n"] == 1 and m["mcq.seedbench.category.sounds.accuracy"] == 0.0
    # MME existence: 3 of 4 questions right, 1 of 2 images both right -> 100 * (0.75 + 0.5)
    assert m["mme.existence.acc"] == 0.75 and m["mme.existence.acc_plus"] == 0.5
    assert m["mme.existence.score"] == 125.0 and m["mme.perception.score"] == 125.0 and m["mme.existence.n"] == 4
    # perception block: refer ok, no_block, ok, wrong_count; HardBLINK depth-only blocks are ok
    assert ev.block_status["constrained"] == {"ok": 5, "no_block": 1, "wrong_count": 1}
    assert m["perception_block.wellformed"] == pytest.approx(5 / 7) and m["perception_block.n"] == 7
    assert m["perception_block.wellformed_unconstrained"] == 0.0 and m["perception_block.n_unconstrained"] == 2
    assert ev.block_status["unconstrained"] == {"missing_end": 2}
    # depth: teacher known for image 0 (refer big cube, HardBLINK 3a): the map equals the teacher
    assert m["depth.teacher.n"] == 2 and m["depth.teacher.mse"] == pytest.approx(0.0, abs=1e-6)
    assert m["depth.teacher.delta1"] == 1.0 and m["depth.teacher.coverage"] == 1.0
    assert m["depth.teacher.pair_order"] == 1.0
    # true depth known for image 0 (big cube, train excluded) and HardBLINK 3a
    assert m["depth.true.n"] == 2 and 0 <= m["depth.true.delta1"] <= 1
    assert "depth.teacher_on_true.absrel" in m
    # base: text only -> empty masks, cIoU 0; its answers parsed the same way
    assert m["base.refcoco.val.ciou"] == 0.0 and m["base.refcocog.val.giou"] == 0.0
    assert m["base.hardblink.3.accuracy"] == 0.5 and m["base.hardblink.4.accuracy"] == 0.0
    assert m["base.mcq.mmbench.accuracy"] == 0.5 and m["base.mcq.seedbench.accuracy"] == 0.0
    assert m["base.mme.existence.acc"] == 0.5 and m["base.mme.existence.acc_plus"] == 0.0  # "no idea" -> "No"
    assert not any(k.startswith("base.perception_block") or k.startswith("base.depth") for k in m)
    # progress: every generation once, totals known up front: (7 + 3 MCQ + 4 MME) for the model, the
    # same but the 4 referring prompts for the base (no [SEG]: not asked), 2 unconstrained
    assert [d for d, _, _ in seen] == list(range(1, 27)) and {t for _, t, _ in seen} == {26}
    assert [x for _, _, x in seen].count("base") == 10
    assert ev.notes["base.refer"].startswith("not generated: the base has no [SEG]")
    # prompts: the refer/hardblink/VQA prompts, never the train split
    assert not any("never evaluated" in p.lower() for _, p in fake.calls)
    # kept samples: at most one right and one wrong per benchmark, with the base's answer filled in
    kinds = [(s.benchmark, s.correct) for s in ev.shown]
    assert len(kinds) == len(set(kinds)) and ("refer", True) in kinds and ("refer", False) in kinds
    assert all(s.base_answer is not None for s in ev.shown)


def test_token_depth_reads_the_decoded_map(world):
    dmap = np.zeros((10, 10), np.float32)
    dmap[:, 8:] = 1.0  # the right edge is nearest
    pts, labels = ((5, 5), (38, 5), (20, 20)), ("A", "B", "C")
    assert token_depth_choice(dmap, pts, labels, (H, W)) == "B"
    assert token_depth_choice(None, pts, labels, (H, W)) is None


def test_depth_quality_flat_map_when_no_block():
    teacher = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    dq = DepthQuality(n_pairs=500)
    dq.add(teacher, teacher, None)
    dq.add(None, teacher, None)  # no block: a flat map, not dropped
    r = dq.result()
    assert r["depth.teacher.n"] == 2 and r["depth.teacher.coverage"] == 0.5
    assert r["depth.teacher.pair_order"] == pytest.approx(0.5)  # 1.0 and 0.0 (ties are wrong)
    assert "depth.true.n" not in r


def test_block_status_sources():
    ok = _block(True)
    assert block_status(SimpleNamespace(raw_text=ok), True, SPEC) == "ok"
    assert block_status(SimpleNamespace(raw_text=_block(False)), True, SPEC) == "no_seg"
    assert block_status(SimpleNamespace(raw_text=_block(False)), False, SPEC) == "ok"
    # N and K are the given codec's: the same block is the wrong length for N = 9, out of range for K = 2
    assert block_status(SimpleNamespace(raw_text=ok), True, DepthCodecSpec(8, 3, 16)) == "wrong_count"
    assert block_status(SimpleNamespace(raw_text=ok), True, DepthCodecSpec(2, 2, 16)) == "bad_code"
    assert block_status(SimpleNamespace(status="no_seg"), False, SPEC) == "ok"
    assert block_status(SimpleNamespace(status="wrong_count"), True, SPEC) == "wrong_count"
    assert block_status(SimpleNamespace(depth_indices=[1], mask=None), True, SPEC) == "no_seg"
    assert block_status(SimpleNamespace(depth_indices=None), False, SPEC) == "no_block"


def test_unreadable_image_scores_wrong_not_dropped(world):
    src, _ = world

    def broken(image, prompt):
        raise MissingImageError(str(image), "missing image")

    cfg = EvaluateConfig(refer=False, hardblink=False)
    ev = run_evaluation(broken, src, cfg, depth_spec=SPEC)
    assert ev.metrics["mcq.mmbench.accuracy"] == 0.0 and ev.metrics["mcq.mmbench.n"] == 2
    assert ev.metrics["mme.existence.score"] == 0.0 and ev.metrics["mme.existence.n"] == 4
    assert len(ev.errors) == 7 and "missing image" in ev.errors[0]


def test_limits_apply_per_split(world):
    src, _ = world
    cfg = EvaluateConfig(refer_limit=1, hardblink_limit=1, mcq_limit=1, mme_limit=1, refer_datasets=["refcoco"])
    m = run_evaluation(FakePerceptio(src), src, cfg, depth_spec=SPEC).metrics
    assert m["refcoco.val.n"] == 1 and m["refcoco.testA.n"] == 1 and "refcocog.val.n" not in m
    assert m["hardblink.3.n"] == 1 and m["mcq.mmbench.n"] == 1 and m["mcq.seedbench.n"] == 1
    assert m["mme.existence.n"] == 2  # one image, both its questions


def test_report_tables_and_pictures(world):
    src, tmp = world
    out = tmp / "report"
    ev = run_evaluation(FakePerceptio(src), src, EvaluateConfig(report_samples=1), base_predict=fake_base,
                        depth_spec=SPEC)  # fmt: skip
    write_report(ev, out)
    metrics = ev.metrics
    md = (out / "report.md").read_text()
    assert "| refcoco | val | ciou | " in md and "| refcoco | val | n | 2 |  | 2 |  |  |  |  |" in md
    assert "| hardblink | mean | accuracy | 0.750 |" in md
    assert "| perception_block |  | wellformed |" in md
    pngs = sorted((out / "figures").glob("*.png"))
    assert pngs and all(f"figures/{p.name}" in md for p in pngs)
    assert {"refer_right_0.png", "refer_wrong_0.png", "hardblink_right_0.png"} <= {p.name for p in pngs}
    with Image.open(pngs[0]) as im:
        assert im.width > 400
    table = metrics_table(metrics)
    row = next(line for line in table.splitlines() if line.startswith("| refcoco | val | ciou"))
    assert row.endswith(f"| {metrics['refcoco.val.ciou']:.3f} |  | 0.000 |  | +{metrics['refcoco.val.ciou']:.3f} |  |  |")
    with_ci = metrics_table(metrics, ev.intervals, ev.differences)
    row = next(line for line in with_ci.splitlines() if line.startswith("| hardblink | 4 | accuracy"))
    assert row == "| hardblink | 4 | accuracy | 1.000 | 0.21-1.00 | 0.000 | 0.00-0.79 | +1.000 | 1.00-1.00 | beyond noise |"
    assert "| mcq | mmbench | accuracy | 1.000 | 0.34-1.00 | 0.500 | 0.09-0.91 | +0.500 | 0.00-1.00 | within noise |" in md


def test_tiny_world_perfect_predictor_scores_one(tiny_world, tmp_path):
    """The real readers on the synthetic world; a predictor that returns the truth scores 1.0."""
    src = read_sources(tiny_world, DataConfig(), cache_dir=tmp_path / "cache")
    truth = {(src.coco_images[r.image_id].path, refer_prompt(r.sentence)): r for r in src.refs if r.split != "train"}
    hb = {r.image_path: r.answer for r in src.hardblink}
    mcq = {mcq_prompt(r): r.answer for r in src.mcq}
    mme = {(r.image_path, mme_prompt(r)): r.answer for r in src.mme}

    def oracle(image, prompt):
        if (str(image), prompt) in truth:
            r = truth[(str(image), prompt)]
            im = src.coco_images[r.image_id]
            return SimpleNamespace(text="x", mask=ann_to_mask(r.segmentation, im.height, im.width), depth_map=None,
                                   depth_indices=None)  # fmt: skip
        text = hb.get(str(image)) or mme.get((str(image), prompt)) or mcq[prompt]
        return SimpleNamespace(text=text, mask=None, depth_map=None, depth_indices=None)

    m = run_evaluation(oracle, src, EvaluateConfig(refer_limit=5, mcq_limit=0), depth_spec=SPEC).metrics
    refer_keys = [k for k in m if k.endswith(".giou")]
    assert {k.split(".")[0] for k in refer_keys} == {"refcoco", "refcoco+", "refcocog"}
    assert {k.split(".")[1] for k in refer_keys} == {"val", "testA", "testB", "test"}
    # an expression repeated on one image (ambiguous: curation filters those) may name another object
    assert all(m[k] >= 0.9 for k in refer_keys), {k: m[k] for k in refer_keys}
    assert m["hardblink.mean.accuracy"] == 1.0 and {m[f"hardblink.{n}.n"] for n in (3, 4, 5)} == {2.0}
    assert all(m[k] == 1.0 for k in m if k.startswith("mcq.") and k.endswith(".accuracy"))
    assert m["mcq.mmbench.n"] == 6  # the world's dev rows
    assert m["mme.perception.score"] == 800.0 and m["mme.count.n"] == 4  # 4 subtasks x 200
    assert not math.isnan(m["perception_block.wellformed"])


def test_public_hardblink_scores_text_and_skips_the_depth_token_diagnostic(public_hardblink, tmp_path):
    """AURORA's layout (no point coordinates): the letters are read off answers to the public texts,
    the "answer from the decoded depth tokens" diagnostic is left out and the report says why."""
    hb = read_hardblink(public_hardblink)
    assert hb.quarantine == []
    by_image = {r.image_path: r for r in hb.records}

    def predict(image, prompt):
        r = by_image[str(image)]
        assert prompt == hardblink_prompt(r.question) and "(A) A" in prompt  # the options go to the model
        # 3 points: the letter in a sentence (right); 4: the options echoed, several letters (wrong); 5: bare letter
        text = {3: f"The closest point is {r.answer}.", 4: r.question, 5: r.answer.strip("()")}[r.n_points]
        return SimpleNamespace(text=text, mask=None, depth_map=np.ones((4, 4), np.float32), depth_indices=[0] * N)

    ev = run_evaluation(predict, Sources(root=str(public_hardblink), hardblink=hb.records), depth_spec=SPEC)
    m = ev.metrics
    assert (m["hardblink.3.accuracy"], m["hardblink.4.accuracy"], m["hardblink.5.accuracy"]) == (1.0, 0.0, 1.0)
    assert m["hardblink.mean.accuracy"] == pytest.approx(2 / 3) and m["hardblink.5.n"] == 3
    assert not [k for k in m if "token_depth" in k]
    assert ev.notes == {"hardblink.depth_tokens.skipped": NO_POINTS} == {
        "hardblink.depth_tokens.skipped": "no point coordinates in the public release"}
    md = write_report(ev, tmp_path / "report").read_text()
    assert "## Notes\n\n- `hardblink.depth_tokens.skipped`: no point coordinates in the public release" in md
    assert "| hardblink | 3 | accuracy | 1.000 |" in md and "token_depth" not in md


def test_world_hardblink_runs_the_depth_token_diagnostic(tiny_world, tmp_path):
    """With the world's points file the diagnostic runs: a map that is the true disparity names the
    nearest point every time, whatever the text says; records without points are left out of it."""
    cfg = DataConfig(refer_datasets=[], ade20k="", mcq={}, mme="", captions="", llava_json=None, glamm_json=None)
    src = read_sources(tiny_world, cfg, cache_dir=tmp_path / "cache")
    assert len(src.hardblink) == 6 and all(r.points for r in src.hardblink)

    def predict(image, prompt):
        r = next(r for r in src.hardblink if r.image_path == str(image))
        disparity = 1.0 / np.load(r.depth_path)
        return SimpleNamespace(text="no idea", mask=None, depth_map=disparity, depth_indices=[0] * N)

    ev = run_evaluation(predict, src, depth_spec=SPEC)
    m = ev.metrics
    assert all(m[f"hardblink.{n}.token_depth"] == 1.0 for n in (3, 4, 5)) and m["hardblink.mean.token_depth"] == 1.0
    assert m["hardblink.mean.accuracy"] == 0.0 and ev.notes == {}
    # some questions without points: the diagnostic covers the others and the notes say so
    partial = [dataclasses.replace(r, points=()) if r.qid in ("3pt/0", "5pt/0", "5pt/1") else r for r in src.hardblink]
    ev = run_evaluation(predict, Sources(root=src.root, hardblink=partial), depth_spec=SPEC)
    assert ev.metrics["hardblink.3.token_depth"] == 1.0 and "hardblink.5.token_depth" not in ev.metrics
    assert ev.notes == {"hardblink.3.token_depth": "over the 1 of 2 questions that have point coordinates",
                        "hardblink.depth_tokens.skipped": f"{NO_POINTS} (point counts 5)"}


def test_intervals_invalid_rates_baselines_and_differences(world):
    """Every accuracy gets its Wilson interval, cIoU/gIoU their bootstrap ones, the differences to
    the base their paired intervals; unreadable answers are counted (and scored wrong)."""
    from perceptio_core.evaluation.stats import proportion, wilson_interval

    src, _ = world
    ev = run_evaluation(FakePerceptio(src), src, EvaluateConfig(bootstrap=200), base_predict=fake_base,
                        depth_spec=SPEC)  # fmt: skip
    m, ci, d = ev.metrics, ev.intervals, ev.differences
    assert ci["hardblink.3.accuracy"] == proportion(1, 2)
    assert (ci["hardblink.3.accuracy"].lo, ci["hardblink.3.accuracy"].hi) == wilson_interval(1, 2)
    assert ci["hardblink.mean.accuracy"] == proportion(2, 3)  # pooled over the 3 questions
    assert ev.samples["hardblink.3.accuracy"] == [1, 0] and ev.samples["base.hardblink.3.accuracy"] == [0, 1]
    # "(A) or (B)" and "(A) or (C)" name two letters: unreadable, counted, scored wrong
    assert m["hardblink.3.invalid"] == 0.5 and m["hardblink.4.invalid"] == 0.0 and m["mcq.seedbench.invalid"] == 1.0
    assert m["refcoco.val.no_mask"] == 0.5 and m["base.refcoco.val.no_mask"] == 1.0
    assert m["hardblink.3.chance"] == pytest.approx(1 / 3) and m["hardblink.3.majority"] == 0.5
    assert m["hardblink.mean.chance"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert m["mcq.mmbench.chance"] == 0.25 and m["mcq.mmbench.majority"] == 0.5
    # refcoco val: 2 expressions; its cIoU interval holds the value; base has empty masks
    assert ci["refcoco.val.ciou"].n == 2 and ci["refcoco.val.ciou"].lo <= m["refcoco.val.ciou"] <= ci["refcoco.val.ciou"].hi
    assert d["refcoco.val.ciou"].value == pytest.approx(m["refcoco.val.ciou"])
    assert d["mcq.mmbench.accuracy"].value == 0.5 and d["hardblink.4.accuracy"].value == 1.0
    assert d["mme.existence.acc"].value == pytest.approx(0.75 - 0.5)
    assert "base.mcq.mmbench.accuracy" not in d and "mcq.mmbench.n" not in ci
    assert ci["refcoco.val.p50"] == proportion(1, 2) and d["refcoco.val.p50"].value == 0.5
    assert ci["hardblink.3.token_depth"].n == 2 and ci["hardblink.mean.token_depth"].n == 3


class _Killed(Exception):
    """The process "dies" (the predictor stops the evaluation where it is)."""


class _Counting:
    """A predictor that counts its calls and can be told to die after ``die_after`` of them."""

    def __init__(self, inner, die_after=None):
        self.inner, self.die_after, self.calls = inner, die_after, 0

    def __call__(self, image, prompt):
        if self.die_after is not None and self.calls >= self.die_after:
            raise _Killed("killed")
        self.calls += 1
        return self.inner(image, prompt)


def test_a_killed_evaluation_resumes_from_its_cache_with_the_same_metrics(world, tmp_path):
    from perceptio_core.evaluation.predictions import PredictionCache

    src, _ = world
    cfg = EvaluateConfig(unconstrained_limit=0)
    plain = run_evaluation(FakePerceptio(src), src, cfg, base_predict=fake_base, depth_spec=SPEC)
    cache_dir = tmp_path / "predictions"
    killed = _Counting(FakePerceptio(src), die_after=9)
    with pytest.raises(_Killed):
        run_evaluation(killed, src, cfg, base_predict=fake_base, depth_spec=SPEC, cache=PredictionCache(cache_dir))
    assert len(PredictionCache(cache_dir)) == 9  # what was done before the kill is on disk
    again = _Counting(FakePerceptio(src))
    base = _Counting(fake_base)
    ev = run_evaluation(again, src, cfg, base_predict=base, depth_spec=SPEC, cache=PredictionCache(cache_dir))
    assert again.calls == 14 - 9 and base.calls == 10  # 7 refer/HardBLINK + 3 MCQ + 4 MME; the base no refer
    assert ev.metrics.keys() == plain.metrics.keys()
    for k, v in plain.metrics.items():
        assert ev.metrics[k] == pytest.approx(v, abs=2e-3, nan_ok=True), k  # depth maps kept as float16
    # everything cached: a re-score generates nothing and gives the same metrics
    idle = _Counting(FakePerceptio(src), die_after=0)
    rescored = run_evaluation(idle, src, cfg, base_predict=_Counting(fake_base, die_after=0), depth_spec=SPEC,
                              cache=PredictionCache(cache_dir))
    assert rescored.metrics == ev.metrics and rescored.timings["perceptio.from_cache"] == 14


def test_data_parallel_shares_split_the_work_and_agree(world, tmp_path):
    """Two ranks (threads here, meeting at a barrier as torch.distributed processes do) generate
    disjoint shares through one shared cache and both compute the single-process metrics."""
    import threading

    from perceptio_core.evaluation.predictions import PredictionCache

    src, _ = world
    cfg = EvaluateConfig(unconstrained_limit=0, batch_size=2)
    single = run_evaluation(FakePerceptio(src), src, cfg, base_predict=fake_base, depth_spec=SPEC,
                            cache=PredictionCache(tmp_path / "one"))
    meet = threading.Barrier(2, timeout=60)
    preds = [_Counting(FakePerceptio(src)), _Counting(FakePerceptio(src))]
    bases = [_Counting(fake_base), _Counting(fake_base)]
    results: list = [None, None]
    errors: list = []

    def rank(r):
        try:
            results[r] = run_evaluation(preds[r], src, cfg, base_predict=bases[r], depth_spec=SPEC, world=(r, 2),
                                        cache=PredictionCache(tmp_path / "two", rank=r), barrier=meet.wait)
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(repr(e))
            meet.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results[0] is not None and results[1] is not None
    assert results[0].metrics == results[1].metrics == single.metrics
    # split, not repeated: each benchmark split in turn (rank 0 takes the odd one out of each)
    assert sorted([preds[0].calls, preds[1].calls]) == [5, 9]
    assert bases[0].calls + bases[1].calls == 10
    with pytest.raises(ValueError, match="needs a prediction cache and a barrier"):
        run_evaluation(FakePerceptio(src), src, cfg, depth_spec=SPEC, world=(0, 2))


def test_the_base_is_asked_the_referring_prompts_only_when_told(world):
    src, _ = world
    asked = _Counting(fake_base)
    m = run_evaluation(FakePerceptio(src), src, EvaluateConfig(base_refer=True, hardblink=False, mcq=False, mme=False),
                       base_predict=asked, depth_spec=SPEC).metrics
    assert asked.calls == 4 and m["base.refcoco.val.ciou"] == 0.0 and m["base.refcoco.val.no_mask"] == 1.0
