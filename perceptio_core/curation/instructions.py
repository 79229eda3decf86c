"""Instruction and grounded-conversation samples (SPEC §5; items 4 and 5 of
:mod:`perceptio_core.curation.curate`): LLaVA-1.5 instruction JSON and GLaMM's GranD-f grounded
conversations, read in their published layouts.
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
from perceptio_core.format.target import format_target
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
    REASON_NO_IMAGE_FIELD,
    CurateStats,
    image_size,
    image_tokens,
    read_bytes,
)


def _load_json_list(path: str | os.PathLike[str]) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):  # some dumps wrap the list: {"annotations": [...]} or {file: entry}
        data = data.get("annotations") or data.get("data") or [
            {"file_name": k, **v} for k, v in data.items() if isinstance(v, dict)
        ]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def llava_samples(
    path: str, image_root: str | None, upstream: dict[str, str], stats: CurateStats
) -> Iterator[Sample]:
    root = Path(image_root) if image_root else Path(path).parent
    for idx, entry in enumerate(_load_json_list(path)):
        rid = f"#{idx} id={entry.get('id') if isinstance(entry, dict) else None}"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            stats.drop("llava", rid, REASON_BAD_RECORD)
            continue
        if not entry.get("image"):
            stats.drop("llava", rid, REASON_NO_IMAGE_FIELD)
            continue
        turns = entry["conversations"]
        human = next((t.get("value", "") for t in turns if t.get("from") == "human"), None)
        gpt = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), None)
        if not human or not gpt:
            stats.drop("llava", rid, REASON_NO_CONVERSATION)
            continue
        data = read_bytes(root / entry["image"])
        if data is None:
            stats.drop("llava", rid, REASON_MISSING_IMAGE)
            continue
        prompt = human.replace("<image>", "").strip()
        key = make_key("llava", idx, str(entry.get("id", "")))
        sample = Sample(
            key=key, source="llava", split="train", task="instruct", image_digest=bytes_digest(data),
            image=data, prompt=render_prompt("instruct", key, question=prompt),
            target=format_target(False, None, gpt), answer=gpt.strip(), upstream=dict(upstream),
            meta={"id": entry.get("id"), "image_path": entry["image"], "turns": len(turns)},
        )  # fmt: skip
        stats.kept(sample)
        yield sample


def glamm_samples(
    path: str,
    image_root: str | None,
    depth_tokens: Any,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
) -> Iterator[Sample]:
    root = Path(image_root) if image_root else Path(path).parent
    for idx, entry in enumerate(_load_json_list(path)):
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
        data = read_bytes(root / name)
        if data is None:
            stats.drop("glamm", rid, REASON_MISSING_IMAGE)
            continue
        w, h = image_size(data)
        caption = caption.strip().strip('"').strip()
        phrases: list[dict[str, Any]] = []
        try:
            for phrase, g in groundings.items():
                rles = [to_compressed(r) for r in g.get("rle_masks", [])]
                rles = [r for r in rles if r["size"] == [h, w]]
                if not rles:
                    continue
                phrases.append({"phrase": phrase, "span": list(g.get("token_positives") or []),
                                "mask_rle": union_rles(rles)})  # fmt: skip
        except (KeyError, TypeError, ValueError):
            stats.drop("glamm", rid, REASON_BAD_RECORD)
            continue
        if not phrases:
            stats.drop("glamm", rid, REASON_NO_GROUNDINGS)
            continue
        phrases.sort(key=lambda p: (p["span"][:1] or [0])[0])
        union = union_rles([p["mask_rle"] for p in phrases])
        area = int(decode_mask(union).sum())
        reason = degenerate_mask_reason(area, h, w, cfg.min_mask_area, cfg.max_mask_frac)
        if reason is not None:
            stats.drop("glamm", rid, reason)
            continue
        digest = bytes_digest(data)
        tokens, _ = image_tokens(depth_tokens, digest)  # optional here: GLaMM images rarely have a teacher map
        key = make_key("glamm", idx, Path(name).stem)
        sample = Sample(
            key=key, source="glamm", split="train", task="grounded_conv", image_digest=digest,
            image=data, prompt=render_prompt("grounded_conv", key),
            target=format_target(True, tokens, caption), answer=caption, mask_rle=union,
            depth_tokens=tokens, upstream=dict(upstream),
            meta={"file_name": name, "groundings": phrases},
        )  # fmt: skip
        stats.kept(sample)
        yield sample


