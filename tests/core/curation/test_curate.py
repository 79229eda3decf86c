"""Sources into samples (SPEC §5, §6): the synthetic world through ``read_sources``, fake depth
tokens, and hand-made records for every filter; then shards, manifest, quarantine and resume."""

import io
import json
import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from perceptio_core.format.prompts import hardblink_text
from perceptio_core.config import CurateConfig, DataConfig, SynthConfig
from perceptio_core.curation.curate import curate, iter_samples
from perceptio_core.curation.inputs import (
    REASON_EVAL_OVERLAP,
    REASON_NO_DEPTH_TOKENS,
    CurateStats,
    DepthTokensMismatch,
    check_depth_tokens,
)
from perceptio_core.curation.filters import (
    REASON_AMBIGUOUS,
    REASON_AMBIGUOUS_SAME_SENTENCE,
    REASON_NEAR_DUPLICATE,
    REASON_SMALL_MASK,
)
from perceptio_core.data.masks import decode_mask, encode_mask, resize_nearest
from perceptio_core.format.target import ParseStatus, parse_generation
from perceptio_core.data.records import ImageRecord, RefRecord, Sources
from perceptio_core.data.refer import ann_to_mask
from perceptio_core.atomic_io import bytes_digest
from perceptio_core.curation.sample import sample_json
from perceptio_core.curation.shards import read_shards, verify_read_back
from perceptio_core.data.sources import read_sources
from perceptio_core.world.synth import generate_world

K, N, S = 16, 9, 16
UPSTREAM = {"sources": "src-key", "tokenize_depth": "tok-key"}
CODEBOOK = dict(num_tokens=N, codebook_size=K, tokens_source="tok/tokens.npy")  # the codebook's N and K


# ------------------------------------------------------------------------------------------
# the synthetic world through the real readers
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "w"
    generate_world(root, SynthConfig(images=16, ade_images=4, hardblink_per_count=1, vqa_questions=2,
                                     width=128, height=96, seed=0))  # fmt: skip
    src = read_sources(root, DataConfig(), cache_dir=root.parent / "cache")
    # fake depth tokens (random ints per digest) and teacher maps from the true depth (inverse, [0, 1])
    rng = np.random.default_rng(0)
    tokens, maps = {}, {}
    for rec in src.depth_images():
        inv = 1.0 / np.load(rec.depth_path)
        maps[rec.digest] = resize_nearest((inv - inv.min()) / (inv.max() - inv.min()), S, S).astype(np.float32)
        tokens[rec.digest] = rng.integers(0, K, N)
    return src, tokens, maps


def _run(src, tokens, maps, cfg=None, **kw):
    stats = CurateStats()
    samples = list(iter_samples(src, tokens, maps, cfg or CurateConfig(), UPSTREAM, stats, **kw))
    return samples, stats


def test_world_samples_are_well_formed(world):
    src, tokens, maps = world
    samples, stats = _run(src, tokens, maps)
    tasks = {s.task for s in samples}
    assert tasks == {"refer_seg", "semantic_seg", "depth_cot"}
    assert len({s.key for s in samples}) == len(samples)
    assert stats.n_samples == len(samples) and stats.to_dict()["samples_total"] == len(samples)
    refs = {(r.dataset, r.ref_id, r.sent_id): r for r in src.refs}
    for s in samples:
        assert s.split == "train" and s.upstream == UPSTREAM
        assert s.depth_tokens == tokens[s.image_digest].tolist()
        p = parse_generation(s.target, N, K, expect_seg=s.task != "depth_cot")
        assert p.status == ParseStatus.OK and p.depth_indices == s.depth_tokens and p.answer == s.answer
        assert p.has_seg is (s.task != "depth_cot")
        if s.task == "refer_seg":  # one image, its expressions as rounds, one mask per round
            rounds = s.meta["rounds"]
            assert 1 <= len(rounds) <= CurateConfig().refer_rounds_per_sample[1]
            assert len(s.masks_rle) == len(rounds) == len(s.turns)
            img = src.coco_images[s.meta["image_id"]]
            assert s.image == Path(img.path).read_bytes() and s.image_digest == img.digest
            for j, ((prompt, target), rd) in enumerate(zip(s.turns, rounds)):
                r = refs[(s.source, rd["ref_id"], rd["sent_id"])]
                assert r.image_id == img.image_id
                assert np.array_equal(decode_mask(s.masks_rle[j]), ann_to_mask(r.segmentation, img.height, img.width) > 0)
                assert r.category in rd["answer"] and rd["answer"].endswith(".") and r.sentence.rstrip(".") in prompt
                if j:  # later rounds: [SEG] and the description, no depth block
                    pj = parse_generation(target, N, K)
                    assert target.startswith("[SEG] ") and pj.status == ParseStatus.NO_BLOCK
                    assert pj.n_seg == 1 and pj.answer == rd["answer"]
            assert s.answer == rounds[0]["answer"]
        if s.task == "depth_cot":
            assert s.masks_rle == [] and 2 <= s.meta["n_points"] <= 5 and s.prompt.startswith("Multiple points")
            # asked as the evaluation asks it: the question with its options (format.prompts.hardblink_text)
            assert hardblink_text(s.meta["labels"]) in s.prompt
            tmap = maps[s.image_digest]
            h, w = np.asarray(Image.open(io.BytesIO(s.image))).shape[:2]
            vals = [tmap[int((y + 0.5) * S / h), int((x + 0.5) * S / w)] for x, y in s.meta["points"]]
            assert s.answer == f"({'ABCDE'[int(np.argmax(vals))]})"
            diffs = [abs(a - b) for i, a in enumerate(vals) for b in vals[i + 1 :]]
            assert min(diffs) >= CurateConfig().depth_cot_margin - 1e-6
            pts = np.array(s.meta["points"], float)
            d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)) + np.eye(len(pts)) * 1e9
            assert d.min() >= CurateConfig().min_point_distance
    # deterministic: the same inputs give the same bytes
    again, _ = _run(src, tokens, maps)
    assert [sample_json(s) + s.image for s in again] == [sample_json(s) + s.image for s in samples]


