"""Resolve the datasets a run names into records (SPEC §5 data, §6 benchmarks).

Two parts, read by two stages so that a benchmark never keys a training stage:

- **training** (:data:`TRAINING`, the ``sources`` stage; :func:`read_training_sources`): the REFER
  trees ``<root>/<dataset>/`` (``instances.json`` + ``refs(<split_by>).p``) on the COCO images in
  ``data.coco_images`` (:func:`perceptio_core.data.refer.read_refer`; their val/test splits are what
  evaluation scores referring segmentation on), COCO captions (``data.captions``, image ids resolved
  through the captions file's ``images``), ADE20k (``data.ade20k``,
  :func:`perceptio_core.data.ade20k.read_ade20k`), and the LLaVA-1.5 / GLaMM conversation files of
  SPEC §5 (``data.llava_json``, ``data.glamm_json``), which are resolved, checked and fingerprinted
  here but read by curation (:mod:`perceptio_core.curation.curate`) and the offline base fit;
- **benchmarks** (:data:`BENCHMARKS`, the ``benchmarks`` stage; :func:`read_benchmarks`): HardBLINK
  (``data.hardblink``) in AURORA's public layout (``questions/``, ``answers/``,
  ``images/blink{N}pointscenter/``; the synthetic world adds ``points/``;
  :func:`perceptio_core.data.hardblink.read_hardblink`), the multiple-choice benchmarks in
  VLMEvalKit's TSV layout (``data.mcq``, name -> TSV, :func:`perceptio_core.data.mcq.read_mcq_tsv`,
  their images decoded into ``image_dir``: the ``benchmarks`` stage gives its artifact's
  ``mcq-images/``, a library caller ``<cache_dir>/mcq-images``, default cache ``$XDG_CACHE_HOME/perceptio``
  or ``~/.cache/perceptio``) and MME in its release layout (``data.mme``,
  :func:`perceptio_core.data.mme.read_mme`).

:func:`read_sources` reads both into one :class:`~perceptio_core.data.records.Sources`. Paths are
relative to the data root unless absolute; ``""`` (or null) skips a dataset. Every image is opened,
verified, decoded and digested once (a shared :class:`~perceptio_core.data.image_io.ImageValidator`);
each COCO and ADE20k record carries the sha256 of its file, the key of its depth map downstream.
Where ``<root>/depth/<image stem>.npy`` exists (the synthetic world writes one per image) records
carry it as ``depth_path``.

A data root holds what it holds. Bad records are quarantined with a reason and the rest goes on;
datasets the config names but the disk lacks (a folder, a refs pickle, an annotation file) are
all listed in one :class:`~perceptio_core.data.records.MissingDataError` (:func:`resolve_paths`),
each with its path and the ``--set`` that skips it (``--set data.ade20k=``, ``--set
data.mcq.mmbench=``, ``--set 'data.refer_datasets=[refcoco]'``). Only the parts asked for are checked:
the benchmarks are not demanded by a reader of the training sources, nor the training sources by
one of the benchmarks.

:func:`data_fingerprint` is the cheap content digest of one or both parts used in cache keys: the
sha256 of (the resolved root path, the part's config fields, the full sha256 of every annotation /
pickle / JSON / JSONL / TSV / class-table file, and for every image folder the sorted
``(relative name, size)`` listing, and the listing of the true-depth files of the part's images).
It reads the small files completely and only lists the image folders, so an image edited in place
without changing its size is not noticed: replace files rather than rewriting them in place. With
``generated=True`` (the synthetic world, keyed by its generator instead) the paths under the root
are neither checked nor read, and only datasets named by an absolute path outside it are.
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
from perceptio_core.data.image_io import ImageError, ImageValidator, confined
from perceptio_core.data.limits import MAX_CAPTION_CHARS
from perceptio_core.data.records import (
    REASON_EMPTY_CAPTION,
    REASON_MALFORMED,
    REASON_OUTSIDE_ROOT,
    REASON_UNREADABLE_FILE,
    Benchmarks,
    DatasetNotFoundError,
    ImageRecord,
    MissingDataError,
    MissingDataset,
    QuarantineEntry,
    Sources,
    read_annotation_json,
)
from perceptio_core.data.refer import REFER_SPLIT_BY, FieldError, as_int, as_text, describe, read_refer, refs_path
from perceptio_core.data.safe_pickle import PickleReadError, UnsafePickleError
from perceptio_core.data.mcq import read_mcq_tsv
from perceptio_core.data.mme import mme_files, read_mme

DEPTH_DIR = "depth"  # <root>/depth/<image stem>.npy: true depth, when the data has it

TRAINING = "training"  # REFER + COCO images, captions, ADE20k, LLaVA / GLaMM: the sources stage
BENCHMARKS = "benchmarks"  # HardBLINK, the multiple-choice TSVs, MME: the benchmarks stage
PARTS = (TRAINING, BENCHMARKS)
# the DataConfig fields each part reads (``root`` besides)
FIELDS = {
    TRAINING: ("refer_datasets", "refer_split_by", "coco_images", "ade20k", "captions", "llava_json", "glamm_json"),
    BENCHMARKS: ("hardblink", "mcq", "mme"),
}


class SourceError(ValueError):
    """The data config asks for something :func:`read_sources` cannot provide."""


@dataclass(frozen=True)
class SourcePaths:
    """The resolved locations of every source a :class:`DataConfig` names in the parts resolved
    (None: skipped, or in a part not asked for)."""

    root: Path
    coco_images: Path
    refer: dict[str, tuple[Path, str]] = field(default_factory=dict)  # dataset -> (folder, split_by)
    captions: Path | None = None
    ade20k: Path | None = None
    hardblink: Path | None = None
    mcq: dict[str, Path] = field(default_factory=dict)  # benchmark name -> TSV
    mme: Path | None = None
    depth: Path | None = None
    llava_json: Path | None = None
    glamm_json: Path | None = None


def data_path(root: str | os.PathLike[str], rel: str) -> Path:
    """A ``data.*`` path: absolute as given, else under the data ``root``."""
    p = Path(rel).expanduser()
    return p if p.is_absolute() else Path(root) / p


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


class _Checker:
    """Collects every missing dataset instead of stopping at the first. Paths under ``exempt`` (a
    world not generated yet) are taken as they are."""

    def __init__(self, exempt: Path | None):
        self.exempt = exempt
        self.missing: list[MissingDataset] = []

    def need(self, path: Path, what: str, skip: str, is_dir: bool) -> bool:
        if self.exempt is not None and _under(path, self.exempt):
            return True
        if path.is_dir() if is_dir else path.is_file():
            return True
        self.missing.append(MissingDataset(what, str(path), skip))
        return False


def _refer_skip(present: list[str]) -> str:
    return f"--set 'data.refer_datasets=[{', '.join(present)}]'"


def resolve_paths(
    root: str | os.PathLike[str], data_cfg: DataConfig, parts: tuple[str, ...] = PARTS, generated: bool = False
) -> SourcePaths:
    """Resolve and check the paths of every source ``data_cfg`` names in ``parts`` (relative to
    ``root``; absolute paths are kept). Raises :class:`DatasetNotFoundError` when ``root`` is not
    a folder, one :class:`MissingDataError` listing every missing dataset (each with the ``--set``
    that skips it), and :class:`SourceError` for a source this reader does not support. With
    ``generated`` (a synthetic world that may not exist yet) nothing under ``root`` is checked."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SourceError(f"unknown source part(s) {sorted(unknown)} (known: {', '.join(PARTS)})")
    r = Path(root).expanduser()
    if not generated and not r.is_dir():
        raise DatasetNotFoundError(f"data root not found: {r}")
    r = r.resolve()
    check = _Checker(r if generated else None)
    training, benchmarks = TRAINING in parts, BENCHMARKS in parts

    def opt(rel: str | None, what: str, key: str, is_dir: bool, wanted: bool) -> Path | None:
        if not wanted or not rel:
            return None
        p = data_path(r, rel)
        check.need(p, f"{what} ({key})", f"--set {key}=", is_dir)
        return p

    refer: dict[str, tuple[Path, str]] = {}
    datasets = list(data_cfg.refer_datasets) if training else []
    for ds in datasets:
        if not (data_cfg.refer_split_by.get(ds) or REFER_SPLIT_BY.get(ds)):
            raise SourceError(f"no split_by for REFER dataset {ds!r}: set data.refer_split_by.{ds}")
    complete = [ds for ds in datasets if (r / ds / "instances.json").is_file()
                and refs_path(r / ds, data_cfg.refer_split_by.get(ds) or REFER_SPLIT_BY[ds]).is_file()]
    if generated:
        complete = datasets
    for ds in datasets:
        split_by = data_cfg.refer_split_by.get(ds) or REFER_SPLIT_BY[ds]
        d = r / ds
        skip = _refer_skip(complete)
        if check.need(d, f"REFER dataset folder ({ds}, in data.refer_datasets)", skip, True):
            check.need(d / "instances.json", f"REFER instances file ({ds})", skip, False)
            check.need(refs_path(d, split_by), f"REFER refs pickle ({ds}, split_by={split_by})", skip, False)
        refer[ds] = (d, split_by)
    coco = data_path(r, data_cfg.coco_images)
    captions = opt(data_cfg.captions, "COCO captions file", "data.captions", False, training)
    readers = [(name, skip) for name, skip, on in (("REFER", _refer_skip([]), bool(refer)),
                                                    ("captions", "--set data.captions=", captions is not None)) if on]
    if readers:
        check.need(coco, f"COCO image folder (data.coco_images, read by {' and '.join(n for n, _ in readers)})",
                   " ".join(sk for _, sk in readers), True)
    ade20k = opt(data_cfg.ade20k, "ADE20k folder", "data.ade20k", True, training)
    llava_json = opt(data_cfg.llava_json, "LLaVA instruction JSON", "data.llava_json", False, training)
    glamm_json = opt(data_cfg.glamm_json, "GLaMM conversation JSON", "data.glamm_json", False, training)
    out = SourcePaths(
        root=r,
        coco_images=coco,
        refer=refer,
        captions=captions,
        ade20k=ade20k,
        hardblink=opt(data_cfg.hardblink, "HardBLINK folder", "data.hardblink", True, benchmarks),
        mcq={name: p for name, rel in sorted(data_cfg.mcq.items())
             if (p := opt(rel, f"multiple-choice TSV {name!r}", f"data.mcq.{name}", False, benchmarks))},
        mme=opt(data_cfg.mme, "MME folder", "data.mme", True, benchmarks),
        depth=r / DEPTH_DIR if (r / DEPTH_DIR).is_dir() else None,
        llava_json=llava_json,
        glamm_json=glamm_json,
    )
    if check.missing:
        raise MissingDataError(check.missing)
    return out


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
    use. Quarantined (source "captions", the record naming the caption and image ids): an image that
    is missing, corrupt, not a regular file or named outside ``images_dir`` (once per image, its
    captions dropped), a caption naming an unlisted image, an id that is not an integer, a caption
    that is empty, not text, over :data:`~perceptio_core.data.limits.MAX_CAPTION_CHARS` or holding a
    lone surrogate. A file that is not a COCO captions file raises ``ValueError`` naming it."""
    p = Path(path)
    data = read_annotation_json(p, "COCO captions file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{p}: no 'images' and 'annotations' lists (not a COCO captions file)")
    validator = validator or ImageValidator()
    images: dict[int, ImageRecord] = {}
    bad_images: set[int] = set()
    captions: list[tuple[int, str]] = []
    quarantine: list[QuarantineEntry] = []

    def bad(record: str, reason: str) -> None:
        quarantine.append(QuarantineEntry("captions", record, reason))

    listed: dict[int, str] = {}
    for k, im in enumerate(data["images"]):
        try:
            if not isinstance(im, dict) or "id" not in im:
                raise FieldError(f"{REASON_MALFORMED}: {p.name}: not an object with an id")
            iid = as_int(im["id"], f"{p.name}: image id")
            listed.setdefault(iid, as_text(im.get("file_name", ""), f"{p.name}: image {iid} file_name", 4096,
                                           "a file name's 4096"))
        except FieldError as e:
            bad(f"image #{k}", str(e))
    for k, a in enumerate(data["annotations"]):
        cid = describe(a.get("id", "?")) if isinstance(a, dict) else "?"
        if not isinstance(a, dict) or "image_id" not in a:
            bad(f"caption id={cid}", f"{REASON_MALFORMED}: {p.name}: caption #{k} has no image_id")
            continue
        try:
            image_id = as_int(a["image_id"], f"{p.name}: caption #{k} image_id")
        except FieldError as e:
            bad(f"caption id={cid}", str(e))
            continue
        rec = f"caption id={cid} image_id={image_id}"
        raw = a.get("caption")
        if raw is None or raw == "":
            bad(rec, REASON_EMPTY_CAPTION)
            continue
        try:
            text = as_text(raw, f"{p.name}: caption", MAX_CAPTION_CHARS, "MAX_CAPTION_CHARS").strip()
        except FieldError as e:
            bad(rec, str(e))
            continue
        if not text:
            bad(rec, REASON_EMPTY_CAPTION)
            continue
        if image_id not in listed:
            bad(rec, f"{REASON_MALFORMED}: image_id not in the captions file's images")
            continue
        if image_id in bad_images:
            continue
        if image_id not in images:
            fname = listed[image_id]
            ipath = confined(images_dir, fname)
            try:
                if ipath is None:
                    raise FieldError(f"{REASON_OUTSIDE_ROOT}: file_name {describe(fname)} is not under the "
                                     "image folder")
                info = validator.check(ipath)
            except (FieldError, ImageError) as e:
                bad_images.add(image_id)
                bad(f"image_id={image_id} ({fname})", e.quarantine_reason if isinstance(e, ImageError) else str(e))
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


def read_training_sources(
    root: str | os.PathLike[str],
    data_cfg: DataConfig,
    progress: bool = False,
) -> Sources:
    """Read the training part (module docstring) under ``root`` into :class:`Sources`
    (the benchmarks empty). Per-record problems are quarantined; missing datasets raise
    one :class:`MissingDataError` (:func:`resolve_paths`); ``progress`` shows tqdm bars."""
    paths = resolve_paths(root, data_cfg, (TRAINING,))
    return _read_training(paths, ImageValidator(), progress)


def read_benchmarks(
    root: str | os.PathLike[str],
    data_cfg: DataConfig,
    cache_dir: str | os.PathLike[str] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
) -> Benchmarks:
    """Read the evaluation benchmarks (HardBLINK, the multiple-choice TSVs, MME) under ``root`` into
    :class:`Benchmarks`; the TSVs' decoded images go to ``image_dir`` (default
    ``<cache_dir>/mcq-images``). Per-record problems are quarantined; missing datasets raise one
    :class:`MissingDataError`."""
    paths = resolve_paths(root, data_cfg, (BENCHMARKS,))
    return _read_benchmarks(paths, ImageValidator(), cache_dir, image_dir)


def read_sources(
    root: str | os.PathLike[str],
    data_cfg: DataConfig,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Sources:
    """Read every source ``data_cfg`` names under ``root``, training part and benchmarks (module
    docstring), into one :class:`Sources`: :func:`read_training_sources` joined with
    :func:`read_benchmarks` (:meth:`Sources.with_benchmarks`), every missing dataset of both in one
    :class:`MissingDataError`."""
    paths = resolve_paths(root, data_cfg, PARTS)
    validator = ImageValidator()
    return _read_training(paths, validator, progress).with_benchmarks(_read_benchmarks(paths, validator, cache_dir))


# What a dataset file that cannot be read as a whole raises: a refused or broken pickle, JSON that
# is not JSON (or nests past the parser's depth), a file that is not the layout, an unreadable file.
# DatasetNotFoundError (a file gone since resolve_paths) is not among them: it stops the read.
_FILE_ERRORS = (UnsafePickleError, PickleReadError, ValueError, RecursionError, OSError)


def _file_fault(source: str, path: Path, e: BaseException) -> QuarantineEntry:
    """The quarantine entry that sets one whole dataset file aside (record: the file), the reason in
    words: the error's own message, which names the file (never a repr of an object)."""
    msg = str(e) if not isinstance(e, RecursionError) else "nested too deep to read"
    msg = msg if len(msg) <= 500 else msg[:500] + "..."
    return QuarantineEntry(source, str(path), f"{REASON_UNREADABLE_FILE}: {type(e).__name__}: {msg}")


