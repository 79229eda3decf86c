"""Plain records the readers return and the later stages consume (SPEC §5).

Every reader in ``perceptio_core`` (``refer.py``, ``ade20k.py``, ``hardblink.py``, ``mcq.py``, ``mme.py``) turns
a dataset tree in its real on-disk format into these records; nothing here knows about Prefect or
the artifact store, and the only file it reads is an annotation JSON (:func:`read_annotation_json`,
the one way every reader turns a missing or broken annotation file into a clear error). A record that cannot be used becomes a :class:`QuarantineEntry`
naming the record and the reason, and the rest goes on. The reasons are the ``REASON_*`` constants
below, alone or followed by ``": <detail>"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Quarantine reasons (a reason is one of these, alone or as "<reason>: <detail>").
REASON_MISSING_IMAGE = "missing image"
REASON_CORRUPT_IMAGE = "corrupt image"
REASON_IMAGE_SIZE = "image size mismatch"
REASON_MISSING_ANNOTATION = "missing annotation"
REASON_CROWD = "crowd annotation"
REASON_ZERO_AREA = "zero-area mask"
REASON_MALFORMED_MASK = "malformed mask"
REASON_EMPTY_SENTENCE = "empty sentence"
REASON_EMPTY_CAPTION = "empty caption"
REASON_CORRUPT_ANNOTATION = "corrupt annotation"
REASON_MALFORMED = "malformed record"
REASON_TOO_LONG = "text too long"  # over a limit of perceptio_core.data.limits, named in the detail
REASON_BAD_TEXT = "invalid text"  # a lone surrogate, or bytes that are not UTF-8
REASON_DUPLICATE = "duplicate record"  # the same id as an earlier record (the first is kept)
REASON_TOO_LARGE = "too large"  # a file or image over a limit of perceptio_core.data.limits
REASON_OUTSIDE_ROOT = "path outside the data root"  # an absolute name or one whose ../ climbs out
REASON_UNREADABLE_FILE = "unreadable dataset file"  # a whole file set aside (a refused pickle, bad JSON)


def read_annotation_json(path: str | os.PathLike[str], what: str) -> Any:
    """The parsed JSON of an annotation file. A missing file raises :class:`DatasetNotFoundError`
    ("<what> not found: <path>"), one that is not JSON a ``ValueError`` naming the path."""
    p = Path(path)
    if not p.is_file():
        raise DatasetNotFoundError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e


class DatasetNotFoundError(FileNotFoundError):
    """A dataset-level input (a root, a dataset folder, a refs pickle, an annotation file) is missing.

    Not a per-record problem: the read stops. The message names the path that was expected.
    """


@dataclass(frozen=True)
class MissingDataset:
    """One dataset the config names that the disk lacks: what it is (with its config key), where it
    was looked for, and the ``--set`` that skips it (or points it elsewhere)."""

    what: str  # "ADE20k folder (data.ade20k)"
    path: str
    skip: str  # "--set data.ade20k="

    def line(self) -> str:
        return f"{self.what} not found: {self.path} (skip it: {self.skip})"


class MissingDataError(DatasetNotFoundError):
    """Every dataset the config names that the disk lacks, in one error (``missing``), each line
    with its path and the ``--set`` that skips it. :meth:`merge` joins the errors of several
    readers (the training sources and the benchmarks) into one."""

    def __init__(self, missing: list[MissingDataset]):
        self.missing = list(dict.fromkeys(missing))
        lines = [m.line() for m in self.missing]
        if len(lines) == 1:
            msg = lines[0]
        else:
            msg = f"{len(lines)} datasets named by the config are missing:\n  " + "\n  ".join(lines)
        super().__init__(msg)

    @classmethod
    def merge(cls, errors: list[MissingDataError]) -> MissingDataError:
        return cls([m for e in errors for m in e.missing])


@dataclass(frozen=True)
class QuarantineEntry:
    """One bad input record: where it came from, which record, and why it was set aside."""

    source: str  # "refcoco", "refcoco+", "refcocog", "captions", "ade20k", "hardblink", "mcq", "mme", ...
    record: str  # a human-readable id: "ref_id=12", "image_id=3 (COCO_train2014_000000000003.jpg)"
    reason: str  # "missing image", "corrupt image: ...", "zero-area mask", "empty sentence", ...

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class ImageRecord:
    """An image on disk. ``path`` is absolute; ``depth_path`` is the true depth (.npy, metres, H x W)
    when the dataset has one (the synthetic world does; real COCO does not)."""

    image_id: int
    file_name: str
    path: str
    width: int
    height: int
    source: str  # "coco", "ade20k", "hardblink"
    depth_path: str | None = None
    digest: str = ""  # sha256 of the image file's bytes: the key of its depth map and tokens


@dataclass(frozen=True)
class RefRecord:
    """One referring expression of RefCOCO / RefCOCO+ / RefCOCOg with its COCO annotation.

    ``segmentation`` is the COCO annotation's segmentation as stored (polygon list, RLE dict with
    list counts for crowd, or compressed RLE); decode it with ``refer.ann_to_mask``.
    """

    dataset: str  # "refcoco", "refcoco+", "refcocog"
    split_by: str  # "unc", "umd", "google"
    ref_id: int
    sent_id: int
    ann_id: int
    image_id: int
    split: str  # "train", "val", "testA", "testB", "test"
    sentence: str
    category_id: int
    category: str
    bbox: tuple[float, float, float, float]  # x, y, w, h (COCO convention)
    segmentation: Any
    iscrowd: int
    area: float
    attributes: dict[str, Any] = field(default_factory=dict)  # colour, shape, ... where known


@dataclass(frozen=True)
class AdeRecord:
    """One ADE20k (SceneParsing layout) image with its class-index annotation PNG (0 = other)."""

    image_id: int
    image_path: str
    annotation_path: str
    split: str  # "training" or "validation"
    present_classes: tuple[int, ...]  # class indices present in the annotation, 0 excluded
    width: int
    height: int
    depth_path: str | None = None
    digest: str = ""  # sha256 of the image file's bytes

    def image_record(self) -> ImageRecord:
        """This image as an :class:`ImageRecord` (source "ade20k")."""
        return ImageRecord(self.image_id, self.image_path.rsplit("/", 1)[-1], self.image_path,
                           self.width, self.height, "ade20k", self.depth_path, self.digest)


@dataclass(frozen=True)
class HardBlinkRecord:
    """A HardBLINK-style relative-depth question (SPEC §6): n marked points, one closest to camera."""

    qid: str
    image_path: str
    n_points: int
    points: tuple[tuple[float, float], ...]  # (x, y) pixel centres, in label order
    labels: tuple[str, ...]  # "A", "B", ...
    question: str
    answer: str  # "(A)"
    split: str = "test"
    source_image_id: int | None = None  # the world image it was drawn on, when known
    depth_path: str | None = None  # true depth of the unmarked scene (.npy, metres), when known


@dataclass(frozen=True)
class McqRecord:
    """A multiple-choice question of a benchmark in VLMEvalKit's TSV layout (MMBench, SEED-Bench,
    AI2D, MMStar, ScienceQA ...); ``benchmark`` is its name in ``data.mcq``."""

    qid: str
    image_path: str
    question: str
    options: dict[str, str]  # {"A": "...", "B": "...", ...}
    answer: str  # the option letter
    hint: str = ""
    category: str = ""
    split: str = "test"
    benchmark: str = "mmbench"


@dataclass(frozen=True)
class MmeRecord:
    """One yes/no question of MME; the two questions of an image share ``image_key`` (acc+)."""

    qid: str  # "<subtask>/<stem>/<line>"
    subtask: str  # "existence", "count", ..., "code_reasoning"
    image_key: str  # "<subtask>/<stem>"
    image_path: str
    question: str
    answer: str  # "Yes" or "No"


SPLIT_NAMES = {"training": "train", "validation": "val"}


def normalise_split(split: str) -> str:
    """Dataset split names to ours: ADE20k's "training"/"validation" -> "train"/"val"."""
    return SPLIT_NAMES.get(split, split)