def test_refer_is_one_multi_round_sample_per_training_image(world):
    """SPEC §5: RefCOCO/+/g give one sample per training image of each dataset, up to
    ``refer_rounds_per_sample`` of its expressions as rounds (objects round-robin)."""
    from perceptio_core.curation.curate import refer_round_count
    from perceptio_core.curation.filters import NearDuplicateFilter

    src, tokens, maps = world
    cfg = CurateConfig(tasks=["refer_seg"], ambiguity_filter=False, dedup_jaccard=1.0, min_mask_area=1)
    samples, stats = _run(src, tokens, maps, cfg)
    sents: dict = {}  # the expressions each training image keeps (only word-for-word repeats drop here)
    dedup: dict = {}
    for r in sorted(src.refs, key=lambda r: (r.ref_id, r.sent_id)):
        k = (r.dataset, r.split_by, r.image_id)
        if r.split == "train" and dedup.setdefault(k, NearDuplicateFilter(1.0)).keep(r.ann_id, r.sentence):
            sents.setdefault(k, []).append(r)
    assert len(samples) == len(sents) == sum(n for (_, split), n in stats.samples.items() if split == "train")
    assert {(s.source, s.meta["split_by"], s.meta["image_id"]) for s in samples} == set(sents)
    lo, hi = cfg.refer_rounds_per_sample
    n_rounds = []
    for s in samples:
        rs = sents[(s.source, s.meta["split_by"], s.meta["image_id"])]
        want = min(len(rs), refer_round_count(cfg, s.source, s.meta["split_by"], s.meta["image_id"]))
        assert len(s.turns) == len(s.masks_rle) == want and 1 <= want <= hi
        if len(rs) >= lo:
            assert want >= lo
        # round robin: the first rounds are different objects as long as there are any left
        objs = [rd["ann_id"] for rd in s.meta["rounds"]]
        assert len(set(objs[: len({r.ann_id for r in rs})])) == min(len(objs), len({r.ann_id for r in rs}))
        n_rounds.append(want)
        # the depth block once, in round 1
        assert sum(t.count("<d_start>") for _, t in s.turns) == 1 and s.turns[0][1].startswith("[SEG]<d_start>")
    assert max(n_rounds) >= lo  # the world has images with enough expressions
    skipped = sum(len(sents[k]) for k in sents) - sum(n_rounds)
    assert stats.skipped["over refer rounds per sample"] == skipped
    # the summary sets each source beside the paper's count
    pc = stats.to_dict()["paper_counts"]
    assert pc["refcoco"]["paper"] == 17_000 and pc["refcocog"]["paper"] == 22_000
    assert pc["refcoco"]["train"] == stats.samples[("refcoco", "train")]


