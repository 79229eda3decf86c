"""The depth teacher (SPEC §2): Depth Anything V2 through transformers, released or fitted offline.

* :func:`build_teacher_config` / :func:`build_teacher_processor`: a small Depth Anything V2 (DINOv2
  backbone, DPT neck and head, ``depth_estimation_type="relative"``) and the ``DPTImageProcessor``
  settings the released checkpoints use (ImageNet mean/std, bicubic, multiple of 14; square resize).
  :mod:`perceptio_core.training.teacher_fit` fits that model on the world's true depth.
* :func:`load_teacher` and :func:`predict_depth`: ``from_pretrained`` from a local directory or a hub
  id, the same code path for our fitted directory and ``depth-anything/Depth-Anything-V2-Small-hf``;
  batched inference through a ``DataLoader`` giving one :class:`DepthResult` per image: the relative
  output (inverse depth, larger = nearer), resized to ``map_size`` x ``map_size`` and min-max
  normalised per image to [0, 1], with the raw range recorded. A bad image or a non-finite map
  yields ``error`` set, never an exception.
* :func:`write_teacher_maps`: every image's map into the durable chunks of
  :mod:`perceptio_core.depth.maps`, resuming at the first missing chunk;
  :func:`evaluate_teacher`: a teacher's maps scored against true depth
  (:func:`perceptio_core.depth.metrics.teacher_scores`, the one scoring of a teacher).
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import (
    AutoImageProcessor,
    AutoModelForDepthEstimation,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
)
from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

from perceptio_core.config import TeacherConfig, TeacherFitConfig
from perceptio_core.data.records import ImageRecord
from perceptio_core.depth.maps import chunk_plan, done_chunks, write_chunk
from perceptio_core.depth.metrics import teacher_scores
from perceptio_core.device import ProgressFn, autocast, quiet_worker, resolve_device, synchronize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = 3  # PIL.Image.BICUBIC, as the released Depth Anything V2 processors use


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_teacher_config(fit_cfg: TeacherFitConfig, input_size: int | None = None) -> DepthAnythingConfig:
    """A Depth Anything V2 config scaled down from ``Depth-Anything-V2-Small-hf``.

    Backbone: ``Dinov2Config`` with ``fit_cfg.hidden_size`` / ``num_hidden_layers`` /
    ``num_attention_heads`` / ``patch_size``, MLP ratio 4, the neck reading evenly spaced layers
    (``out_indices`` = the last layer of each quarter, as V2 reads layers 3, 6, 9, 12 of 12).
    Neck: reassemble factors (4, 2, 1, 0.5) and hidden sizes (h/8, h/4, h/2, h) for backbone width h
    (at least 8), as released (Small: 48, 96, 192, 384 for h = 384); ``fusion_hidden_size`` from
    ``fit_cfg``; head hidden = fusion / 2. With h = 384, 12 layers, 6 heads and fusion 64 this is
    exactly the Depth-Anything-V2-Small architecture. ``input_size`` (the processor's size) only
    sets the position-embedding grid; any multiple of the patch size works at inference.
    """
    h, layers = fit_cfg.hidden_size, fit_cfg.num_hidden_layers
    if layers < 4:
        raise ValueError(f"teacher.fit.num_hidden_layers must be >= 4 (the neck reads 4), got {layers}")
    if h % fit_cfg.num_attention_heads:
        raise ValueError(
            f"teacher.fit.hidden_size ({h}) must be a multiple of num_attention_heads "
            f"({fit_cfg.num_attention_heads})"
        )
    q = layers / 4
    out_indices = [round(q * (i + 1)) for i in range(4)]
    size = input_size or 518
    backbone = Dinov2Config(
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=fit_cfg.num_attention_heads,
        intermediate_size=4 * h,
        patch_size=fit_cfg.patch_size,
        image_size=size,
        out_indices=out_indices,
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=fit_cfg.patch_size,
        reassemble_hidden_size=h,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[max(h // 8, 8), max(h // 4, 8), max(h // 2, 8), h],
        fusion_hidden_size=fit_cfg.fusion_hidden_size,
        head_hidden_size=max(fit_cfg.fusion_hidden_size // 2, 8),
        depth_estimation_type="relative",
    )


def build_teacher_processor(input_size: int, patch_size: int = 14) -> DPTImageProcessorPil:
    """The image processor for a teacher at ``input_size`` (a multiple of ``patch_size``).

    The released checkpoints' settings (``DPTImageProcessor``: bicubic, rescale 1/255, ImageNet
    mean/std, ``ensure_multiple_of=14``, no padding) except ``keep_aspect_ratio=False``: every image
    becomes ``input_size`` x ``input_size``, so a batch always stacks. The PIL backend is built
    explicitly (no torchvision here); ``save_pretrained`` records ``DPTImageProcessor`` and
    ``AutoImageProcessor`` loads it back with whichever backend is installed.
    """
    if input_size <= 0 or input_size % patch_size:
        raise ValueError(
            f"teacher.input_size ({input_size}) must be a positive multiple of the patch size ({patch_size})"
        )
    return DPTImageProcessorPil(
        do_resize=True,
        size={"height": input_size, "width": input_size},
        keep_aspect_ratio=False,
        ensure_multiple_of=patch_size,
        resample=BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_pad=False,
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(checkpoint: str) -> bool:
    """True when ``checkpoint`` can only mean a filesystem path (never a hub id)."""
    if not _HUB_ID.match(checkpoint) or checkpoint.startswith((".", "~")):
        return True
    first = checkpoint.split("/", 1)[0]
    return "/" in checkpoint and Path(first).is_dir()


def resolve_checkpoint(checkpoint: str) -> tuple[str, bool]:
    """``(where, is_local)`` for a checkpoint string; raises before any hub access when it cannot load.

    A string that names an existing directory is local (it must hold ``config.json``). A string that
    can only be a path (absolute, ``./``, ``~``, more than one ``/``, or whose first component is an
    existing directory) and does not exist raises ``FileNotFoundError`` naming it: it never falls
    through to a hub download. Anything else is a hub id (``org/name``).
    """
    if not checkpoint or not str(checkpoint).strip():
        raise ValueError("teacher checkpoint is empty")
    p = Path(checkpoint).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"teacher checkpoint directory {str(p)!r} has no config.json")
        return str(p), True
    if p.exists():
        raise NotADirectoryError(f"teacher checkpoint {str(p)!r} is a file, not a saved model directory")
    if _looks_like_path(str(checkpoint)):
        raise FileNotFoundError(f"teacher checkpoint directory not found: {str(p)!r}")
    return str(checkpoint), False


def load_teacher(
    checkpoint: str, device: str | torch.device = "auto"
) -> tuple[DepthAnythingForDepthEstimation, Any]:
    """Load ``(model, processor)`` with ``from_pretrained``, in eval mode on ``device``, fp32 weights.

    ``checkpoint``: our fitted directory or a released one (local directory or hub id, e.g.
    ``depth-anything/Depth-Anything-V2-Small-hf``); both take exactly the same path
    (``AutoModelForDepthEstimation`` + ``AutoImageProcessor``). A missing local path raises
    ``FileNotFoundError`` naming it; with ``HF_HUB_OFFLINE`` set a hub id is read from the local cache
    only, and a miss raises ``FileNotFoundError`` saying so. The model must predict relative depth
    (inverse depth, larger = nearer).
    """
    where, local = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {}
    if local or _offline():
        kwargs["local_files_only"] = True
    # the PEFT adapter probe takes its own hub kwargs: without this it goes online even for a local dir
    model_kwargs = dict(kwargs, adapter_kwargs=dict(kwargs)) if kwargs else {}
    try:
        model = AutoModelForDepthEstimation.from_pretrained(where, dtype=torch.float32, **model_kwargs)
        processor = AutoImageProcessor.from_pretrained(where, **kwargs)
    except OSError as e:
        if not local and _offline():
            raise FileNotFoundError(
                f"teacher checkpoint {where!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                f"is set: download it first or point teacher.checkpoint at a local directory ({e})"
            ) from e
        raise
    kind = getattr(model.config, "depth_estimation_type", "relative")
    if kind != "relative":
        raise ValueError(
            f"teacher {where!r} predicts {kind!r} depth; the pipeline expects a relative (inverse-depth) model"
        )
    model.to(dev).eval()
    return model, processor


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


@dataclass
class DepthResult:
    """One image's teacher map.

    index: position of the image in the ``image_paths`` given to :func:`predict_depth`.
    map: [map_size, map_size] float32 in [0, 1], the teacher's relative output (inverse depth, larger =
        nearer) resized bilinearly and min-max normalised per image; ``None`` when ``error`` is set.
    raw_min, raw_max: the range of the resized raw output the normalisation removed (``nan`` on error),
        so that ``raw = raw_min + map * (raw_max - raw_min)``.
    error: why the image has no map ("unreadable image: ...", "non-finite teacher output", ...).
    """

    index: int
    map: np.ndarray | None
    raw_min: float
    raw_max: float
    error: str | None = None


class _ImageDataset(Dataset):
    """Loads and preprocesses one image: ``(index, pixel_values [3, S, S] | None, error | None)``."""

    def __init__(self, paths: Sequence[str], processor: Any):
        self.paths = list(paths)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            with Image.open(self.paths[i]) as im:
                rgb = im.convert("RGB")
            pv = self.processor(images=rgb, return_tensors="pt")["pixel_values"][0]
            return i, pv, None
        except Exception as e:  # one bad image never stops the stage
            return i, None, f"unreadable image: {type(e).__name__}: {e}"


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """Group a batch by tensor shape (a processor keeping aspect ratios gives several shapes)."""
    groups: dict[tuple[int, ...], tuple[list[int], list[torch.Tensor]]] = {}
    errors = []
    for i, pv, err in items:
        if err is not None or pv is None:
            errors.append((i, err or "unreadable image"))
            continue
        idx, tensors = groups.setdefault(tuple(pv.shape), ([], []))
        idx.append(i)
        tensors.append(pv)
    return {
        "groups": [(torch.tensor(idx), torch.stack(ts)) for idx, ts in groups.values()],
        "errors": errors,
    }


def _loader(
    paths: Sequence[str], processor: Any, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=2, persistent_workers=False, worker_init_fn=quiet_worker)
    return DataLoader(
        _ImageDataset(paths, processor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        **kwargs,
    )


class _ThreadPrefetcher:
    """Iterate ``source`` in a background thread, ``depth`` items ahead (PIL decoding and resizing and
    numpy normalisation release the GIL, so loading overlaps the forward). Exceptions of the source
    are raised in the consumer; closing the consumer stops the thread."""

    _END = object()

    def __init__(self, source: Any, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Any) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # handed to the consumer
            self._put((None, e))
            return
        self._put((self._END, None))

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item, err = self._queue.get()
                if err is not None:
                    raise err
                if item is self._END:
                    return
                yield item
        finally:
            self._stop.set()
            self._thread.join(timeout=5)


def _forward_depth(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's ``predicted_depth`` for a batch [B, 3, S, S] -> [B, H, W] float32 (any H, W)."""
    out = model(pixel_values=pixel_values).predicted_depth
    if out.ndim == 4 and out.shape[1] == 1:
        out = out[:, 0]
    return out.float()