# ---- paths in the JSON of Sources / Benchmarks ------------------------------------------------
# A record's file paths (these fields) are written relative to where they live, never absolute, so
# that a copied or moved workdir (or data root) reads its own files: under the data root as a
# relative POSIX path, inside the artifact that holds the JSON as "artifact:<relative path>"
# (the decoded multiple-choice images); only a path outside both stays absolute (a dataset named by
# an absolute path elsewhere). :func:`_locate` turns them back into paths under the root and the
# artifact folder the JSON is read from.
PATH_FIELDS = ("path", "depth_path", "image_path", "annotation_path")
JSON_FORMAT = 3  # 3: relative paths (above); 2: absolute paths, still read
ARTIFACT_PREFIX = "artifact:"


def _relative(value: str | None, root: Path, artifact: Path | None) -> str | None:
    if not value:
        return value
    p = Path(value)
    for base, prefix in ((artifact, ARTIFACT_PREFIX), (root, "")):
        if base is not None:
            try:
                return prefix + p.relative_to(base).as_posix()
            except ValueError:
                pass
    return value


def _locate(value: str | None, root: Path, artifact: Path | None) -> str | None:
    if not value or os.path.isabs(value):
        return value
    if value.startswith(ARTIFACT_PREFIX):
        if artifact is None:
            raise ValueError(f"path {value!r} is inside an artifact, and no artifact folder was given to read it from")
        return str(artifact / value[len(ARTIFACT_PREFIX):])
    return str(root / value)