def _read_training(paths: SourcePaths, validator: ImageValidator, progress: bool) -> Sources:
    """The training part; a dataset whose file cannot be read as a whole (a refs pickle that would
    run code, an instances.json that is not JSON, ...) is quarantined as one entry naming the file
    and the others are read."""
    out = Sources(root=str(paths.root))
    for ds, (folder, split_by) in paths.refer.items():
        try:
            res = read_refer(folder, paths.coco_images, ds, split_by, validator, paths.depth, progress)
        except DatasetNotFoundError:
            raise
        except _FILE_ERRORS as e:
            bad_file = refs_path(folder, split_by) if isinstance(e, (UnsafePickleError, PickleReadError)) else folder
            out.quarantine.append(_file_fault(ds, bad_file, e))
            continue
        # REFER datasets share COCO's image ids: an id another dataset gave another file is a clash
        clash = {i: out.coco_images[i] for i, rec in res.images.items()
                 if i in out.coco_images and out.coco_images[i].path != rec.path}
        for r in res.refs:
            if r.image_id in clash:
                out.quarantine.append(QuarantineEntry(ds, f"ref_id={r.ref_id} sent_id={r.sent_id}", (
                    f"{REASON_MALFORMED}: image_id {r.image_id} is {res.images[r.image_id].file_name} here but "
                    f"{clash[r.image_id].file_name} in an earlier dataset (image ids are shared across REFER "
                    "datasets)")))
        out.refs += [r for r in res.refs if r.image_id not in clash]
        out.coco_images.update({i: rec for i, rec in res.images.items() if i not in clash})
        out.quarantine += res.quarantine
    if paths.captions is not None:
        try:
            cap = read_captions(paths.captions, paths.coco_images, validator, paths.depth)
        except DatasetNotFoundError:
            raise
        except _FILE_ERRORS as e:
            out.quarantine.append(_file_fault("captions", paths.captions, e))
        else:
            out.captions = cap.captions
            for i, rec in cap.images.items():
                out.coco_images.setdefault(i, rec)
            out.quarantine += cap.quarantine
    out.coco_images = dict(sorted(out.coco_images.items()))
    if paths.ade20k is not None:
        try:
            ade = read_ade20k(paths.ade20k, validator, paths.depth, progress)
        except DatasetNotFoundError:
            raise
        except _FILE_ERRORS as e:
            out.quarantine.append(_file_fault("ade20k", paths.ade20k, e))
        else:
            out.ade, out.ade_classes = ade.records, ade.classes
            out.quarantine += ade.quarantine
    return out


