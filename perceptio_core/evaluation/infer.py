"""One image, one query: the answer, the mask and the depth map as files (``perceptio infer``).

:func:`infer` takes a loaded :class:`~perceptio_core.model.perceptio_model.PerceptioModel` or a directory
and runs :func:`perceptio_core.model.generation.generate` (constrained perception decoding by default,
SPEC §1), then writes into ``out_dir``:

- ``mask.png``: the predicted mask of the first ``[SEG]`` at the image's size, 8-bit grey (255 =
  object), when a ``[SEG]`` was generated; ``mask_0.png``, ``mask_1.png``, ...: one per ``[SEG]``
  of the answer, in order (a grounded caption or an answer about several objects has several;
  ``mask_0.png`` equals ``mask.png``); ``overlay.png``: the image with every mask over it in green;
- ``depth.png``: the depth map decoded from a well-formed block, colormapped (``magma``: bright =
  near, since the maps are the teacher's normalised disparity) and resized to the image's size;
  ``depth.npy``: the decoded map itself ([h, w] float32, as the VQ-VAE gives it back);
- ``result.json``: the answer, the raw text (perception tokens included), the block status and the
  files written.

A file that the generation gives nothing for is not written (its path is None in the result and in
``result.json``), so an empty mask is never confused with no ``[SEG]``.

Directories :func:`load_model` accepts: a model saved by ``PerceptioModel.save_pretrained`` (its
``config.json`` has ``"format": "perceptio-model"``), an export of ``perceptio export``
(:mod:`perceptio_core.model.export`: merged or not, checked against its manifest before loading),
or a folder holding one as ``model/`` (the ``finetune`` stage's artifact: ``<artifact>/model``).
``result.json`` names the model folder the answer came from (``model``; None for a model passed
loaded).

Many queries with one model (``perceptio infer`` on a folder or a JSONL file): :func:`folder_queries`
and :func:`read_queries` make the list, :func:`infer_batch` answers it into ``<out>/<line>/`` and
``<out>/results.jsonl``, a bad line giving an error entry and the others answered.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio_core.data.image_io import load_image
from perceptio_core.format.prompts import render_prompt
from perceptio_core.evaluation.viz import mask_overlay

MODEL_FORMAT = "perceptio-model"


class ModelNotFoundError(FileNotFoundError):
    """No saved Perceptio model where one was expected; the message names the paths tried."""


@dataclass
class InferResult:
    """What :func:`infer` returns: the answer text, the files written (None: nothing to write),
    the raw generated text (perception tokens included) and the block status."""

    answer: str
    mask_png: Path | None
    depth_png: Path | None
    text: str
    status: str = ""
    overlay_png: Path | None = None
    depth_npy: Path | None = None
    result_json: Path | None = None
    masks_png: list[Path] = field(default_factory=list)


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """The saved-model directory at ``path`` or at ``path/model`` (module docstring); raises
    :class:`ModelNotFoundError` naming both when neither holds a Perceptio model."""
    root = Path(path)
    tried = []
    for cand in (root, root / "model"):
        cfg = cand / "config.json"
        tried.append(str(cfg))
        if cfg.is_file():
            try:
                fmt = json.loads(cfg.read_text()).get("format")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                fmt = None
            if fmt == MODEL_FORMAT:
                return cand
    raise ModelNotFoundError(f"no saved Perceptio model at {root} (looked for a config.json with "
                             f"format {MODEL_FORMAT!r}: {', '.join(tried)})")


def load_model(path: str | os.PathLike[str], device: str = "cpu", **kwargs: Any) -> Any:
    """``PerceptioModel.from_pretrained`` of :func:`resolve_model_dir` (``path``), in eval mode
    on ``device``; ``kwargs`` go to ``from_pretrained`` (``depth_tokenizer``, ``base``, ...)."""
    from perceptio_core.model.perceptio_model import PerceptioModel

    model = PerceptioModel.from_pretrained(resolve_model_dir(path), **kwargs)
    return model.to(device).eval()


def _write_png(array: np.ndarray, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def colorize_depth(depth_map: np.ndarray, size: tuple[int, int] | None = None, cmap: str = "magma") -> np.ndarray:
    """[h, w] map -> [H, W, 3] uint8 through a matplotlib colormap, min-max scaled (a constant map
    is mid-grey in the colormap), bilinearly resized to ``size = (H, W)`` when given."""
    from matplotlib import colormaps

    from perceptio_core.depth.metrics import resize_map

    m = np.asarray(depth_map, dtype=np.float32)
    if size is not None:
        m = resize_map(m, tuple(size))
    finite = np.isfinite(m)
    lo, hi = (float(m[finite].min()), float(m[finite].max())) if finite.any() else (0.0, 1.0)
    norm = (m - lo) / (hi - lo) if hi > lo else np.full_like(m, 0.5)
    norm = np.where(finite, np.clip(norm, 0.0, 1.0), 0.0)
    rgba = colormaps[cmap](norm)  # [H, W, 4] float
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def infer(
    model_or_dir: Any,
    image_path: str | os.PathLike[str],
    query: str,
    out_dir: str | os.PathLike[str],
    *,
    template: str | None = None,
    response_prefix: str = "",
    max_new_tokens: int = 160,
    constrained: bool = True,
    num_beams: int = 1,
    device: str = "cpu",
    **load_kwargs: Any,
) -> InferResult:
    """Answer ``query`` about the image at ``image_path`` and write the files (module docstring).

    Args:
        model_or_dir: a loaded ``PerceptioModel``, or a directory for :func:`load_model` (a saved
            model, a finetune artifact or an export).
        image_path: the image file; a missing or unreadable one raises
            :class:`~perceptio_core.data.image_io.ImageError` naming the path, before any model is loaded.
        query: the user's text. Used as the prompt as is, unless ``template`` names a task of
            :mod:`perceptio_core.format.prompts`: ``"refer_seg"`` (the query is the expression),
            ``"semantic_seg"`` (a category), ``"depth_cot"`` (a question), ``"instruct"``.
        out_dir: created if needed.
        response_prefix: text forced at the start of the answer (``"[SEG]<d_start>"`` forces the
            perception block).
        max_new_tokens, constrained, num_beams: decoding (see ``generate``).
        device: where a model loaded from a directory runs.
        load_kwargs: passed to :func:`load_model` (``depth_tokenizer``, ``base``, ...).
    """
    from perceptio_core.model.generation import generate

    pil = load_image(image_path)  # ImageError naming the path, before the (slow) model load
    model_dir = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        model_dir = resolve_model_dir(model_or_dir)
        model = load_model(model_dir, device=device, **load_kwargs)
    else:
        model = model_or_dir
    if template is not None:
        field = {"refer_seg": "expr", "semantic_seg": "category", "depth_cot": "question",
                 "instruct": "question"}.get(template)  # fmt: skip
        if field is None:
            raise ValueError(f"template must be refer_seg, semantic_seg, depth_cot or instruct, got {template!r}")
        prompt = render_prompt(template, variant=0, **{field: query.strip()})
    else:
        prompt = query.strip()
    if not prompt:
        raise ValueError("empty query")

    r = generate(model, model.tokenizer, pil, prompt, max_new_tokens, constrained, num_beams,
                 response_prefix=response_prefix)  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img = np.asarray(pil)
    result = InferResult(answer=r.text, mask_png=None, depth_png=None, text=r.raw_text, status=str(r.status))
    if r.masks:
        masks = [np.asarray(m, dtype=bool) for m in r.masks]
        result.mask_png = _write_png(masks[0].astype(np.uint8) * 255, out / "mask.png")
        result.masks_png = [_write_png(m.astype(np.uint8) * 255, out / f"mask_{k}.png") for k, m in enumerate(masks)]
        union = np.logical_or.reduce(masks)
        if union.shape == img.shape[:2]:
            result.overlay_png = _write_png(mask_overlay(img, union), out / "overlay.png")
    if r.depth_map is not None:
        dmap = np.asarray(r.depth_map, dtype=np.float32)
        result.depth_png = _write_png(colorize_depth(dmap, img.shape[:2]), out / "depth.png")
        result.depth_npy = out / "depth.npy"
        np.save(result.depth_npy, dmap)
    result.result_json = out / "result.json"
    payload = {k: ([str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v)
               for k, v in asdict(result).items()}
    payload.update(image=str(image_path), prompt=prompt, depth_indices=r.depth_indices,
                   model=str(model_dir.resolve()) if model_dir is not None else None)
    result.result_json.write_text(json.dumps(payload, indent=2) + "\n")
    return result


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""What :func:`folder_queries` takes for an image (the suffix, any case); other files are left out."""

