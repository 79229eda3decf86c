"""Instruction and grounded-conversation samples (SPEC §5; items 4 and 5 of
:mod:`perceptio_core.curation.curate`): LLaVA-1.5 instruction JSON (every turn a round, text-only
conversations kept) and GLaMM's GranD-f grounded conversations (one ``[SEG]`` and one mask per
grounded phrase), read in their published layouts.

Each record is checked before any work: a conversation whose ``conversations`` is not a list, a turn
that is not an object, lacks ``from`` or ``value``, comes from someone other than ``human``/``gpt``
or whose value is not text, a turn over :data:`~perceptio_core.data.limits.MAX_TURN_CHARS`, a GLaMM
caption over :data:`~perceptio_core.data.limits.MAX_CAPTION_CHARS`, text with a lone surrogate, an
``id``/``image``/``file_name`` of the wrong type: each drops its record (quarantined with the file and
the record's index named, the rest goes on). A file that is not a JSON list of records is set aside
as a whole (``unreadable dataset file``) and curation goes on with the other sources.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from perceptio_core.config import CurateConfig
from perceptio_core.curation.filters import (
    degenerate_mask_reason,
)
from perceptio_core.data.image_io import ImageError, check_pixels
from perceptio_core.data.limits import MAX_CAPTION_CHARS, MAX_TURN_CHARS, has_lone_surrogate
from perceptio_core.data.masks import decode_mask, to_compressed, union_rles
from perceptio_core.data.refer import FieldError, as_text, describe, segmentation_to_rle
from perceptio_core.format.target import format_grounded, format_target
from perceptio_core.format.prompts import render_prompt
from perceptio_core.data.records import (
    REASON_CORRUPT_IMAGE,
    REASON_MISSING_IMAGE,
    REASON_UNREADABLE_FILE,
)
from perceptio_core.atomic_io import bytes_digest
from perceptio_core.curation.sample import Sample, make_key
from perceptio_core.curation.inputs import (
    REASON_BAD_RECORD,
    REASON_NO_CONVERSATION,
    REASON_NO_GROUNDINGS,
    REASON_OUTSIDE_ROOT,
    CurateStats,
    confined,
    image_tokens,
    read_bytes,
)


def json_records(path: str | os.PathLike[str]) -> list[Any]:
    """The records of a LLaVA / GLaMM JSON file: a list, or a dict wrapping one."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):  # some dumps wrap the list: {"annotations": [...]} or {file: entry}
        data = data.get("annotations") or data.get("data") or [
            {"file_name": k, **v} for k, v in data.items() if isinstance(v, dict)
        ]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def parse_llava_rounds(turns: Any) -> tuple[list[tuple[str, str]] | None, str | None]:
    """A LLaVA conversation -> ``(rounds, None)``, its rounds ``[(human text, gpt text), ...]``: every
    human turn followed by a gpt turn, in order, the ``<image>`` placeholder removed wherever it is
    (a trailing unanswered human turn is ignored); or ``(None, drop reason)``: ``malformed record:
    ...`` (``turns`` not a list, a turn not an object, without ``from``/``value``, ``from`` not human
    or gpt, a value that is not text), ``text too long: ...`` (a value over :data:`MAX_TURN_CHARS`),
    ``invalid text: ...`` (a lone surrogate), ``no human/gpt turn`` (the turns do not alternate
    human/gpt from a human turn, or a value is empty). Never recurses into a value."""
    if not isinstance(turns, list):
        return None, f"{REASON_BAD_RECORD}: conversations is {describe(turns)}, not a list"
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            return None, f"{REASON_BAD_RECORD}: turn {k} is {describe(t)}, not an object"
        missing = [key for key in ("from", "value") if key not in t]
        if missing:
            return None, f"{REASON_BAD_RECORD}: turn {k} has no {' or '.join(repr(m) for m in missing)}"
        if not isinstance(t["from"], str) or t["from"] not in ("human", "gpt"):
            return None, f"{REASON_BAD_RECORD}: turn {k} is from {describe(t['from'])}, not human or gpt"
        try:
            as_text(t["value"], f"turn {k} value", MAX_TURN_CHARS, "MAX_TURN_CHARS")
        except FieldError as e:
            return None, str(e)
    rounds: list[tuple[str, str]] = []
    if len(turns) < 2:
        return None, REASON_NO_CONVERSATION
    for j in range(0, len(turns) - 1, 2):
        h, g = turns[j], turns[j + 1]
        if h["from"] != "human" or g["from"] != "gpt":
            return None, REASON_NO_CONVERSATION
        q = h["value"].replace("<image>", "").strip()
        a = g["value"].strip()
        if not q or not a:
            return None, REASON_NO_CONVERSATION
        rounds.append((q, a))
    return rounds, None