def _read_benchmarks(paths: SourcePaths, validator: ImageValidator, cache_dir: str | os.PathLike[str] | None,
                     image_dir: str | os.PathLike[str] | None = None) -> Benchmarks:
    out = Benchmarks(root=str(paths.root))
    if paths.hardblink is not None:
        hb = read_hardblink(paths.hardblink, validator, paths.depth)
        out.hardblink = hb.records
        out.quarantine += hb.quarantine
    if image_dir is None:
        image_dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "mcq-images"
    for name, tsv in paths.mcq.items():
        mcq = read_mcq_tsv(tsv, image_dir, benchmark=name)
        out.mcq += mcq.records
        out.quarantine += mcq.quarantine
    if paths.mme is not None:
        mme = read_mme(paths.mme, validator)
        out.mme = mme.records
        out.quarantine += mme.quarantine
    return out


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def _hash_file(h: "hashlib._Hash", path: Path, root: Path) -> None:
    fh = hashlib.sha256()
    if not path.is_file():  # a FIFO or a device is never opened (it would hang or never end)
        h.update(f"file {_rel(path, root)} not-a-regular-file\n".encode())
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            fh.update(block)
    h.update(f"file {_rel(path, root)} {fh.hexdigest()}\n".encode())


def _hash_listing(h: "hashlib._Hash", folder: Path, root: Path) -> set[str]:
    """Hash the sorted ``(relative name, size)`` listing of ``folder``; return the file stems."""
    entries: list[str] = []
    stems: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            entries.append(f"{_rel(p, folder)}\t{size}")
            stems.add(p.stem)
    entries.sort()
    lh = hashlib.sha256("\n".join(entries).encode("utf-8"))
    h.update(f"dir {_rel(folder, root)} {len(entries)} {lh.hexdigest()}\n".encode())
    return stems


