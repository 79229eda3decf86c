"""Sources into samples (SPEC §5 data, §6 HardBLINK-style training data; ARCHITECTURE "curate").

:func:`iter_samples` turns the records the ``sources`` stage resolved into a deterministic stream of
:class:`~perceptio_core.curation.sample.Sample` (nothing is materialised: images are read, masks decoded and
samples built one at a time; teacher maps and depth tokens are looked up by image digest), and
:func:`curate` writes that stream into resumable WebDataset shards with a parquet manifest and a
quarantine table (:mod:`perceptio_core.curation.shards`).

What each source gives (the stream's order is this list's, then record order):

1. **RefCOCO / RefCOCO+ / RefCOCOg** (``task="refer_seg"``), official splits, refs of the splits in
   ``cfg.splits``: **one sample per image** of each dataset (SPEC §5: the paper's 17K/17K/22K are
   training images), its referring expressions as the rounds of one conversation, as Sa2VA and LISA
   build them. Each expression is first filtered, in order: empty expression, ambiguity and
   near-duplicates (:mod:`perceptio_core.curation.filters`), optional eval-image overlap, missing
   depth tokens, degenerate masks. Of the kept ones, the image takes
   :func:`refer_round_count` (a number in ``cfg.refer_rounds_per_sample`` = [min, max], drawn from
   the seed and the image) in round-robin order over objects (every object's first expression, then
   the second ...); an image with fewer kept expressions uses them all; the rest are counted as
   skipped ("over refer rounds per sample"). Round 1: the ``refer_seg`` prompt, target
   ``format_target(True, tokens, answer)`` (``[SEG]``, the depth block, a one-sentence attribute
   description of the object, :mod:`perceptio_core.curation.describe`); round i > 1: a
   ``refer_seg_round`` prompt, target ``[SEG] description`` (no depth block: it appears once).
   ``masks_rle``: the round objects' masks (the COCO annotation, polygon or RLE, through
   ``refer.ann_to_mask``), one per round, in round order. ``meta["rounds"]`` keeps each round's
   ref_id, sent_id, ann_id, sentence, category and description.
2. **ADE20k** (``semantic_seg``): per image of the kept splits, the present classes by decreasing
   area (degenerate ones dropped), at most ``cfg.ade_max_classes_per_image``; mask = that class's
   pixels; answer a :func:`~perceptio_core.curation.describe.describe_region` sentence; target with [SEG]
   and the depth block.
3. **Depth chain-of-thought** (``depth_cot``; source ``"depth_cot"``): on training images (the
   COCO images of the refer training splits that no refer val/test split uses, i.e. images the
   teacher ran on; ADE20k training images if listed in ``cfg.depth_cot_sources``), ``cfg.depth_cot_per_image`` samples each of 2 to 5 points drawn as
   HardBLINK draws them (``markers.draw_markers``, the function the synthetic HardBLINK set uses),
   at least ``min_point_distance`` px apart (and never closer than a label box needs), every pair
   differing by ``depth_cot_margin`` in teacher depth; the answer is the letter of the LARGEST teacher
   value (relative inverse depth: larger is nearer). The target is the depth block **without
   [SEG]** (a depth-only task: nothing is segmented) then the answer, e.g.
   ``<d_start>...<d_end> (B)``; parse it with ``expect_seg=False``. The image is re-encoded as PNG
   (crisp markers); ``image_digest`` stays the undrawn image's (its depth tokens' key).
   Deterministic: the points of sample ``j`` of an image come from a generator seeded by
   ``(cfg.seed, image digest, j)``.
4. **LLaVA-1.5 instructions** (``instruct``; when ``llava_json`` is given): the public JSON list of
   ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
   ...}, ...]}``; ``image`` relative to ``cfg.llava_image_root`` (default the JSON's folder; the 665K
   mix names coco/, gqa/, ocr_vqa/, textvqa/, vg/ folders under it). One sample per conversation,
   every human/gpt pair a round (:func:`~perceptio_core.curation.instructions.llava_rounds`);
   text-only targets (no perception block). Entries without an image are kept as text-only samples.
5. **GLaMM grounded conversations** (``grounded_conv``; when ``glamm_json`` is given): the GranD-f
   GCG JSON list (``GranDf_HA_GCG_train.json``, ``OpenPsgGCG_*.json``); fields read: ``file_name``
   (or ``image``), ``caption``, ``groundings`` = ``{phrase: {"token_positives": [start, end],
   "rle_masks": [COCO RLE, ...]}}``. One sample per image: a GCG prompt, the target the caption
   with one ``[SEG]`` after each grounded phrase (the depth block first when the image has depth
   tokens; :func:`~perceptio_core.format.target.format_grounded`), ``masks_rle`` one mask per
   phrase (its instance masks united) in ``[SEG]`` order.

The summary (:meth:`CurateStats.to_dict`) sets the samples of each source beside the paper's
counts (:data:`~perceptio_core.curation.inputs.PAPER_COUNTS`: RefCOCO 17K, RefCOCO+ 17K, RefCOCOg
22K, ADE20k 60K, LLaVA 665K, GLaMM 214K) under ``"paper_counts"``.

Descriptions say how near an object is only when a teacher map is given (depth code indices carry
no order). Every drop is counted by reason in :class:`CurateStats` and, through its ``on_drop`` hook,
written to the quarantine table. Records outside the selected splits or over the ADE per-image cap are counted
as ``skipped`` (not bad data, not quarantined). Before any of that, :func:`curate` checks the depth
tokens against the N and K of the codebook they were made with (:func:`check_depth_tokens`):
tokens of another codebook stop the run with an error naming them; they are never dropped one by one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio_core.config import CurateConfig
from perceptio_core.curation.describe import describe_object, describe_region, nearness, position_phrase
from perceptio_core.curation.filters import (
    REASON_EMPTY_EXPRESSION,
    REASON_NEAR_DUPLICATE,
    NearDuplicateFilter,
    ambiguous_refs,
    degenerate_mask_reason,
    normalize_expression,
)
from perceptio_core.data.masks import encode_mask, mask_centroid
from perceptio_core.format.target import drop_perception, format_target
from perceptio_core.format.prompts import clean_expression, render_prompt
from perceptio_core.data.image_io import read_regular
from perceptio_core.data.refer import MaskError, ann_to_mask
from perceptio_core.data.records import (
    REASON_MALFORMED_MASK,
    REASON_MISSING_IMAGE,
    ImageRecord,
    RefRecord,
    Sources,
    normalise_split,
)
from perceptio_core.atomic_io import bytes_digest
from perceptio_core.curation.sample import Sample, make_key
from perceptio_core.curation.depth_cot import depth_cot_samples
from perceptio_core.curation.inputs import (
    REASON_EVAL_OVERLAP,
    REASON_NO_DEPTH_TOKENS,
    CurateStats,
    check_depth_tokens,
    image_tokens,
    lookup,
    read_bytes,
)
from perceptio_core.curation.instructions import glamm_samples, llava_samples
from perceptio_core.curation.shards import QuarantineLog, ShardInfo, ShardWriter, write_manifest


# ------------------------------------------------------------------------------------------
# 1. RefCOCO / RefCOCO+ / RefCOCOg
# ------------------------------------------------------------------------------------------


def _ref_record_id(r: RefRecord) -> str:
    return f"ref_id={r.ref_id} sent_id={r.sent_id} ann_id={r.ann_id} ({r.dataset} {r.split_by})"


def refer_round_count(cfg: CurateConfig, dataset: str, split_by: str, image_id: int) -> int:
    """How many rounds the sample of one REFER image asks for: a number in
    ``cfg.refer_rounds_per_sample`` = [min, max], drawn from ``(cfg.seed, dataset, split_by,
    image_id)`` (a sha256, no global random state)."""
    lo, hi = (int(x) for x in cfg.refer_rounds_per_sample)
    h = hashlib.sha256(f"{cfg.seed}:{dataset}:{split_by}:{image_id}".encode()).digest()
    return lo + int.from_bytes(h[:8], "big") % (hi - lo + 1)


def _round_robin(kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Expressions ordered object by object: every object's first expression (in ref order), then
    every object's second, ... so the first rounds cover as many different objects as possible."""
    by_obj: dict[int, list[dict[str, Any]]] = {}
    for k in kept:
        by_obj.setdefault(k["ref_id"], []).append(k)
    out: list[dict[str, Any]] = []
    depth = max((len(v) for v in by_obj.values()), default=0)
    for j in range(depth):
        out += [v[j] for v in by_obj.values() if j < len(v)]
    return out