def _paths_out(items: list[Any], root: Path, artifact: Path | None) -> list[dict[str, Any]]:
    out = []
    for r in items:
        d = asdict(r)
        for f in PATH_FIELDS:
            if f in d:
                d[f] = _relative(d[f], root, artifact)
        out.append(d)
    return out


def _paths_in(items: list[dict[str, Any]], root: Path, artifact: Path | None) -> list[dict[str, Any]]:
    return [{k: (_locate(v, root, artifact) if k in PATH_FIELDS else v) for k, v in d.items()} for d in items]


def _check_format(data: Any, what: str) -> None:
    if not isinstance(data, dict) or data.get("format") not in (2, JSON_FORMAT):
        raise ValueError(f"unsupported {what} JSON format {data.get('format') if isinstance(data, dict) else None!r}")


def _hardblink_from_dict(h: dict[str, Any]) -> HardBlinkRecord:
    return HardBlinkRecord(**{**h, "points": tuple(tuple(p) for p in h["points"]), "labels": tuple(h["labels"])})


@dataclass
class Sources:
    """Resolved records per dataset plus the quarantine.

    The ``sources`` stage fills the training part (REFER refs with their COCO images, captions,
    ADE20k); ``hardblink``, ``mcq`` and ``mme`` are the evaluation benchmarks, which the ``benchmarks``
    stage resolves apart (:class:`Benchmarks`) and evaluation joins in (:meth:`with_benchmarks`);
    :func:`perceptio_core.data.sources.read_sources` reads both at once.
    ``coco_images`` holds every COCO image a ref or a caption uses (validated, with its digest);
    ``ade_classes`` maps ADE20k class indices to names (``objectInfo150``).
    """

    root: str
    coco_images: dict[int, ImageRecord] = field(default_factory=dict)
    refs: list[RefRecord] = field(default_factory=list)
    ade: list[AdeRecord] = field(default_factory=list)
    hardblink: list[HardBlinkRecord] = field(default_factory=list)
    mcq: list[McqRecord] = field(default_factory=list)
    mme: list[MmeRecord] = field(default_factory=list)
    captions: list[tuple[int, str]] = field(default_factory=list)  # (image_id, caption)
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    ade_classes: dict[int, str] = field(default_factory=dict)

    def with_benchmarks(self, benchmarks: Benchmarks) -> Sources:
        """A copy of these sources with the benchmarks' records (and quarantine) joined in: what
        evaluation reads."""
        return dataclasses.replace(self, hardblink=list(benchmarks.hardblink), mcq=list(benchmarks.mcq),
                                   mme=list(benchmarks.mme), quarantine=self.quarantine + benchmarks.quarantine)

    def eval_image_ids(self) -> set[int]:
        """COCO image ids used by any refer split other than train (val, testA, testB, test): what
        no training step may see."""
        return {r.image_id for r in self.refs if normalise_split(r.split) != "train"}

    def counts(self) -> dict[str, int]:
        by_dataset: dict[str, int] = {}
        for r in self.refs:
            by_dataset[r.dataset] = by_dataset.get(r.dataset, 0) + 1
        return {
            "coco_images": len(self.coco_images),
            **{f"refs.{k}": v for k, v in sorted(by_dataset.items())},
            "ade20k": len(self.ade),
            "hardblink": len(self.hardblink),
            "mcq": len(self.mcq),
            "mme": len(self.mme),
            "captions": len(self.captions),
            "quarantined": len(self.quarantine),
        }

    def quarantine_counts(self) -> dict[str, int]:
        """Quarantined records per source."""
        out: dict[str, int] = {}
        for q in self.quarantine:
            out[q.source] = out.get(q.source, 0) + 1
        return dict(sorted(out.items()))

    def depth_images(self, ade_splits: tuple[str, ...] | None = None) -> list[ImageRecord]:
        """Every distinct image that needs a teacher depth map (SPEC §2: the fine-tuning corpora):
        the COCO images that at least one referring expression uses, then the ADE20k images
        (all splits, or only ``ade_splits``), deduplicated by digest (first occurrence wins;
        records without a digest are deduplicated by path)."""
        used = sorted({r.image_id for r in self.refs})
        out: list[ImageRecord] = []
        seen: set[str] = set()
        cands = [self.coco_images[i] for i in used if i in self.coco_images]
        cands += [a.image_record() for a in self.ade if ade_splits is None or a.split in ade_splits]
        for rec in cands:
            key = rec.digest or f"path:{rec.path}"
            if key not in seen:
                seen.add(key)
                out.append(rec)
        return out

    def to_json(self, artifact: str | os.PathLike[str] | None = None) -> str:
        """The whole resolved source set as JSON text (see :meth:`from_json`); file paths relative
        to :attr:`root`, or to ``artifact`` (the folder the JSON is written into) for files in it."""
        root, art = Path(self.root), Path(artifact) if artifact is not None else None
        data = {
            "format": JSON_FORMAT,
            "root": self.root,
            "coco_images": _paths_out([r for _, r in sorted(self.coco_images.items())], root, art),
            "refs": [asdict(r) for r in self.refs],
            "ade": _paths_out(self.ade, root, art),
            "ade_classes": {str(k): v for k, v in sorted(self.ade_classes.items())},
            "hardblink": _paths_out(self.hardblink, root, art),
            "mcq": _paths_out(self.mcq, root, art),
            "mme": _paths_out(self.mme, root, art),
            "captions": [[i, c] for i, c in self.captions],
            "quarantine": [q.to_dict() for q in self.quarantine],
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, root: str | os.PathLike[str] | None = None,
                  artifact: str | os.PathLike[str] | None = None) -> Sources:
        """Rebuild a :class:`Sources` from :meth:`to_json`'s text (the result compares equal), its
        relative paths under ``root`` (default: the root it was written with; give the data root
        of this run, so that a moved data root or workdir reads its own files) and ``artifact``
        (the folder the JSON was read from)."""
        data = json.loads(text)
        _check_format(data, "Sources")
        r, art = Path(root if root is not None else data["root"]), Path(artifact) if artifact is not None else None
        refs = [RefRecord(**{**x, "bbox": tuple(x["bbox"])}) for x in data["refs"]]
        ade = [AdeRecord(**{**a, "present_classes": tuple(a["present_classes"])}) for a in _paths_in(data["ade"], r, art)]
        hb = [_hardblink_from_dict(h) for h in _paths_in(data["hardblink"], r, art)]
        images = [ImageRecord(**x) for x in _paths_in(data["coco_images"], r, art)]
        return cls(
            root=str(r),
            coco_images={x.image_id: x for x in images},
            refs=refs,
            ade=ade,
            hardblink=hb,
            mcq=[McqRecord(**v) for v in _paths_in(data["mcq"], r, art)],
            mme=[MmeRecord(**v) for v in _paths_in(data["mme"], r, art)],
            captions=[(int(i), str(c)) for i, c in data["captions"]],
            quarantine=[QuarantineEntry(**q) for q in data["quarantine"]],
            ade_classes={int(k): v for k, v in data["ade_classes"].items()},
        )


