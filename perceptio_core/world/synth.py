"""The synthetic world: procedurally rendered scenes written in the datasets' real on-disk formats.

The offline default of the pipeline (ARCHITECTURE "world/sources") stands in for every corpus of
SPEC §5 and §6, so the real loaders run on it unchanged. :func:`generate_world` writes:

- COCO train2014 images (``images/train2014/COCO_train2014_%012d.jpg``) with their instances JSON
  (``annotations/instances_train2014.json``, and a copy as REFER ships it in each of ``refcoco/``,
  ``refcoco+/`` and ``refcocog/`` as ``instances.json``); polygons, compressed RLE and crowds'
  uncompressed RLE, plus an ``attributes`` dict per annotation.
- REFER trees (SPEC §5): ``refcoco/refs(unc).p``, ``refcoco+/refs(unc).p``, ``refcocog/refs(umd).p``,
  split by image, one partition of the images for all three. Every expression singles out one
  object among everything visible in the image, in the style of its dataset.
- ADE20k SceneParsing layout (``ADEChallengeData2016/``) with class-index PNGs and
  ``objectInfo150.csv`` listing the world's 7 classes.
- A HardBLINK-style set (SPEC §6) under ``HardBLINK/`` in AURORA's public layout: 3, 4 and 5
  points per image, ``questions/blink_{N}pointscenter_questions.jsonl``,
  ``answers/blink_{N}pointscenter_answers.jsonl``, ``images/blink{N}pointscenter/*.png``, plus the
  point coordinates, which the public release lacks, in the world's own
  ``points/blink_{N}pointscenter_points.jsonl``; the closest point has the smallest true depth.
- MMBench-format multiple-choice VQA (``vqa/mmbench_world.tsv``, base64 JPEG inline) on separate
  scenes, split by scene into "train" and "dev".
- The "train" scenes again as LLaVA-1.5 instruction data (``llava/llava_world.json``, images in
  ``llava/images/``): one multi-turn conversation per scene (its questions, then a yes/no one), and
  text-only conversations among them, as LLaVA-665K has.
- MME in its release layout (``MME_Benchmark_release_version/<subtask>/<stem>.jpg`` + ``.txt``):
  ``synth.mme_images`` images for each of the existence, count, position and color subtasks, each
  with its yes/no pair.
- GLaMM GranD-f-style grounded captions of the REFER training images
  (``glamm/GranDf_world_GCG_train.json``, images in ``glamm/images/``; one phrase per object, each
  with its own mask: :func:`perceptio_core.world.writers.write_gcg`).
- COCO captions (``annotations/captions_train2014.json``), one or two per COCO image.
- True depth of every COCO, ADE20k and HardBLINK image: ``depth/<image file stem>.npy``, float32
  metres, [H, W].
- ``WORLD.json``, written last: generator, version, config and the counts of every part.

The scenes are sampled in :mod:`~perceptio_core.world.scenes` and ray-traced by
:mod:`~perceptio_core.world.render`; their words come from :mod:`~perceptio_core.world.expressions`;
:mod:`~perceptio_core.world.writers` lays out each dataset (encodings, splits and each part's rules
are described there).

Determinism: every image draws from its own ``numpy.random.Generator`` seeded by
``(seed, kind, index)``; JPEGs are written with fixed quality and no metadata; JSON and pickles
have no timestamps. The same config gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from perceptio_core.config import SynthConfig
from perceptio_core.world.render import SKY_DEPTH
from perceptio_core.world.scenes import min_ann_pixels
from perceptio_core.world.writers import (
    HARDBLINK_COUNTS,
    WorldError,
    ade_part,
    coco_part,
    hardblink_min_separation,
    hardblink_part,
    mme_part,
    vqa_part,
    write_gcg,
)

GENERATOR_VERSION = "5"  # 2: llava/llava_world.json; 3: HardBLINK in AURORA's public layout;
# 4: glamm/ (GranD-f-style GCG); 5: MME, multi-turn and text-only LLaVA conversations
WORLD_FILE = "WORLD.json"

__all__ = ["GENERATOR_VERSION", "WORLD_FILE", "WorldError", "generate_world", "read_world_info"]


def _world_header(cfg: SynthConfig) -> dict[str, Any]:
    return {"generator": "perceptio_core.world.synth", "version": GENERATOR_VERSION,
            "config": dataclasses.asdict(cfg)}


def read_world_info(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``WORLD.json`` of a generated world, or None when ``out_dir`` holds none."""
    p = Path(out_dir) / WORLD_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _same_world(info: dict[str, Any] | None, cfg: SynthConfig) -> bool:
    if not info:
        return False
    head = _world_header(cfg)
    return all(info.get(k) == v for k, v in head.items())


def generate_world(out_dir: str | os.PathLike[str], cfg: SynthConfig,
                   progress: bool = False) -> dict[str, Any]:
    """Generate the synthetic world into ``out_dir`` (layout: module docstring); return its
    ``WORLD.json`` content: generator, version, the config used and the counts of every part.

    The world is written into ``<out_dir>.tmp-<pid>`` with ``WORLD.json`` last, then renamed into
    place. If ``out_dir`` already holds a world made from the same config and generator version it
    is returned untouched; a world made from another config is replaced. A non-empty ``out_dir``
    without a ``WORLD.json`` is never touched (:class:`WorldError`). Same config => byte-identical
    files. ``progress`` shows a tqdm bar over the rendered scenes.
    """
    out = Path(out_dir)
    info = read_world_info(out)
    if _same_world(info, cfg):
        return info  # type: ignore[return-value]
    if out.exists() and info is None and (not out.is_dir() or any(out.iterdir())):
        raise WorldError(f"{out} exists and is not a synthetic world (no {WORLD_FILE}); "
                         "refusing to overwrite it")
    cfg.__post_init__()  # the config's own checks (sizes, counts), for configs mutated after init
    from tqdm.auto import tqdm

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    total = cfg.images + cfg.ade_images + len(HARDBLINK_COUNTS) * cfg.hardblink_per_count \
        + (cfg.vqa_questions + 1) // 2 + 4 * cfg.mme_images
    try:
        with tqdm(total=total, disable=not progress, desc="synth world", unit="scene") as bar:
            counts: dict[str, int] = {}
            counts.update(coco_part(tmp, cfg, bar))
            counts.update(ade_part(tmp, cfg, bar))
            counts.update(hardblink_part(tmp, cfg, bar))
            counts.update(vqa_part(tmp, cfg, bar))
            counts.update(mme_part(tmp, cfg, bar))
        counts.update(write_gcg(tmp, tmp / "glamm"))  # from the written COCO part: no new scene
        result = {**_world_header(cfg), "counts": counts,
                  "sky_depth": SKY_DEPTH, "min_annotation_pixels": min_ann_pixels(cfg.width, cfg.height),
                  "hardblink_min_separation": hardblink_min_separation(cfg.width, cfg.height)}
        (tmp / WORLD_FILE).write_text(json.dumps(result, indent=1, sort_keys=True))
        old = None
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            # another process finished the same world first: keep theirs when it matches
            if _same_world(read_world_info(out), cfg):
                shutil.rmtree(tmp, ignore_errors=True)
                return read_world_info(out)  # type: ignore[return-value]
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