def predict_depth(
    model: torch.nn.Module,
    processor: Any,
    image_paths: Sequence[str],
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    map_size: int = 80,
    progress: ProgressFn | None = None,
) -> Iterator[DepthResult]:
    """Run the teacher on ``image_paths``; yield one :class:`DepthResult` per path, in input order.

    A ``DataLoader`` reads and preprocesses the images with ``processor`` (``num_workers`` processes,
    prefetching, pinned memory on CUDA; with ``num_workers=0`` one background thread of this process
    prepares the next batches while the current one runs). The forward runs under
    ``torch.inference_mode`` and the autocast of ``precision`` (bf16 on CUDA by default);
    ``predicted_depth`` [B, h, w] is resized bilinearly to [map_size, map_size] and min-max
    normalised per image. An unreadable image, a non-finite output, a constant output or an output
    of the wrong shape yields ``error`` set (and ``map=None``): nothing raises for one bad image,
    while a failing forward (out of memory, a broken checkpoint) raises. Stateless: the caller
    passes the images still to do.
    """
    dev = resolve_device(device)
    model.eval()
    total, done = len(image_paths), 0
    batches: Any = _loader(image_paths, processor, batch_size, num_workers, dev)
    if num_workers == 0:
        batches = _ThreadPrefetcher(batches)
    for batch in batches:
        results: dict[int, DepthResult] = {
            i: DepthResult(i, None, math.nan, math.nan, err) for i, err in batch["errors"]
        }
        for idx, pv in batch["groups"]:
            for r in _maps_for_group(model, idx.tolist(), pv, dev, precision, map_size):
                results[r.index] = r
        for i in sorted(results):
            yield results[i]
        done += len(results)
        if progress is not None:
            progress(done, total, {"errors": float(sum(r.error is not None for r in results.values()))})


