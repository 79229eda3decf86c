"""Resolve every dataset a run names into records (SPEC §5 data, §6 benchmarks; the ``sources`` stage).

:func:`read_sources` reads, relative to a data root (the synthetic world or a real tree laid out the
same way), everything :class:`~perceptio_core.config.DataConfig` names ("" skips a source):

- the REFER trees ``<root>/<dataset>/`` (``instances.json`` + ``refs(<split_by>).p``) on the COCO
  images in ``data.coco_images``: :func:`perceptio_core.data.refer.read_refer`;
- COCO captions (``data.captions``), image ids resolved through the captions file's ``images``;
- ADE20k (``data.ade20k``): :func:`perceptio_core.data.ade20k.read_ade20k`;
- HardBLINK (``data.hardblink``), in AURORA's public layout (``questions/``, ``answers/``,
  ``images/blink{N}pointscenter/``; the synthetic world adds ``points/``):
  :func:`perceptio_core.data.hardblink.read_hardblink`;
- MMBench-format VQA (``data.vqa_tsv``): :func:`perceptio_core.data.vqa.read_mmbench_tsv`, its images
  decoded into ``<cache_dir>/vqa-images`` (default cache: ``$XDG_CACHE_HOME/perceptio`` or
  ``~/.cache/perceptio``).

Every image is opened, verified, decoded and digested once (a shared
:class:`~perceptio_core.data.image_io.ImageValidator`); each COCO and ADE20k record carries the sha256 of
its file, the key of its depth map downstream. Where ``<root>/depth/<image stem>.npy`` exists (the
synthetic world writes one per image) records carry it as ``depth_path``. Bad records are
quarantined with a reason and the rest goes on; what is missing at the dataset level (the root,
a named folder, a refs pickle, an annotation file) raises
:class:`~perceptio_core.data.records.DatasetNotFoundError` naming the path.

The optional LLaVA-1.5 / GLaMM conversation sources of SPEC §5 (``data.llava_json``,
``data.glamm_json``) are not read here but by curation (:mod:`perceptio_core.curation.curate`); here they are
resolved (:func:`data_path`), checked to exist (a missing one raises naming the path) and their JSON
is part of the fingerprint, so editing one re-curates.

:func:`data_fingerprint` is the cheap content digest used in cache keys: the sha256 of
(the resolved root path, the data config, the full sha256 of every annotation / pickle / JSON /
JSONL / TSV / class-table file, and for every image folder the sorted ``(relative name, size)``
listing). It reads the small files completely and only lists the image folders, so an image edited
in place without changing its size is not noticed: replace files rather than rewriting them in
place.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from perceptio_core.data.ade20k import read_ade20k
from perceptio_core.config import DataConfig, canonical_json
from perceptio_core.data.hardblink import dataset_files as hardblink_files
from perceptio_core.data.hardblink import read_hardblink
from perceptio_core.data.image_io import ImageError, ImageValidator
from perceptio_core.data.records import (
    REASON_EMPTY_CAPTION,
    REASON_MALFORMED,
    DatasetNotFoundError,
    ImageRecord,
    QuarantineEntry,
    Sources,
    read_annotation_json,
)
from perceptio_core.data.refer import REFER_SPLIT_BY, read_refer, refs_path
from perceptio_core.data.vqa import read_mmbench_tsv

DEPTH_DIR = "depth"  # <root>/depth/<image stem>.npy: true depth, when the data has it


class SourceError(ValueError):
    """The data config asks for something :func:`read_sources` cannot provide."""


@dataclass(frozen=True)
class SourcePaths:
    """The resolved locations of every source a :class:`DataConfig` names (None: skipped)."""

    root: Path
    coco_images: Path
    refer: dict[str, tuple[Path, str]] = field(default_factory=dict)  # dataset -> (folder, split_by)
    captions: Path | None = None
    ade20k: Path | None = None
    hardblink: Path | None = None
    vqa_tsv: Path | None = None
    depth: Path | None = None
    llava_json: Path | None = None
    glamm_json: Path | None = None


def data_path(root: str | os.PathLike[str], rel: str) -> Path:
    """A ``data.*`` path: absolute as given, else under the data ``root``."""
    p = Path(rel).expanduser()
    return p if p.is_absolute() else Path(root) / p


def _need(path: Path, what: str, is_dir: bool) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        raise DatasetNotFoundError(f"{what} not found: {path}")
    return path


def resolve_paths(root: str | os.PathLike[str], data_cfg: DataConfig) -> SourcePaths:
    """Resolve and check the paths of every named source (relative to ``root``; absolute paths
    are kept). Raises :class:`DatasetNotFoundError` naming the first missing path, and
    :class:`SourceError` for a source this reader does not support."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DatasetNotFoundError(f"data root not found: {r}")
    r = r.resolve()
    refer: dict[str, tuple[Path, str]] = {}
    for ds in data_cfg.refer_datasets:
        split_by = data_cfg.refer_split_by.get(ds) or REFER_SPLIT_BY.get(ds)
        if not split_by:
            raise SourceError(f"no split_by for REFER dataset {ds!r}: set data.refer_split_by.{ds}")
        d = _need(r / ds, f"REFER dataset folder ({ds})", True)
        _need(d / "instances.json", f"REFER instances file ({ds})", False)
        _need(refs_path(d, split_by), f"REFER refs pickle ({ds}, split_by={split_by})", False)
        refer[ds] = (d, split_by)
    coco = data_path(r, data_cfg.coco_images)
    if refer or data_cfg.captions:
        _need(coco, "COCO image folder (data.coco_images)", True)
    depth = r / DEPTH_DIR
    return SourcePaths(
        root=r,
        coco_images=coco,
        refer=refer,
        captions=_need(data_path(r, data_cfg.captions), "COCO captions file (data.captions)", False)
        if data_cfg.captions else None,
        ade20k=_need(data_path(r, data_cfg.ade20k), "ADE20k folder (data.ade20k)", True)
        if data_cfg.ade20k else None,
        hardblink=_need(data_path(r, data_cfg.hardblink), "HardBLINK folder (data.hardblink)", True)
        if data_cfg.hardblink else None,
        vqa_tsv=_need(data_path(r, data_cfg.vqa_tsv), "MMBench TSV (data.vqa_tsv)", False)
        if data_cfg.vqa_tsv else None,
        depth=depth if depth.is_dir() else None,
        llava_json=_need(data_path(r, data_cfg.llava_json), "LLaVA instruction JSON (data.llava_json)", False)
        if data_cfg.llava_json else None,
        glamm_json=_need(data_path(r, data_cfg.glamm_json), "GLaMM conversation JSON (data.glamm_json)", False)
        if data_cfg.glamm_json else None,
    )