def test_missing_depth_tokens_are_dropped_and_counted(world):
    src, tokens, maps = world
    victim = sorted({r.image_id for r in src.refs if r.split == "train"})[0]
    digest = src.coco_images[victim].digest
    tokens = {d: t for d, t in tokens.items() if d != digest}
    samples, stats = _run(src, tokens, maps)
    assert all(s.image_digest != digest for s in samples)
    assert stats.dropped[REASON_NO_DEPTH_TOKENS] > 0


@pytest.mark.parametrize("num_tokens, codebook_size, what", [
    (16, K, "9 codes"),  # tokens of a 3 x 3 grid against a 4 x 4 codebook
    (N, 8, "codes in"),  # codes up to 15 against K = 8
])
def test_tokens_of_another_codebook_are_refused(world, tmp_path, num_tokens, codebook_size, what):
    src, tokens, maps = world
    with pytest.raises(DepthTokensMismatch, match=rf"tok/tokens\.npy: the depth tokens of \d+ of {len(tokens)} "
                                                  rf"images .*N = {num_tokens} codes in \[0, {codebook_size}\).*{what}"):
        curate(src, tokens, maps, CurateConfig(), UPSTREAM, tmp_path / "c", num_tokens=num_tokens,
               codebook_size=codebook_size, tokens_source="tok/tokens.npy")
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_check_depth_tokens_names_the_first_misfit(world):
    _, tokens, _ = world
    one_bad = dict(tokens)
    one_bad[next(iter(tokens))] = np.append(tokens[next(iter(tokens))], 0)
    with pytest.raises(DepthTokensMismatch, match=f"1 of {len(tokens)} images.*10 codes"):
        check_depth_tokens(one_bad, N, K, "tok/tokens.npy")
    check_depth_tokens(tokens, N, K, "tok/tokens.npy")  # the right codebook: no error


def test_curate_writes_shards_manifest_quarantine_and_resumes(world, tmp_path):
    src, tokens, maps = world
    cfg = CurateConfig(shard_max_samples=40)
    ref = curate(src, tokens, maps, cfg, UPSTREAM, tmp_path / "a", **CODEBOOK)
    rows = pq.read_table(ref.manifest).to_pylist()
    back = list(read_shards(ref.shard_paths()))
    expected, _ = _run(src, tokens, maps, cfg)
    assert [s.key for s in back] == [r["key"] for r in rows] == [s.key for s in expected]
    assert [sample_json(s) for s in back] == [sample_json(s) for s in expected]
    assert verify_read_back(ref.out_dir) == ref.n_samples == len(expected)
    json.dumps(ref.to_dict())  # JSON-able summary for the artifact manifest
    q = pq.read_table(ref.quarantine).to_pylist()
    assert len(q) == ref.n_quarantined == len(src.quarantine) + ref.stats["dropped_total"]

    class Killed(Exception):
        pass

    class KillingTokens(dict):
        """Raises after n lookups: a run killed mid-stream, after some shards are complete."""

        def __init__(self, data, n):
            super().__init__(data)
            self.n = n

        def get(self, key, default=None):
            self.n -= 1
            if self.n < 0:
                raise Killed
            return super().get(key, default)

    with pytest.raises(Killed):
        curate(src, KillingTokens(tokens, 40), maps, cfg, UPSTREAM, tmp_path / "b", **CODEBOOK)
    assert not (tmp_path / "b" / "manifest.parquet").exists()
    res = curate(src, tokens, maps, cfg, UPSTREAM, tmp_path / "b", **CODEBOOK)
    assert res.n_resumed > 0 and res.stats == ref.stats

    def digests(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).glob("*.tar"))}

    assert digests(tmp_path / "b") == digests(tmp_path / "a")
    assert pq.read_table(res.manifest).equals(pq.read_table(ref.manifest))


# ------------------------------------------------------------------------------------------
# hand-made records for each filter
# ------------------------------------------------------------------------------------------