def _hash_depth(h: "hashlib._Hash", depth_dir: Path, stems: set[str], root: Path) -> None:
    """Hash the listing of the true-depth files ``<stem>.npy`` of the images ``stems`` (those of the
    part fingerprinted, not every image's)."""
    entries = []
    for p in depth_dir.glob("*.npy"):
        if p.stem in stems:
            try:
                entries.append(f"{p.name}\t{p.stat().st_size}")
            except FileNotFoundError:
                continue
    entries.sort()
    lh = hashlib.sha256("\n".join(entries).encode("utf-8"))
    h.update(f"depth {_rel(depth_dir, root)} {len(entries)} {lh.hexdigest()}\n".encode())


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def data_fingerprint(
    root: str | os.PathLike[str], data_cfg: DataConfig, parts: tuple[str, ...] = PARTS, generated: bool = False
) -> str:
    """A cheap content digest (sha256 hex) of the data ``data_cfg`` names under ``root`` in
    ``parts`` (module docstring says what goes in): a benchmark edit leaves the training part's
    digest as it is. Raises what :func:`resolve_paths` raises for missing sources. With
    ``generated`` the root's own path and everything under it are left out (the caller keys the
    generated world), so only datasets named by absolute paths outside it are read."""
    paths = resolve_paths(root, data_cfg, parts, generated)
    r = paths.root

    def keep(p: Path) -> bool:
        return not generated or not _under(p, r)

    h = hashlib.sha256()
    if not generated:
        h.update(f"root {r}\n".encode())
    fields = {"root": data_cfg.root, **{f: getattr(data_cfg, f) for part in PARTS if part in parts
                                         for f in FIELDS[part]}}
    h.update(f"config {canonical_json(fields)}\n".encode())
    stems: set[str] = set()
    for ds, (folder, split_by) in sorted(paths.refer.items()):
        if keep(folder):
            _hash_file(h, folder / "instances.json", r)
            _hash_file(h, refs_path(folder, split_by), r)
    if (paths.refer or paths.captions is not None) and keep(paths.coco_images):
        stems |= _hash_listing(h, paths.coco_images, r)
    if paths.captions is not None and keep(paths.captions):
        _hash_file(h, paths.captions, r)
    if paths.ade20k is not None and keep(paths.ade20k):
        for name in ("objectInfo150.csv", "objectInfo150.txt"):
            if (paths.ade20k / name).is_file():
                _hash_file(h, paths.ade20k / name, r)
        stems |= _hash_listing(h, paths.ade20k / "images", r)
        if (paths.ade20k / "annotations").is_dir():
            _hash_listing(h, paths.ade20k / "annotations", r)
    for conv in (paths.llava_json, paths.glamm_json):  # their images are named in the JSON
        if conv is not None and keep(conv):
            _hash_file(h, conv, r)
    if paths.hardblink is not None and keep(paths.hardblink):
        for f in hardblink_files(paths.hardblink):  # questions, answers and (the world's) points JSONL
            _hash_file(h, f, r)
        stems |= _hash_listing(h, paths.hardblink, r)
    for tsv in paths.mcq.values():
        if keep(tsv):
            _hash_file(h, tsv, r)
    if paths.mme is not None and keep(paths.mme):
        for f in mme_files(paths.mme):
            _hash_file(h, f, r)
        _hash_listing(h, paths.mme, r)
    if paths.depth is not None and keep(paths.depth):
        _hash_depth(h, paths.depth, stems, r)
    return h.hexdigest()