@dataclass
class Benchmarks:
    """Everything the ``benchmarks`` stage resolved (SPEC §6): the evaluation-only datasets, kept
    apart from the training :class:`Sources` so that a change to a benchmark re-runs evaluation
    only. REFER's val/test splits are not here: they come from the same REFER files as training
    and evaluation reads them from :class:`Sources`."""

    root: str
    hardblink: list[HardBlinkRecord] = field(default_factory=list)
    mcq: list[McqRecord] = field(default_factory=list)
    mme: list[MmeRecord] = field(default_factory=list)
    quarantine: list[QuarantineEntry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        by_n: dict[int, int] = {}
        for h in self.hardblink:
            by_n[h.n_points] = by_n.get(h.n_points, 0) + 1
        by_mcq: dict[str, int] = {}
        for m in self.mcq:
            by_mcq[m.benchmark] = by_mcq.get(m.benchmark, 0) + 1
        return {
            "hardblink": len(self.hardblink),
            **{f"hardblink_{n}": v for n, v in sorted(by_n.items())},
            "mcq": len(self.mcq),
            **{f"mcq.{k}": v for k, v in sorted(by_mcq.items())},
            "mme": len(self.mme),
            "quarantined": len(self.quarantine),
        }

    def to_json(self, artifact: str | os.PathLike[str] | None = None) -> str:
        """The benchmark records as JSON text (see :meth:`from_json`); paths as :meth:`Sources.to_json`."""
        root, art = Path(self.root), Path(artifact) if artifact is not None else None
        data = {
            "format": JSON_FORMAT,
            "root": self.root,
            "hardblink": _paths_out(self.hardblink, root, art),
            "mcq": _paths_out(self.mcq, root, art),
            "mme": _paths_out(self.mme, root, art),
            "quarantine": [q.to_dict() for q in self.quarantine],
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, root: str | os.PathLike[str] | None = None,
                  artifact: str | os.PathLike[str] | None = None) -> Benchmarks:
        """Rebuild :class:`Benchmarks` from :meth:`to_json`'s text (the result compares equal);
        ``root`` and ``artifact`` as :meth:`Sources.from_json`."""
        data = json.loads(text)
        _check_format(data, "Benchmarks")
        r, art = Path(root if root is not None else data["root"]), Path(artifact) if artifact is not None else None
        return cls(
            root=str(r),
            hardblink=[_hardblink_from_dict(h) for h in _paths_in(data["hardblink"], r, art)],
            mcq=[McqRecord(**v) for v in _paths_in(data["mcq"], r, art)],
            mme=[MmeRecord(**v) for v in _paths_in(data["mme"], r, art)],
            quarantine=[QuarantineEntry(**q) for q in data["quarantine"]],
        )