def _png(path, w=64, h=48, seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    data = Path(path).read_bytes()
    return data, bytes_digest(data)


def _box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _ref(ref_id, ann_id, sentence, image_id=1, split="train", seg=None, attributes=None, sent_id=None):
    return RefRecord(
        dataset="refcoco", split_by="unc", ref_id=ref_id, sent_id=ref_id if sent_id is None else sent_id,
        ann_id=ann_id, image_id=image_id, split=split, sentence=sentence, category_id=1, category="cup",
        bbox=(0, 0, 1, 1), segmentation=seg or _box(4 + ann_id % 5 * 10, 4, 12 + ann_id % 5 * 10, 20),
        iscrowd=0, area=1.0, attributes=attributes or {"colour": "red"},
    )


def test_hand_made_filters(tmp_path):
    _, d1 = _png(tmp_path / "1.png", seed=1)
    _, d2 = _png(tmp_path / "2.png", seed=2)
    _, d3 = _png(tmp_path / "3.png", seed=3)
    images = {
        i: ImageRecord(i, f"{i}.png", str(tmp_path / f"{i}.png"), 64, 48, "coco", digest=d)
        for i, d in ((1, d1), (2, d2), (3, d3))
    }
    refs = [
        _ref(1, 10, "red cup"),  # ambiguous: two red cups, nothing beyond (cup, red)
        _ref(2, 11, "red cup on the left"),  # kept
        _ref(3, 11, "the red cup, on the left!"),  # near-duplicate of ref 2 (same object)
        _ref(4, 12, "tiny cup", seg=_box(1, 1, 3, 3), attributes={"colour": "blue"}),  # degenerate mask
        _ref(5, 20, "mug", image_id=2), _ref(6, 21, "mug", image_id=2, attributes={"colour": "blue"}),  # same words
        _ref(7, 30, "cup near the plate", image_id=3),  # no depth tokens for image 3
        _ref(8, 40, "blue cup", image_id=2, split="val", attributes={"colour": "blue"}),  # not selected
    ]
    src = Sources(root=str(tmp_path), coco_images=images, refs=refs)
    tokens = {d1: np.arange(N) % K, d2: np.arange(N) % K}
    cfg = CurateConfig(tasks=["refer_seg"], min_mask_area=16)
    samples, stats = _run(src, tokens, None, cfg)
    assert [[rd["ref_id"] for rd in s.meta["rounds"]] for s in samples] == [[2]]
    assert "distance" not in samples[0].answer and "camera" not in samples[0].answer  # no teacher map
    assert dict(stats.dropped) == {
        REASON_AMBIGUOUS: 1, REASON_NEAR_DUPLICATE: 1, REASON_SMALL_MASK: 1,
        REASON_AMBIGUOUS_SAME_SENTENCE: 2, REASON_NO_DEPTH_TOKENS: 1,
    }  # fmt: skip
    assert stats.skipped["split not selected"] == 1
    # image 2 is also used by a val ref: optional overlap filter
    refs2 = [_ref(9, 22, "cup in the middle", image_id=2), _ref(8, 40, "blue cup", image_id=2, split="val")]
    src2 = Sources(root=str(tmp_path), coco_images=images, refs=refs2)
    _, st = _run(src2, tokens, None, CurateConfig(tasks=["refer_seg"], min_mask_area=16, drop_eval_overlap=True))
    assert st.dropped[REASON_EVAL_OVERLAP] == 1


def test_llava_and_glamm_json(tmp_path):
    _, d1 = _png(tmp_path / "a.png", seed=1)
    _png(tmp_path / "b.png", seed=2)
    llava = [
        {"id": "000001", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise.\nOnly noise."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "gone", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
    ]  # fmt: skip
    m1, m2 = np.zeros((48, 64), bool), np.zeros((48, 64), bool)
    m1[5:20, 5:20] = True
    m2[30:40, 40:60] = True
    glamm = [
        {"file_name": "b.png", "caption": "A square above a bar.",
         "groundings": {"A square": {"token_positives": [0, 8], "rle_masks": [encode_mask(m1)]},
                        "a bar": {"token_positives": [15, 20], "rle_masks": [encode_mask(m2)]}}},
        {"file_name": "a.png", "caption": "Nothing grounded.", "groundings": {}},
    ]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "glamm.json").write_text(json.dumps(glamm))
    src = Sources(root=str(tmp_path))
    samples, stats = _run(src, {d1: np.zeros(N, int)}, None, CurateConfig(),
                          llava_json=str(tmp_path / "llava.json"), glamm_json=str(tmp_path / "glamm.json"))
    assert [s.task for s in samples] == ["instruct", "instruct", "grounded_conv"]
    inst, text, gcg = samples
    # every turn a round; the first keeps prompt/target/answer
    assert inst.prompt == "What is shown?" and inst.target == inst.answer == "Noise.\nOnly noise."
    assert inst.rounds == [{"prompt": "Sure?", "target": "Yes."}]
    assert inst.masks_rle == [] and inst.depth_tokens is None and inst.image_digest == d1
    assert parse_generation(inst.target, N, K).status == ParseStatus.NO_BLOCK
    # a text-only conversation is kept, without image
    assert text.image == b"" and text.image_digest == "" and text.turns == [("hi", "hello")]
    # GCG: one [SEG] right after each grounded phrase, one mask each, in caption order
    assert gcg.target == "A square [SEG] above a bar [SEG]."
    assert [decode_mask(m).tolist() for m in gcg.masks_rle] == [m1.tolist(), m2.tolist()]
    assert [g["phrase"] for g in gcg.meta["groundings"]] == ["A square", "a bar"]
    p = parse_generation(gcg.target, N, K)
    assert p.n_seg == 2 and p.status == ParseStatus.NO_BLOCK and p.answer == "A square above a bar."
    assert stats.dropped["missing image"] == 1
    assert stats.dropped["no groundings"] == 1


def test_world_gcg_and_text_only_llava_through_the_shards(world, tmp_path):
    """The world's GranD-f-style GCG file (perceptio_core.world.writers.write_gcg): several
    phrases per image, each its own [SEG] and mask; with a text-only LLaVA conversation, written to
    shards and read back."""
    from perceptio_core.world.writers import GCG_FILE, write_gcg

    src, tokens, maps = world
    counts = write_gcg(src.root, tmp_path / "gcg")
    assert counts["gcg"] > 0 and counts["gcg_phrases"] >= 2 * counts["gcg"]
    gcg_json = json.loads((tmp_path / "gcg" / GCG_FILE).read_text())
    for e in gcg_json:  # spans point at the phrases
        assert all(e["caption"][s:t] == ph for ph, g in e["groundings"].items() for s, t in [g["token_positives"]])
    (tmp_path / "llava.json").write_text(json.dumps([
        {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                      {"from": "human", "value": "and?"}, {"from": "gpt", "value": "bye"}]}]))
    cfg = CurateConfig(tasks=["instruct", "grounded_conv"])  # images/<name>, relative to the JSON's folder
    res = curate(src, tokens, maps, cfg, UPSTREAM, tmp_path / "c", llava_json=str(tmp_path / "llava.json"),
                 glamm_json=str(tmp_path / "gcg" / GCG_FILE), **CODEBOOK)
    back = list(read_shards(res.shard_paths()))
    assert verify_read_back(res.out_dir) == len(back) == 1 + counts["gcg"]
    text, gcgs = back[0], back[1:]
    assert text.image == b"" and text.turns == [("hi", "hello"), ("and?", "bye")]
    for s, e in zip(gcgs, gcg_json):
        assert len(s.masks_rle) == len(e["groundings"]) >= 2
        p = parse_generation(s.target, N, K)
        assert p.n_seg == len(s.masks_rle) and p.status == ParseStatus.OK  # world images have depth tokens
        assert p.answer == e["caption"]
        for m, g in zip(s.masks_rle, e["groundings"].values()):
            assert m == g["rle_masks"][0]
    assert res.stats["paper_counts"]["glamm"] == {"train": counts["gcg"], "paper": 214_000}