def _ref_samples(
    sources: Sources,
    depth_tokens: Any,
    teacher_maps: Any,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
    eval_images: set[int],
) -> Iterator[Sample]:
    groups: dict[tuple[str, str, int], list[RefRecord]] = defaultdict(list)
    order: list[str] = []
    for r in sources.refs:
        if r.dataset not in order:
            order.append(r.dataset)
        groups[(r.dataset, r.split_by, r.image_id)].append(r)
    keys = sorted(groups, key=lambda k: (order.index(k[0]), k[1], k[2]))
    splits = set(cfg.splits)
    for gkey in keys:
        refs = sorted(groups.pop(gkey), key=lambda r: (r.ref_id, r.sent_id))
        selected = [i for i, r in enumerate(refs) if normalise_split(r.split) in splits]
        stats.skip("split not selected", len(refs) - len(selected))
        if not selected:
            continue
        ambiguous = ambiguous_refs(refs) if cfg.ambiguity_filter else {}
        dedup = NearDuplicateFilter(cfg.dedup_jaccard)
        img: ImageRecord | None = sources.coco_images.get(gkey[2])
        data = read_bytes(img.path) if img is not None else None
        digest = (img.digest or bytes_digest(data)) if (img is not None and data is not None) else ""
        tokens, token_reason = image_tokens(depth_tokens, digest) if data is not None else (None, None)
        tmap = lookup(teacher_maps, digest)
        ann_cache: dict[int, tuple[dict[str, Any] | None, str | None, np.ndarray | None]] = {}
        kept: dict[str, list[dict[str, Any]]] = defaultdict(list)  # split -> kept expressions
        for i in selected:
            r = refs[i]
            rid = _ref_record_id(r)
            split = normalise_split(r.split)
            if img is None or data is None:
                stats.drop(r.dataset, rid, REASON_MISSING_IMAGE)
                continue
            if not normalize_expression(r.sentence):
                stats.drop(r.dataset, rid, REASON_EMPTY_EXPRESSION)
                continue
            if i in ambiguous:
                stats.drop(r.dataset, rid, ambiguous[i])
                continue
            if not dedup.keep(r.ann_id, r.sentence):
                stats.drop(r.dataset, rid, REASON_NEAR_DUPLICATE)
                continue
            if cfg.drop_eval_overlap and split == "train" and r.image_id in eval_images:
                stats.drop(r.dataset, rid, REASON_EVAL_OVERLAP)
                continue
            if tokens is None:
                stats.drop(r.dataset, rid, token_reason or REASON_NO_DEPTH_TOKENS)
                continue
            if r.ann_id not in ann_cache:
                try:
                    mask = np.asarray(ann_to_mask(r.segmentation, img.height, img.width), dtype=bool)
                except MaskError as e:
                    ann_cache[r.ann_id] = (None, f"{REASON_MALFORMED_MASK}: {e}", None)
                else:
                    reason = degenerate_mask_reason(
                        int(mask.sum()), img.height, img.width, cfg.min_mask_area, cfg.max_mask_frac
                    )
                    ann_cache[r.ann_id] = (None, reason, None) if reason else (encode_mask(mask), None, mask)
            rle, reason, mask = ann_cache[r.ann_id]
            if reason is not None or rle is None or mask is None:
                stats.drop(r.dataset, rid, reason or "empty mask")
                continue
            cx, cy = mask_centroid(mask) or (img.width / 2, img.height / 2)
            distance, teacher_value = None, None
            if tmap is not None:
                teacher_value, distance = nearness(mask, tmap)
            answer = describe_object(
                r.category, r.attributes, position_phrase(cx, cy, img.width, img.height), distance
            )
            kept[split].append({
                "ref_id": r.ref_id, "sent_id": r.sent_id, "ann_id": r.ann_id, "sentence": r.sentence,
                "category": r.category, "category_id": r.category_id, "attributes": r.attributes,
                "centroid": [round(cx, 2), round(cy, 2)], "distance": distance,
                "teacher_mean": None if teacher_value is None else round(teacher_value, 4),
                "split_original": r.split, "answer": answer, "mask_rle": rle,
            })  # fmt: skip
        if img is None or data is None or tokens is None:
            continue
        dataset, split_by, image_id = gkey
        n_rounds = refer_round_count(cfg, dataset, split_by, image_id)
        for split in sorted(kept):
            chosen = _round_robin(kept[split])
            stats.skip("over refer rounds per sample", max(len(chosen) - n_rounds, 0))
            chosen = chosen[:n_rounds]
            key = make_key(dataset, split_by, split, f"i{image_id}")
            first, rest = chosen[0], chosen[1:]
            rounds = [
                {"prompt": render_prompt("refer_seg_round", f"{key}-{j + 1}", expr=clean_expression(c["sentence"])),
                 "target": format_target(True, None, c["answer"])}
                for j, c in enumerate(rest)
            ]  # fmt: skip
            sample = Sample(
                key=key, source=dataset, split=split, task="refer_seg", image_digest=digest,
                image=data, prompt=render_prompt("refer_seg", key, expr=clean_expression(first["sentence"])),
                target=format_target(True, tokens, first["answer"]), answer=first["answer"],
                masks_rle=[c["mask_rle"] for c in chosen], depth_tokens=tokens, upstream=dict(upstream),
                rounds=rounds,
                meta={
                    "image_id": image_id, "file_name": img.file_name, "split_by": split_by,
                    "split_original": first["split_original"],
                    "rounds": [{k: v for k, v in c.items() if k not in ("mask_rle", "split_original")}
                               for c in chosen],
                },
            )  # fmt: skip
            stats.kept(sample)
            yield sample


