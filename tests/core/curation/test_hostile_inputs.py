"""Hostile LLaVA-1.5 and GLaMM GranD-f files (issue 19): a malformed conversation or grounded
caption is quarantined naming the file and its index, and the rest is curated; a file that is not a
JSON list of records is set aside as a whole."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from perceptio_core.config import CurateConfig
from perceptio_core.curation.inputs import CurateStats
from perceptio_core.curation.instructions import glamm_samples, llava_rounds, llava_samples
from perceptio_core.data.masks import encode_mask
from perceptio_core.data.records import QuarantineEntry

UPSTREAM = {"sources": "test"}


def _stats() -> tuple[CurateStats, list[QuarantineEntry]]:
    drops: list[QuarantineEntry] = []
    return CurateStats(on_drop=drops.append), drops


def _turns(*pairs) -> list[dict]:
    return [{"from": f, "value": v} for f, v in pairs]


def test_malformed_llava_conversations_are_quarantined_naming_file_and_index(tmp_path):
    """Before: a value that was not text went through ``str()`` (a dict became its repr, a list
    nested deep raised RecursionError), an entry that was not an object raised; now each malformed
    conversation is one quarantine entry and the good ones are curated."""
    good = _turns(("human", "<image>\nWhat is it?"), ("gpt", "A ball."))
    entries = [
        {"id": "ok", "conversations": good},
        {"id": "notlist", "conversations": "human: hi"},
        {"id": "nofrom", "conversations": [{"value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"id": "novalue", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
        {"id": "dict", "conversations": _turns(("human", {"text": "hi"}), ("gpt", "x"))},
        {"id": "who", "conversations": _turns(("system", "be nice"), ("gpt", "x"))},
        {"id": "long", "conversations": _turns(("human", "q"), ("gpt", "y" * 20000))},
        {"id": "surrogate", "conversations": _turns(("human", "q \ud800"), ("gpt", "x"))},
        ["not", "an", "object"],
        {"id": ["a", "list"], "conversations": good},
        {"id": "img", "image": ["a.png"], "conversations": good},
        {"id": "ok2", "conversations": good + _turns(("human", "And?"), ("gpt", "Red."))},
    ]
    path = tmp_path / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(entries))  # "\ud800" is written as the JSON escape
    stats, drops = _stats()
    samples = list(llava_samples(str(path), None, UPSTREAM, stats))
    assert [s.meta["id"] for s in samples] == ["ok", "ok2"]
    assert len(samples[1].rounds) == 1
    got = [(q.source, q.record, q.reason) for q in drops]
    f = path.name
    assert got == [
        ("llava", f"{f} #1 id='notlist'", "malformed record: conversations is 'human: hi', not a list"),
        ("llava", f"{f} #2 id='nofrom'", "malformed record: turn 0 has no 'from'"),
        ("llava", f"{f} #3 id='novalue'", "malformed record: turn 0 has no 'value'"),
        ("llava", f"{f} #4 id='dict'", "malformed record: turn 0 value is a dict, not text"),
        ("llava", f"{f} #5 id='who'", "malformed record: turn 0 is from 'system', not human or gpt"),
        ("llava", f"{f} #6 id='long'",
         "text too long: turn 1 value of 20000 characters, at most 16384 (MAX_TURN_CHARS)"),
        ("llava", f"{f} #7 id='surrogate'",
         "invalid text: turn 0 value holds a lone surrogate or bytes that are not UTF-8"),
        ("llava", f"{f} #8 id=None", "malformed record: the entry is a list, not an object"),
        ("llava", f"{f} #9 id=a list", "malformed record: id is a list, not a short text or a number"),
        ("llava", f"{f} #10 id='img'", "malformed record: image is a list, not a file name"),
    ]
    assert llava_rounds("not a list") is None and llava_rounds(good) == [("What is it?", "A ball.")]


def test_a_deeply_nested_llava_value_is_quarantined_not_recursed(tmp_path):
    value: list = []
    for _ in range(900):  # as deep as json can parse; str() of it is what used to be tried
        value = [value]
    entries = [{"id": "deep", "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "x"}]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    stats, drops = _stats()
    assert list(llava_samples(str(path), None, UPSTREAM, stats)) == []
    assert [q.reason for q in drops] == ["malformed record: turn 0 value is a list, not text"]


def test_a_llava_or_glamm_file_that_is_not_a_list_is_set_aside_whole(tmp_path):
    bad = tmp_path / "llava.json"
    bad.write_text('"a string, not a list of records"')
    deep = tmp_path / "gcg.json"
    deep.write_text("[" * 100_000)
    stats, drops = _stats()
    assert list(llava_samples(str(bad), None, UPSTREAM, stats)) == []
    assert list(glamm_samples(str(deep), None, None, CurateConfig(), UPSTREAM, stats)) == []
    assert [(q.source, q.record) for q in drops] == [("llava", str(bad)), ("glamm", str(deep))]
    assert drops[0].reason.startswith("unreadable dataset file: ValueError: ") and "expected a JSON list" in drops[0].reason
    assert drops[1].reason.startswith("unreadable dataset file: ")
    assert all(" at 0x" not in q.reason for q in drops)


def _png(path: Path, size=(64, 48)) -> None:
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)


def test_malformed_glamm_records_are_quarantined(tmp_path):
    """Wrong types in GranD-f records: each record is quarantined by itself, naming the file and
    the index; before, an image that was not an image raised out of curate, and a mask ``size``
    of ``inf`` raised OverflowError."""
    root = tmp_path / "root"
    root.mkdir()
    _png(root / "a.png")
    (root / "notimage.png").write_bytes(b"hello")
    m = np.zeros((48, 64), bool)
    m[5:20, 5:20] = True
    grounding = {"A square": {"token_positives": [0, 8], "rle_masks": [encode_mask(m)]}}
    entries = [
        {"file_name": "a.png", "caption": "A square.", "groundings": grounding},
        {"file_name": ["a.png"], "caption": "A square.", "groundings": grounding},
        {"file_name": "a.png", "caption": 5, "groundings": grounding},
        {"file_name": "a.png", "caption": "A square \ud800.", "groundings": grounding},
        {"file_name": "a.png", "caption": "A " + "x" * 5000, "groundings": grounding},
        {"file_name": "notimage.png", "caption": "A square.", "groundings": grounding},
        {"file_name": "a.png", "caption": "A square.", "groundings": {"A square": {"rle_masks": "x"}}},
        {"file_name": "a.png", "caption": "A square.",
         "groundings": {"A square": {"rle_masks": [{"size": [48, 64], "counts": [1, [2], 3]}]}}},
        {"file_name": "a.png", "caption": "A square.",
         "groundings": {"A square": {"rle_masks": [{"size": [48, 64], "counts": [5, 7]}]}}},
    ]
    path = root / "GranDf_HA_GCG_train.json"
    path.write_text(json.dumps(entries))
    stats, drops = _stats()
    samples = list(glamm_samples(str(path), None, None, CurateConfig(min_mask_area=1), UPSTREAM, stats))
    assert [s.meta["file_name"] for s in samples] == ["a.png"]
    f = path.name
    got = [(q.record, q.reason.split(" (")[0]) for q in drops]
    assert got == [
        (f"{f} #1 a list", "malformed record: file_name is a list, not a file name"),
        (f"{f} #2 a.png", "malformed record: caption is 5, not text"),
        (f"{f} #3 a.png", "invalid text: caption holds a lone surrogate or bytes that are not UTF-8"),
        (f"{f} #4 a.png", "text too long: caption of 5002 characters, at most 4096"),
        (f"{f} #5 notimage.png", "corrupt image: UnidentifiedImageError"),
        (f"{f} #6 a.png", "malformed record: a grounding's masks cannot be read"),
        (f"{f} #7 a.png", "malformed record: a grounding's masks cannot be read"),
        (f"{f} #8 a.png", "malformed record: a grounding's masks cannot be read"),
    ]
    assert all(" at 0x" not in q.reason for q in drops)
    buf = io.BytesIO(samples[0].image)
    assert Image.open(buf).size == (64, 48)