NO_TEMPLATE = "none"
"""A template name that means "the query is the prompt" (``template=None`` of :func:`infer`)."""


@dataclass
class BatchQuery:
    """One query of a batch: ``line`` (1-based line of the JSONL, or position in the folder), the
    image, the query text and the template (None: the query is the prompt). ``where`` names it in
    messages (``queries.jsonl line 3``, ``image 2 (b.png)``). ``error`` says why the line cannot be
    answered (not JSON, a missing field); then image or query may be None."""

    line: int
    image: Path | None
    query: str | None
    template: str | None = None
    error: str | None = None
    where: str = ""


def folder_queries(folder: str | os.PathLike[str], query: str, template: str | None = None) -> list[BatchQuery]:
    """Every image of ``folder`` (its files with a suffix of :data:`IMAGE_SUFFIXES`, sorted by name,
    not recursive) with the one ``query``; numbered 1, 2, ... in that order."""
    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [BatchQuery(n, p, query, template, where=f"image {n} ({p.name})") for n, p in enumerate(files, 1)]


def read_queries(path: str | os.PathLike[str], template: str | None = None) -> list[BatchQuery]:
    """The queries of a JSONL file: one JSON object a line, ``{"image": path, "query": text}`` and
    optionally ``"template"`` (a name :func:`infer` takes, ``"none"`` or null: the query is the
    prompt; absent: ``template``). A relative image path is relative to the file's folder. Blank
    lines are skipped; a line that is not a JSON object or lacks a field comes back with ``error``
    set (naming the line), so that a batch answers the others."""
    src = Path(path)
    base = src.parent
    out: list[BatchQuery] = []
    for n, raw in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{src.name} line {n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            out.append(BatchQuery(n, None, None, error=f"{where}: not JSON ({e.msg})", where=where))
            continue
        if not isinstance(obj, dict):
            out.append(BatchQuery(n, None, None, error=f"{where}: not a JSON object (got {type(obj).__name__})",
                                  where=where))
            continue
        image, query = obj.get("image"), obj.get("query")
        tmpl = obj.get("template", template)
        tmpl = None if tmpl in (None, NO_TEMPLATE) else tmpl
        bad = [f"{k!r} (a non-empty string)" for k, v in (("image", image), ("query", query))
               if not isinstance(v, str) or not v.strip()]  # fmt: skip
        if not isinstance(tmpl, (str, type(None))):
            bad.append("'template' (a string)")
        img = (base / Path(image).expanduser()) if isinstance(image, str) and image.strip() else None
        q = query if isinstance(query, str) else None
        out.append(BatchQuery(n, img, q, tmpl if isinstance(tmpl, str) else None,
                              error=f"{where}: missing or wrong {', '.join(bad)}" if bad else None, where=where))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def infer_batch(
    model_or_dir: Any,
    queries: list[BatchQuery],
    out_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    on_result: Any = None,
    **infer_kwargs: Any,
) -> list[dict[str, Any]]:
    """Answer every query of ``queries`` with one model (loaded once when ``model_or_dir`` is a
    directory) and write ``<out_dir>/results.jsonl``, one entry a query, in order.

    Query ``q`` is answered by :func:`infer` into ``<out_dir>/<q.line>/`` (its mask, overlay and
    depth PNGs and result.json). Its entry: ``line``, ``image``, ``query``, ``template``, ``out``,
    ``answer``, ``status`` (the block status), ``mask_png``, ``masks_png``, ``overlay_png``,
    ``depth_png``, ``result_json``, ``error`` (None) and ``model`` (the model folder; None for a
    model passed loaded). A query that cannot be answered (its
    ``error`` from :func:`read_queries`, an unreadable image, an empty query, an unknown template)
    gets ``status: "error"`` and ``error`` naming the line, and the batch goes on. Each entry is
    written (and flushed) as soon as it is known and passed to ``on_result`` when given.

    ``infer_kwargs`` go to :func:`infer` (``response_prefix``, ``max_new_tokens``, ...).
    """
    from perceptio_core.data.image_io import ImageError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, model_dir = model_or_dir, None
    if isinstance(model_or_dir, (str, os.PathLike)):
        model_dir = resolve_model_dir(model_or_dir).resolve()
        model = load_model(model_dir, device=device)
    entries: list[dict[str, Any]] = []
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for q in queries:
            entry: dict[str, Any] = {"line": q.line, "image": _jsonable(q.image), "query": q.query,
                                     "template": q.template, "out": None, "answer": None, "status": "error",
                                     "mask_png": None, "masks_png": [], "overlay_png": None, "depth_png": None,
                                     "result_json": None, "error": q.error,
                                     "model": str(model_dir) if model_dir is not None else None}  # fmt: skip
            if q.error is None:
                try:
                    r = infer(model, q.image, q.query or "", out / str(q.line), template=q.template, **infer_kwargs)
                except (ImageError, ValueError) as e:
                    entry["error"] = f"{q.where or f'line {q.line}'}: {e}"
                else:
                    entry.update({k: _jsonable(getattr(r, k)) for k in ("answer", "status", "mask_png", "masks_png",
                                                                        "overlay_png", "depth_png", "result_json")})
                    entry["out"] = str(out / str(q.line))
            f.write(json.dumps(entry) + "\n")
            f.flush()
            entries.append(entry)
            if on_result is not None:
                on_result(entry)
    return entries


__all__ = ["IMAGE_SUFFIXES", "BatchQuery", "InferResult", "ModelNotFoundError", "colorize_depth", "folder_queries",
           "infer", "infer_batch", "load_model", "mask_overlay", "read_queries", "resolve_model_dir"]