def test_llava_and_glamm_images_stay_under_their_root_and_are_regular_files(tmp_path):
    """An image named outside the image root (``../``, absolute) is dropped without being read;
    a FIFO or a device is never opened (it would hang or read forever): dropped as missing."""
    import os

    root = tmp_path / "root"
    root.mkdir()
    _, d1 = _png(root / "a.png", seed=1)
    _png(tmp_path / "outside.png", seed=2)
    os.mkfifo(root / "fifo.png")
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    llava = [{"id": i, "image": img, "conversations": turns}
             for i, img in (("ok", "a.png"), ("up", "../outside.png"), ("abs", str(tmp_path / "outside.png")),
                            ("fifo", "fifo.png"), ("dev", "../../../../../../dev/zero"), ("sub", "x/../a.png"))]
    (root / "llava.json").write_text(json.dumps(llava))
    m = np.zeros((48, 64), bool)
    m[5:20, 5:20] = True
    glamm = [{"file_name": name, "caption": "A square.",
              "groundings": {"A square": {"token_positives": [0, 8], "rle_masks": [encode_mask(m)]}}}
             for name in ("a.png", "../outside.png")]
    (root / "glamm.json").write_text(json.dumps(glamm))
    samples, stats = _run(Sources(root=str(root)), {d1: np.zeros(N, int)}, None, CurateConfig(),
                          llava_json=str(root / "llava.json"), glamm_json=str(root / "glamm.json"))
    assert [s.meta.get("id") or s.meta.get("file_name") for s in samples] == ["ok", "sub", "a.png"]
    assert all(s.image_digest == d1 for s in samples)
    assert stats.dropped["image path outside the image root"] == 4  # up, abs, dev, and GLaMM's ../
    assert stats.dropped["missing image"] == 1  # the FIFO