def _maps_for_group(
    model: torch.nn.Module,
    indices: list[int],
    pixel_values: torch.Tensor,
    device: torch.device,
    precision: str,
    map_size: int,
) -> list[DepthResult]:
    """Forward one same-shape group [b, 3, S, S] and turn each output into a checked [0, 1] map."""
    # a forward that raises (out of memory, a broken checkpoint) is the stage's failure, not an image's
    with torch.inference_mode(), autocast(device, precision):
        raw = _forward_depth(model, pixel_values.to(device, non_blocking=True))
    if raw.ndim != 3 or raw.shape[0] != len(indices):
        msg = f"teacher output of wrong shape {tuple(raw.shape)} for a batch of {len(indices)}"
        return [DepthResult(i, None, math.nan, math.nan, msg) for i in indices]
    finite = torch.isfinite(raw).flatten(1).all(dim=1)  # [b]
    raw = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    resized = F.interpolate(raw[:, None], size=(map_size, map_size), mode="bilinear", align_corners=False)
    resized = resized[:, 0]  # [b, map_size, map_size]
    lo = resized.amin(dim=(1, 2))
    hi = resized.amax(dim=(1, 2))
    norm = ((resized - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]).clamp_(0.0, 1.0)
    norm_np = norm.cpu().numpy().astype(np.float32)
    lo_np, hi_np, finite_np = lo.cpu().numpy(), hi.cpu().numpy(), finite.cpu().numpy()
    out = []
    for j, i in enumerate(indices):
        m = norm_np[j]
        if not finite_np[j]:
            out.append(DepthResult(i, None, math.nan, math.nan, "non-finite teacher output (NaN/inf)"))
        elif m.shape != (map_size, map_size):
            out.append(DepthResult(i, None, math.nan, math.nan, f"map of wrong shape {m.shape}"))
        elif not hi_np[j] > lo_np[j]:
            out.append(DepthResult(i, None, math.nan, math.nan, "constant teacher output (no depth range)"))
        else:
            out.append(DepthResult(i, m, float(lo_np[j]), float(hi_np[j]), None))
    return out