class CaptionsResult(NamedTuple):
    """What :func:`read_captions` returns."""

    captions: list[tuple[int, str]]
    images: dict[int, ImageRecord]
    quarantine: list[QuarantineEntry]


def read_captions(
    path: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    validator: ImageValidator | None = None,
    depth_dir: str | os.PathLike[str] | None = None,
) -> CaptionsResult:
    """Read a COCO captions file: ``(image_id, caption)`` pairs in file order and the images they
    use. Quarantined (source "captions"): an image that is missing or corrupt (once per image, its
    captions dropped), a caption naming an unlisted image, an empty caption."""
    p = Path(path)
    data = read_annotation_json(p, "COCO captions file")
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{p}: no 'images' and 'annotations' lists (not a COCO captions file)")
    validator = validator or ImageValidator()
    listed = {int(im["id"]): im for im in data["images"] if isinstance(im, dict) and "id" in im}
    images: dict[int, ImageRecord] = {}
    bad_images: set[int] = set()
    captions: list[tuple[int, str]] = []
    quarantine: list[QuarantineEntry] = []
    for a in data["annotations"]:
        if not isinstance(a, dict) or "image_id" not in a:
            cid = a.get("id", "?") if isinstance(a, dict) else "?"
            quarantine.append(QuarantineEntry("captions", f"caption id={cid}", f"{REASON_MALFORMED}: no image_id"))
            continue
        image_id = int(a["image_id"])
        rec = f"caption id={a.get('id', '?')} image_id={image_id}"
        text = str(a.get("caption") or "").strip()
        if not text:
            quarantine.append(QuarantineEntry("captions", rec, REASON_EMPTY_CAPTION))
            continue
        if image_id not in listed:
            quarantine.append(QuarantineEntry(
                "captions", rec, f"{REASON_MALFORMED}: image_id not in the captions file's images"))
            continue
        if image_id in bad_images:
            continue
        if image_id not in images:
            fname = str(listed[image_id].get("file_name", ""))
            ipath = Path(images_dir) / fname
            try:
                info = validator.check(ipath)
            except ImageError as e:
                bad_images.add(image_id)
                quarantine.append(QuarantineEntry("captions", f"image_id={image_id} ({fname})",
                                                  e.quarantine_reason))
                continue
            depth = Path(depth_dir) / f"{Path(fname).stem}.npy" if depth_dir else None
            images[image_id] = ImageRecord(
                image_id, fname, str(ipath.resolve()), info.width, info.height, "coco",
                str(depth.resolve()) if depth is not None and depth.is_file() else None, info.digest)
        captions.append((image_id, text))
    return CaptionsResult(captions, images, quarantine)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/perceptio`` (or ``~/.cache/perceptio``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "perceptio"


def read_sources(
    root: str | os.PathLike[str],
    data_cfg: DataConfig,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Sources:
    """Read every source ``data_cfg`` names under ``root`` (module docstring) into :class:`Sources`.

    ``cache_dir`` receives the decoded VQA images (``<cache_dir>/vqa-images``); ``progress`` shows
    tqdm bars. Per-record problems are quarantined; dataset-level ones raise
    :class:`DatasetNotFoundError` / :class:`SourceError`.
    """
    paths = resolve_paths(root, data_cfg)
    validator = ImageValidator()
    out = Sources(root=str(paths.root))
    for ds, (folder, split_by) in paths.refer.items():
        res = read_refer(folder, paths.coco_images, ds, split_by, validator, paths.depth, progress)
        out.refs += res.refs
        out.coco_images.update(res.images)
        out.quarantine += res.quarantine
    if paths.captions is not None:
        cap = read_captions(paths.captions, paths.coco_images, validator, paths.depth)
        out.captions = cap.captions
        for i, rec in cap.images.items():
            out.coco_images.setdefault(i, rec)
        out.quarantine += cap.quarantine
    out.coco_images = dict(sorted(out.coco_images.items()))
    if paths.ade20k is not None:
        ade = read_ade20k(paths.ade20k, validator, paths.depth, progress)
        out.ade, out.ade_classes = ade.records, ade.classes
        out.quarantine += ade.quarantine
    if paths.hardblink is not None:
        hb = read_hardblink(paths.hardblink, validator, paths.depth)
        out.hardblink = hb.records
        out.quarantine += hb.quarantine
    if paths.vqa_tsv is not None:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        vqa = read_mmbench_tsv(paths.vqa_tsv, cache / "vqa-images")
        out.vqa = vqa.records
        out.quarantine += vqa.quarantine
    return out


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def _hash_file(h: "hashlib._Hash", path: Path, root: Path) -> None:
    fh = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            fh.update(block)
    h.update(f"file {_rel(path, root)} {fh.hexdigest()}\n".encode())


def _hash_listing(h: "hashlib._Hash", folder: Path, root: Path) -> None:
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            entries.append(f"{_rel(p, folder)}\t{size}")
    entries.sort()
    lh = hashlib.sha256("\n".join(entries).encode("utf-8"))
    h.update(f"dir {_rel(folder, root)} {len(entries)} {lh.hexdigest()}\n".encode())


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def data_fingerprint(root: str | os.PathLike[str], data_cfg: DataConfig) -> str:
    """A cheap content digest (sha256 hex) of the data ``data_cfg`` names under ``root`` (module
    docstring says what goes in). Raises what :func:`resolve_paths` raises for missing sources."""
    paths = resolve_paths(root, data_cfg)
    h = hashlib.sha256()
    h.update(f"root {paths.root}\n".encode())
    h.update(f"config {canonical_json(data_cfg)}\n".encode())
    for ds, (folder, split_by) in sorted(paths.refer.items()):
        _hash_file(h, folder / "instances.json", paths.root)
        _hash_file(h, refs_path(folder, split_by), paths.root)
    if paths.refer or paths.captions is not None:
        _hash_listing(h, paths.coco_images, paths.root)
    if paths.captions is not None:
        _hash_file(h, paths.captions, paths.root)
    if paths.ade20k is not None:
        for name in ("objectInfo150.csv", "objectInfo150.txt"):
            if (paths.ade20k / name).is_file():
                _hash_file(h, paths.ade20k / name, paths.root)
        _hash_listing(h, paths.ade20k / "images", paths.root)
        if (paths.ade20k / "annotations").is_dir():
            _hash_listing(h, paths.ade20k / "annotations", paths.root)
    if paths.hardblink is not None:
        for f in hardblink_files(paths.hardblink):  # questions, answers and (the world's) points JSONL
            _hash_file(h, f, paths.root)
        _hash_listing(h, paths.hardblink, paths.root)
    if paths.vqa_tsv is not None:
        _hash_file(h, paths.vqa_tsv, paths.root)
    if paths.depth is not None:
        _hash_listing(h, paths.depth, paths.root)
    for conv in (paths.llava_json, paths.glamm_json):  # their images are named in the JSON
        if conv is not None:
            _hash_file(h, conv, paths.root)
    return h.hexdigest()