# ------------------------------------------------------------------------------------------
# 2. ADE20k
# ------------------------------------------------------------------------------------------


def _ade_samples(
    sources: Sources,
    class_names: Mapping[int, str],
    depth_tokens: Any,
    teacher_maps: Any,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
) -> Iterator[Sample]:
    splits = set(cfg.splits)
    for rec in sorted(sources.ade, key=lambda a: (a.split, a.image_id)):
        split = normalise_split(rec.split)
        if split not in splits:
            stats.skip("split not selected")
            continue
        rid = f"image_id={rec.image_id} ({Path(rec.image_path).name})"
        data = read_bytes(rec.image_path)
        if data is None:
            stats.drop("ade20k", rid, REASON_MISSING_IMAGE)
            continue
        digest = rec.digest or bytes_digest(data)
        tokens, reason = image_tokens(depth_tokens, digest)
        if tokens is None:
            stats.drop("ade20k", rid, reason or REASON_NO_DEPTH_TOKENS)
            continue
        try:  # checked by the reader (regular file, the image's size); re-read defensively
            with Image.open(io.BytesIO(read_regular(rec.annotation_path, what="annotation"))) as im:
                if im.size != (rec.width, rec.height):
                    raise ValueError(f"annotation {im.size[0]}x{im.size[1]}, image {rec.width}x{rec.height}")
                label = np.asarray(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            stats.drop("ade20k", rid, f"unreadable annotation: {type(e).__name__}")
            continue
        h, w = label.shape[:2]
        tmap = lookup(teacher_maps, digest)
        classes, counts = np.unique(label, return_counts=True)
        area = {int(c): int(n) for c, n in zip(classes, counts) if int(c) != 0}
        kept = 0
        for c in sorted(area, key=lambda c: (-area[c], c)):
            crid = f"{rid} class={c}"
            reason = degenerate_mask_reason(area[c], h, w, cfg.min_mask_area, cfg.max_mask_frac)
            if reason is not None:
                stats.drop("ade20k", crid, reason)
                continue
            if kept >= cfg.ade_max_classes_per_image:
                stats.skip("over ADE per-image class cap")
                continue
            name = class_names.get(c)
            if not name:
                stats.drop("ade20k", crid, "unknown class index")
                continue
            mask = label == c
            cx, cy = mask_centroid(mask) or (w / 2, h / 2)
            distance = nearness(mask, tmap)[1] if tmap is not None else None
            answer = describe_region(name, area[c] / (h * w), position_phrase(cx, cy, w, h), distance)
            key = make_key("ade20k", split, f"i{rec.image_id}", f"c{c}")
            sample = Sample(
                key=key, source="ade20k", split=split, task="semantic_seg", image_digest=digest,
                image=data, prompt=render_prompt("semantic_seg", key, category=name),
                target=format_target(True, tokens, answer), answer=answer, masks_rle=[encode_mask(mask)],
                depth_tokens=tokens, upstream=dict(upstream),
                meta={"image_id": rec.image_id, "file_name": Path(rec.image_path).name,
                      "split_original": rec.split, "class_index": c, "category": name,
                      "area_fraction": round(area[c] / (h * w), 4), "distance": distance},
            )  # fmt: skip
            kept += 1
            stats.kept(sample)
            yield sample


# ------------------------------------------------------------------------------------------
# the stream and the driver
# ------------------------------------------------------------------------------------------


def iter_samples(
    sources: Sources,
    depth_tokens: Mapping[str, np.ndarray],
    teacher_maps: Mapping[str, np.ndarray] | None,
    cfg: CurateConfig,
    upstream: dict[str, str],
    stats: CurateStats,
    *,
    ade_class_names: Mapping[int, str] | None = None,
    llava_json: str | None = None,
    glamm_json: str | None = None,
) -> Iterator[Sample]:
    """The deterministic sample stream of SPEC §5 (see the module docstring for each source).

    sources: what the ``sources`` stage resolved. depth_tokens: image digest -> int code indices
    [N] (or [g, g], read row-major); teacher_maps: digest -> float [S, S] relative inverse depth in
    [0, 1] (a dict or a :class:`~perceptio_core.depth.maps.DepthMaps`), or None (then descriptions
    carry no distance and no depth chain-of-thought samples are made). upstream: artifact keys
    copied into every sample. stats: filled in as the stream is consumed. ade_class_names: ADE20k
    class index -> name (``objectInfo150.csv``); unset, ``sources.ade_classes``. llava_json /
    glamm_json: optional instruction / grounded-conversation JSON files.
    """
    seg, depth = "seg" in cfg.perception, "depth" in cfg.perception
    for sample in _samples(sources, depth_tokens, teacher_maps, cfg, upstream, stats, ade_class_names, llava_json,
                           glamm_json):  # fmt: skip
        yield sample if (seg and depth) else without_perception(sample, seg, depth)


def without_perception(sample: Sample, seg: bool, depth: bool) -> Sample:
    """``sample`` with the perception signals that are off (``curate.perception``) taken out of
    every round's target (:func:`~perceptio_core.format.target.drop_perception`), with their masks
    (``seg``) or depth codes (``depth``); the prompt and the answer stay."""
    return dataclasses.replace(
        sample,
        target=drop_perception(sample.target, seg, depth),
        rounds=[{"prompt": r["prompt"], "target": drop_perception(r["target"], seg, depth)} for r in sample.rounds],
        masks_rle=sample.masks_rle if seg else [],
        depth_tokens=sample.depth_tokens if depth else None,
    )


def _samples(sources: Sources, depth_tokens: Mapping[str, np.ndarray], teacher_maps: Any, cfg: CurateConfig,
             upstream: dict[str, str], stats: CurateStats, ade_class_names: Mapping[int, str] | None,
             llava_json: str | None, glamm_json: str | None) -> Iterator[Sample]:
    tasks = set(cfg.tasks)
    eval_images = sources.eval_image_ids()
    if "refer_seg" in tasks and sources.refs:
        yield from _ref_samples(sources, depth_tokens, teacher_maps, cfg, upstream, stats, eval_images)
    if "semantic_seg" in tasks and sources.ade:
        names = ade_class_names if ade_class_names is not None else sources.ade_classes
        yield from _ade_samples(sources, names, depth_tokens, teacher_maps, cfg, upstream, stats)
    if "depth_cot" in tasks:
        if teacher_maps is None:
            stats.skip("depth_cot: no teacher maps given")
        else:
            yield from depth_cot_samples(sources, depth_tokens, teacher_maps, cfg, upstream, stats, eval_images)
    if "instruct" in tasks and llava_json:
        yield from llava_samples(llava_json, cfg.llava_image_root, upstream, stats)
    if "grounded_conv" in tasks and glamm_json:
        yield from glamm_samples(glamm_json, cfg.glamm_image_root, depth_tokens, cfg, upstream, stats)


@dataclass
class CurateResult:
    """What :func:`curate` wrote into ``out_dir``: the shards (in order), the manifest and the
    quarantine parquet files, the stats (``CurateStats.to_dict()``) and how many samples were
    written now vs found in complete shards of an earlier (killed) run."""

    out_dir: str
    shards: list[ShardInfo]
    manifest: str
    quarantine: str
    stats: dict[str, Any]
    n_samples: int
    n_resumed: int
    n_quarantined: int

    def shard_paths(self) -> list[str]:
        """Shard paths in order (for ``read_shards`` / training)."""
        return [str(Path(self.out_dir) / s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for the artifact manifest (shards with sizes and sha256)."""
        return {
            "out_dir": self.out_dir,
            "shards": [{"name": s.name, "n_samples": s.n_samples, "bytes": s.n_bytes, "sha256": s.sha256}
                       for s in self.shards],
            "manifest": self.manifest,
            "quarantine": self.quarantine,
            "n_samples": self.n_samples,
            "n_resumed": self.n_resumed,
            "n_quarantined": self.n_quarantined,
            "stats": self.stats,
        }  # fmt: skip


def curate(
    sources: Sources,
    depth_tokens: Mapping[str, np.ndarray],
    teacher_maps: Mapping[str, np.ndarray] | None,
    cfg: CurateConfig,
    upstream: dict[str, str],
    out_dir: str | os.PathLike[str],
    *,
    ade_class_names: Mapping[int, str] | None = None,
    llava_json: str | None = None,
    glamm_json: str | None = None,
    num_tokens: int,
    codebook_size: int,
    tokens_source: str,
    prefix: str = "samples",
    verify_resume: bool = True,
) -> CurateResult:
    """Curate the sources into ``out_dir``: shards ``{prefix}-%06d.tar`` (+ ``.idx.json``),
    ``quarantine.parquet`` (the readers' quarantine then every curation drop) and, last,
    ``manifest.parquet``. Resumes a killed run in the same directory (see
    :class:`~perceptio_core.curation.shards.ShardWriter`); the result is byte-identical to an uninterrupted
    run. Arguments as :func:`iter_samples`; first, :func:`check_depth_tokens` refuses
    ``depth_tokens`` (named ``tokens_source`` in the error) unless each image has ``num_tokens`` (N)
    codes below ``codebook_size`` (K), the codebook artifact's."""
    check_depth_tokens(depth_tokens, num_tokens, codebook_size, tokens_source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.parquet").unlink(missing_ok=True)
    stats = CurateStats()
    with QuarantineLog(out / "quarantine.parquet") as qlog:
        for q in sources.quarantine:
            qlog.add(q)
        stats.on_drop = qlog.add
        with ShardWriter(out, prefix, cfg.shard_max_bytes, cfg.shard_max_samples, verify_resume) as writer:
            n_resumed = writer.resume_count
            for sample in iter_samples(
                sources, depth_tokens, teacher_maps, cfg, upstream, stats,
                ade_class_names=ade_class_names, llava_json=llava_json, glamm_json=glamm_json,
            ):  # fmt: skip
                writer.write(sample)
        shards = writer.close()
        n_quarantined = qlog.n_rows
    manifest = write_manifest(out, shards, prefix)
    stats.on_drop = None
    return CurateResult(
        out_dir=str(out), shards=shards, manifest=str(manifest), quarantine=str(out / "quarantine.parquet"),
        stats=stats.to_dict(), n_samples=sum(s.n_samples for s in shards), n_resumed=n_resumed,
        n_quarantined=n_quarantined,
    )  # fmt: skip