def llava_rounds(turns: Any) -> list[tuple[str, str]] | None:
    """:func:`parse_llava_rounds`'s rounds, or None when the conversation cannot be used."""
    return parse_llava_rounds(turns)[0]


def _read_records(path: str, source: str, stats: CurateStats) -> list[Any] | None:
    """:func:`json_records`, or None with the whole file quarantined (``unreadable dataset file``:
    not JSON, not UTF-8, nested too deep, not a list of records, unreadable)."""
    try:
        return json_records(path)
    except (OSError, ValueError, RecursionError) as e:
        msg = "nested too deep to read" if isinstance(e, RecursionError) else str(e)[:500]
        stats.drop(source, str(path), f"{REASON_UNREADABLE_FILE}: {type(e).__name__}: {msg}")
        return None


def llava_samples(
    path: str, image_root: str | None, upstream: dict[str, str], stats: CurateStats
) -> Iterator[Sample]:
    """LLaVA-1.5 instruction data (SPEC §5): one sample per conversation, **every** human/gpt pair
    a round (a trailing unanswered human turn is ignored), text-only targets. The image is
    ``image_root / entry["image"]`` (the 665K mix names ``coco/train2017/...``, ``gqa/images/...``,
    ``ocr_vqa/images/...``, ``textvqa/train_images/...``, ``vg/VG_100K/...``: those folders under
    the root). Entries without an ``image`` field are kept as text-only samples (``image`` b"",
    ``image_digest`` ""). Records are named ``"<file> #<index> id=<id>"`` in the quarantine."""
    root = Path(image_root) if image_root else Path(path).parent
    entries = _read_records(path, "llava", stats)
    fname = Path(path).name
    for idx, entry in enumerate(entries or []):
        eid = entry.get("id") if isinstance(entry, dict) else None
        rid = f"{fname} #{idx} id={describe(eid)}"
        if not isinstance(entry, dict):
            stats.drop("llava", rid, f"{REASON_BAD_RECORD}: the entry is {describe(entry)}, not an object")
            continue
        if eid is not None and (isinstance(eid, bool) or not isinstance(eid, (str, int)) or len(str(eid)) > 256):
            stats.drop("llava", rid, f"{REASON_BAD_RECORD}: id is {describe(eid)}, not a short text or a number")
            continue
        image = entry.get("image")
        if image and not isinstance(image, str):
            stats.drop("llava", rid, f"{REASON_BAD_RECORD}: image is {describe(image)}, not a file name")
            continue
        if "conversations" not in entry:
            stats.drop("llava", rid, f"{REASON_BAD_RECORD}: no conversations")
            continue
        rounds, why = parse_llava_rounds(entry["conversations"])
        if not rounds:
            stats.drop("llava", rid, why or REASON_NO_CONVERSATION)
            continue
        data, digest = b"", ""
        if image:
            where = confined(root, image)
            if where is None:
                stats.drop("llava", rid, REASON_OUTSIDE_ROOT)
                continue
            got = read_bytes(where)
            if got is None:
                stats.drop("llava", rid, REASON_MISSING_IMAGE)
                continue
            data, digest = got, bytes_digest(got)
        key = make_key("llava", idx, "" if eid is None else str(eid))
        (q0, a0), rest = rounds[0], rounds[1:]
        sample = Sample(
            key=key, source="llava", split="train", task="instruct", image_digest=digest,
            image=data, prompt=render_prompt("instruct", key, question=q0),
            target=format_target(False, None, a0), answer=a0, upstream=dict(upstream),
            rounds=[{"prompt": render_prompt("instruct", key, question=q), "target": format_target(False, None, a)}
                    for q, a in rest],
            meta={"id": eid, "image_path": image, "turns": len(entry["conversations"])},
        )  # fmt: skip
        stats.kept(sample)
        yield sample


def _phrase_span(caption: str, phrase: str, g: dict[str, Any]) -> tuple[int, int] | None:
    """A phrase's character span in the caption: ``token_positives`` when it is a valid
    [start, end], else the first occurrence of the phrase, else None."""
    tp = g.get("token_positives")
    if isinstance(tp, (list, tuple)) and len(tp) == 2 and all(isinstance(x, int) for x in tp):
        if 0 <= tp[0] < tp[1] <= len(caption):
            return int(tp[0]), int(tp[1])
    at = caption.find(phrase)
    return (at, at + len(phrase)) if at >= 0 and phrase else None


