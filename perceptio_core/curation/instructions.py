"""Instruction and grounded-conversation samples (SPEC §5; items 4 and 5 of
:mod:`perceptio_core.curation.curate`): LLaVA-1.5 instruction JSON (every turn a round, text-only
conversations kept) and GLaMM's GranD-f grounded conversations (one ``[SEG]`` and one mask per
grounded phrase), read in their published layouts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


from perceptio_core.config import CurateConfig
from perceptio_core.curation.filters import (
    degenerate_mask_reason,
)
from perceptio_core.data.masks import decode_mask, to_compressed, union_rles
from perceptio_core.format.target import format_grounded, format_target
from perceptio_core.format.prompts import render_prompt
from perceptio_core.data.records import (
    REASON_MISSING_IMAGE,
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
    image_size,
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


def llava_rounds(turns: list[Any]) -> list[tuple[str, str]] | None:
    """A LLaVA conversation -> its rounds ``[(human text, gpt text), ...]``: every human turn
    followed by a gpt turn, in order, the ``<image>`` placeholder removed wherever it is. None
    when the turns do not alternate human/gpt from a human turn or a value is empty."""
    rounds: list[tuple[str, str]] = []
    if len(turns) < 2:
        return None
    for j in range(0, len(turns) - 1, 2):
        h, g = turns[j], turns[j + 1]
        if not (isinstance(h, dict) and isinstance(g, dict)) or h.get("from") != "human" or g.get("from") != "gpt":
            return None
        q = str(h.get("value") or "").replace("<image>", "").strip()
        a = str(g.get("value") or "").strip()
        if not q or not a:
            return None
        rounds.append((q, a))
    return rounds


def llava_samples(
    path: str, image_root: str | None, upstream: dict[str, str], stats: CurateStats
) -> Iterator[Sample]:
    """LLaVA-1.5 instruction data (SPEC §5): one sample per conversation, **every** human/gpt pair
    a round (a trailing unanswered human turn is ignored), text-only targets. The image is
    ``image_root / entry["image"]`` (the 665K mix names ``coco/train2017/...``, ``gqa/images/...``,
    ``ocr_vqa/images/...``, ``textvqa/train_images/...``, ``vg/VG_100K/...``: those folders under
    the root). Entries without an ``image`` field are kept as text-only samples (``image`` b"",
    ``image_digest`` "")."""
    root = Path(image_root) if image_root else Path(path).parent
    for idx, entry in enumerate(json_records(path)):
        rid = f"#{idx} id={entry.get('id') if isinstance(entry, dict) else None}"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            stats.drop("llava", rid, REASON_BAD_RECORD)
            continue
        rounds = llava_rounds(entry["conversations"])
        if not rounds:
            stats.drop("llava", rid, REASON_NO_CONVERSATION)
            continue
        data, digest = b"", ""
        if entry.get("image"):
            where = confined(root, str(entry["image"]))
            if where is None:
                stats.drop("llava", rid, REASON_OUTSIDE_ROOT)
                continue
            got = read_bytes(where)
            if got is None:
                stats.drop("llava", rid, REASON_MISSING_IMAGE)
                continue
            data, digest = got, bytes_digest(got)
        key = make_key("llava", idx, str(entry.get("id", "")))
        (q0, a0), rest = rounds[0], rounds[1:]
        sample = Sample(
            key=key, source="llava", split="train", task="instruct", image_digest=digest,
            image=data, prompt=render_prompt("instruct", key, question=q0),
            target=format_target(False, None, a0), answer=a0, upstream=dict(upstream),
            rounds=[{"prompt": render_prompt("instruct", key, question=q), "target": format_target(False, None, a)}
                    for q, a in rest],
            meta={"id": entry.get("id"), "image_path": entry.get("image"), "turns": len(entry["conversations"])},
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
    for idx, entry in enumerate(json_records(path)):
        name = (entry.get("file_name") or entry.get("image") or "") if isinstance(entry, dict) else ""
        rid = f"#{idx} {name}"
        caption = entry.get("caption") if isinstance(entry, dict) else None
        groundings = entry.get("groundings") if isinstance(entry, dict) else None
        if not name or not isinstance(caption, str) or not caption.strip():
            stats.drop("glamm", rid, REASON_BAD_RECORD)
            continue
        if not isinstance(groundings, dict) or not groundings:
            stats.drop("glamm", rid, REASON_NO_GROUNDINGS)
            continue
        where = confined(root, str(name))
        if where is None:
            stats.drop("glamm", rid, REASON_OUTSIDE_ROOT)
            continue
        data = read_bytes(where)
        if data is None:
            stats.drop("glamm", rid, REASON_MISSING_IMAGE)
            continue
        w, h = image_size(data)
        raw = caption
        caption = caption.strip().strip('"').strip()
        shift = raw.find(caption)  # spans index the raw caption
        phrases: list[dict[str, Any]] = []
        try:
            for phrase, g in groundings.items():
                rles = [to_compressed(r) for r in g.get("rle_masks", [])]
                rles = [r for r in rles if r["size"] == [h, w]]
                span = _phrase_span(raw, phrase, g)
                if not rles or span is None:
                    continue
                span = (span[0] - shift, span[1] - shift)
                rle = union_rles(rles)
                area = int(decode_mask(rle).sum())
                if degenerate_mask_reason(area, h, w, cfg.min_mask_area, cfg.max_mask_frac) is not None:
                    continue
                phrases.append({"phrase": phrase, "span": list(span), "mask_rle": rle})
        except (KeyError, TypeError, ValueError, AttributeError):
            stats.drop("glamm", rid, REASON_BAD_RECORD)
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