def bare_forward_throughput(
    model: torch.nn.Module,
    processor: Any,
    image_paths: Sequence[str],
    *,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    precision: str = "auto",
    warmup_batches: int = 1,
) -> float:
    """Images/s of the bare ``model(pixel_values)`` forward over the batches :func:`predict_depth` would
    build from ``image_paths`` (preprocessed and moved to the device beforehand, not timed).

    The teacher stage's overhead ratio is this number over :func:`predict_depth`'s images/s.
    """
    dev = resolve_device(device)
    model.eval()
    batches = []
    for batch in _loader(image_paths, processor, batch_size, 0, dev):
        batches.extend(pv.to(dev) for _, pv in batch["groups"])
    if not batches:
        raise ValueError("bare_forward_throughput: no readable image")
    with torch.inference_mode(), autocast(dev, precision):
        for pv in batches[:warmup_batches]:
            _forward_depth(model, pv)
        synchronize(dev)
        t0 = time.perf_counter()
        for pv in batches:
            _forward_depth(model, pv)
        synchronize(dev)
    return sum(pv.shape[0] for pv in batches) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Over a corpus
# --------------------------------------------------------------------------------------------


def write_teacher_maps(
    checkpoint: str,
    image_paths: Mapping[str, str],
    folder: str | os.PathLike[str],
    atomic_writer: Callable[[str, str], Any],
    cfg: TeacherConfig,
    *,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
) -> dict[str, int]:
    """The teacher's map of every image, into the chunks of ``folder`` (:mod:`perceptio_core.depth.maps`).

    image_paths: image digest -> image file. The digests are split by
        :func:`~perceptio_core.depth.maps.chunk_plan` into chunks of ``cfg.chunk_size``; a chunk whose
        sidecar is already in ``folder`` is kept (a killed run resumes at the first missing one).
    The teacher is loaded (:func:`load_teacher` of ``checkpoint``) only when a chunk is missing; each
    missing chunk is predicted by :func:`predict_depth` (``cfg.batch_size``, ``num_workers``,
    ``precision``, ``map_size``) and written by :func:`~perceptio_core.depth.maps.write_chunk` through
    ``atomic_writer(name, mode)``: maps [n, map_size, map_size] of the images that succeeded, and
    the failed ones with their reason. ``progress(images done, images to do)`` after each chunk.
    Returns ``{"chunks": chunks in the plan, "resumed_chunks": chunks found already written}``.
    """
    plan = chunk_plan(list(image_paths), cfg.chunk_size)
    done = done_chunks(folder)
    todo = [i for i in range(len(plan)) if i not in done]
    if todo:
        model, processor = load_teacher(checkpoint, device=device)
        total = sum(len(plan[i]) for i in todo)
        finished = 0
        for ci in todo:
            digests = plan[ci]
            ok: list[str] = []
            maps: list[np.ndarray] = []
            ranges: list[tuple[float, float]] = []
            errors: dict[str, str] = {}
            for r in predict_depth(
                model, processor, [image_paths[d] for d in digests], batch_size=cfg.batch_size,
                num_workers=cfg.num_workers, device=device, precision=cfg.precision, map_size=cfg.map_size,
            ):  # fmt: skip
                d = digests[r.index]
                if r.error is not None or r.map is None:
                    errors[d] = r.error or "no map"
                else:
                    ok.append(d)
                    maps.append(r.map)
                    ranges.append((r.raw_min, r.raw_max))
            arr = np.stack(maps) if maps else np.zeros((0, cfg.map_size, cfg.map_size), np.float32)
            write_chunk(folder, ci, ok, arr, ranges, errors, atomic_writer)
            finished += len(digests)
            if progress is not None:
                progress(finished, total, {"chunk": float(ci)})
    return {"chunks": len(plan), "resumed_chunks": len(plan) - len(todo)}


def evaluate_teacher(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[ImageRecord],
    *,
    map_size: int,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> dict[str, float]:
    """A teacher scored against true depth: its maps of ``images`` (records with ``depth_path`` and
    ``digest``) through :func:`predict_depth` in fp32 at ``map_size``, scored by
    :func:`~perceptio_core.depth.metrics.teacher_scores`. Returns ``{"absrel", "delta1",
    "pair_order", "images", "errors"}`` (``errors``: images without a map)."""
    for rec in images:
        if not rec.depth_path or not rec.digest:
            raise ValueError(f"evaluate_teacher: image {rec.file_name!r} needs a true depth and a digest")
    results = predict_depth(
        model, processor, [r.path for r in images], batch_size=batch_size, device=device, precision="fp32",
        map_size=map_size,
    )  # fmt: skip
    errors = 0
    scored: list[tuple[str, np.ndarray, np.ndarray]] = []
    for res in results:
        if res.error is not None or res.map is None:
            errors += 1
            continue
        rec = images[res.index]
        scored.append((rec.digest, res.map, np.load(rec.depth_path)))
    return {**teacher_scores(scored), "errors": float(errors)}