def glamm_samples(
    path: str,
    image_root: str | None,
    depth_tokens: Any,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
) -> Iterator[Sample]:
    """GLaMM GranD-f GCG (SPEC §5): one sample per image; the target is the caption with one
    ``[SEG]`` after each grounded phrase (:func:`perceptio_core.format.target.format_grounded`),
    preceded by the depth block when the image has depth tokens; ``masks_rle`` the phrases' masks
    in ``[SEG]`` order (a phrase's several instance masks are united into its one mask). Phrases
    without a span in the caption, with no mask at the image's size or with a degenerate mask are
    left out; an image with none left is dropped."""
    root = Path(image_root) if image_root else Path(path).parent
    entries = _read_records(path, "glamm", stats)
    fname = Path(path).name
    for idx, entry in enumerate(entries or []):
        name = (entry.get("file_name") or entry.get("image") or "") if isinstance(entry, dict) else ""
        rid = f"{fname} #{idx} {name if isinstance(name, str) and len(name) <= 4096 else describe(name)}"
        caption = entry.get("caption") if isinstance(entry, dict) else None
        groundings = entry.get("groundings") if isinstance(entry, dict) else None
        if not name or not isinstance(name, str) or has_lone_surrogate(name):
            stats.drop("glamm", f"{fname} #{idx} {describe(name)}",
                       f"{REASON_BAD_RECORD}: file_name is {describe(name)}, not a file name")
            continue
        try:
            as_text(name, "file_name", 4096, "a file name's 4096")
            as_text(caption, "caption", MAX_CAPTION_CHARS, "MAX_CAPTION_CHARS")
            for phrase in groundings if isinstance(groundings, dict) else ():
                as_text(phrase, "grounded phrase", MAX_CAPTION_CHARS, "MAX_CAPTION_CHARS")
        except FieldError as e:
            stats.drop("glamm", rid, str(e))
            continue
        if not caption.strip():
            stats.drop("glamm", rid, f"{REASON_BAD_RECORD}: empty caption")
            continue
        if not isinstance(groundings, dict) or not groundings:
            stats.drop("glamm", rid, REASON_NO_GROUNDINGS)
            continue
        where = confined(root, name)
        if where is None:
            stats.drop("glamm", rid, REASON_OUTSIDE_ROOT)
            continue
        data = read_bytes(where)
        if data is None:
            stats.drop("glamm", rid, REASON_MISSING_IMAGE)
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                check_pixels(im, where)  # the masks are decoded at this size
                w, h = im.size
        except ImageError as e:
            stats.drop("glamm", rid, e.quarantine_reason)
            continue
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            stats.drop("glamm", rid, f"{REASON_CORRUPT_IMAGE}: {type(e).__name__}")
            continue
        raw = caption
        caption = caption.strip().strip('"').strip()
        shift = raw.find(caption)  # spans index the raw caption
        phrases: list[dict[str, Any]] = []
        try:
            for phrase, g in groundings.items():
                masks = g.get("rle_masks", [])
                if not isinstance(masks, list):
                    raise TypeError("rle_masks is not a list")
                rles = []
                for r in masks:
                    if isinstance(r, dict) and r.get("size") == [h, w]:
                        segmentation_to_rle(r, h, w)  # checks the counts' types and sum: MaskError
                        rles.append(to_compressed(r))
                span = _phrase_span(raw, phrase, g)
                if not rles or span is None:
                    continue
                span = (span[0] - shift, span[1] - shift)
                rle = union_rles(rles)
                area = int(decode_mask(rle).sum())
                if degenerate_mask_reason(area, h, w, cfg.min_mask_area, cfg.max_mask_frac) is not None:
                    continue
                phrases.append({"phrase": phrase, "span": list(span), "mask_rle": rle})
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError) as e:
            detail = str(e)[:200] if isinstance(e, ValueError) else type(e).__name__
            stats.drop("glamm", rid, f"{REASON_BAD_RECORD}: a grounding's masks cannot be read ({detail})")
            continue
        digest = bytes_digest(data)
        tokens, _ = image_tokens(depth_tokens, digest)  # optional here: GLaMM images rarely have a teacher map
        target, kept = format_grounded(caption, [tuple(p["span"]) for p in phrases], tokens)
        phrases = [phrases[i] for i in kept]
        if not phrases:
            stats.drop("glamm", rid, REASON_NO_GROUNDINGS)
            continue
        key = make_key("glamm", idx, Path(name).stem)
        sample = Sample(
            key=key, source="glamm", split="train", task="grounded_conv", image_digest=digest,
            image=data, prompt=render_prompt("grounded_conv", key), target=target, answer=caption,
            masks_rle=[p["mask_rle"] for p in phrases], depth_tokens=tokens, upstream=dict(upstream),
            meta={"file_name": name, "groundings": [{"phrase": p["phrase"], "span": p["span"]} for p in phrases]},
        )  # fmt: skip
        stats.kept(sample)
        yield sample
