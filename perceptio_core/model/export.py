"""A self-contained folder of a trained Perceptio model (``perceptio export``).

:func:`export_model` takes a model folder written by
:meth:`~perceptio_core.model.perceptio_model.PerceptioModel.save_pretrained` (the ``finetune``
artifact's ``model/``), the run's metrics and lineage rows, and writes a folder that loads with
``PerceptioModel.from_pretrained(folder)`` and nothing else: no artifact store, no original base
checkpoint, no SAM2 checkpoint. Layout (beside the ``save_pretrained`` files of
``save_pretrained(self_contained=True)``)::

    config.json            as save_pretrained writes it; ``model.base``, ``model.tokenizer`` and
                           ``model.sam2_checkpoint`` unset, ``"merged"`` true or false
    base/                  the base InternVL, always (merged: LoRA and the trained new-token rows
                           are in its weights; an untied LM head stays untied)
    adapter/               the PEFT adapter (unmerged exports only)
    heads.safetensors      seg_projection.*, token_rows.embed / token_rows.lm_head
    sam2.safetensors       the whole SAM2 (frozen encoders and fine-tuned mask decoder)
    tokenizer/             the extended tokenizer with its chat template, plus every file of the
                           source folder's tokenizer/ (processor files such as
                           preprocessor_config.json), copied verbatim
    depth_tokenizer/       the frozen VQ-VAE depth codec
    model_card.md          what it is, how to load it, the run's metrics, lineage and config
    export.json            the same, machine-readable, and ``files``: every other file of the
                           folder with its size and sha256 (the manifest :func:`verify_export` checks)

Merging (``merge=True``, :func:`merge_lora`): PEFT's ``merge_and_unload`` folds
W + (alpha / r) B A into each LoRA target weight and the trained rows of the K + 3 perception tokens
into the embeddings and the LM head (written again from the unmerged model's effective rows, so the
result does not depend on how a PEFT version merges token adapters). The rest of the base, the LM-head
rows of the original vocabulary included, is the checkpoint's, bit for bit.

Writing is atomic: the export is built in a temporary sibling folder (``<name>.tmp-<pid>-<id>``),
checked there, fsynced and renamed into place; a failure removes it. The checks: the manifest's
sha256 of every file read back from disk, and (``check_reload``) the export loaded back and run on a
fixed probe (an image + text sequence through InternVL, the [SEG] state through the projection and
SAM2, a code sequence through the VQ-VAE decoder), its outputs compared with the source model's
within :func:`probe_tolerance`; the measured differences are recorded in ``export.json`` ("check").
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perceptio_core.atomic_io import file_digest, fsync_dir, fsync_tree, temp_sibling, write_json, write_text

log = logging.getLogger(__name__)

EXPORT_FORMAT = "perceptio-export"
EXPORT_VERSION = 1
EXPORT_JSON = "export.json"
MODEL_CARD = "model_card.md"


class ExportError(ValueError):
    """An export that fails its manifest (a file missing, changed or not listed), or a written export
    whose reload does not reproduce the source model; the message names the files or outputs."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: the folder, whether LoRA is merged, the number of files in
    the manifest, and the reload check (``{"outputs": {name: max abs diff}, "tolerance": t}`` or
    empty when skipped)."""

    path: Path
    merged: bool
    files: int
    check: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def _listed_files(root: Path) -> list[str]:
    """Every file below ``root`` but ``export.json``, as sorted POSIX paths."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != EXPORT_JSON
    )


def file_manifest(root: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file below ``root`` except ``export.json``."""
    root = Path(root)
    return {rel: {"size": (root / rel).stat().st_size, "sha256": file_digest(root / rel)}
            for rel in _listed_files(root)}  # fmt: skip


def verify_export(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Check an export folder against the manifest of its ``export.json``: every listed file exists
    with its size and sha256, and no other file is there (a file the tokenizer or a loader would
    pick up is refused as well as a changed one). Returns the parsed ``export.json``; raises
    :class:`ExportError` naming every file that fails."""
    root = Path(root)
    path = root / EXPORT_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ExportError(f"{root}: no {EXPORT_JSON} (not an export)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or not isinstance(meta.get("files"), dict):
        raise ExportError(f"{path}: not a Perceptio export manifest (format {EXPORT_FORMAT!r} with files)")
    problems = []
    for rel, info in sorted(meta["files"].items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel} (missing)")
        elif p.stat().st_size != info.get("size"):
            problems.append(f"{rel} (size {p.stat().st_size}, manifest says {info.get('size')})")
        elif file_digest(p) != info.get("sha256"):
            problems.append(f"{rel} (sha256 mismatch)")
    problems += [f"{rel} (not in the manifest)" for rel in _listed_files(root) if rel not in meta["files"]]
    if problems:
        raise ExportError(f"{root}: export fails its manifest ({EXPORT_JSON}): " + "; ".join(problems))
    return meta


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def merge_lora(model: Any) -> Any:
    """Merge ``model``'s LoRA into its base weights, in place (PEFT ``merge_and_unload``): afterwards
    ``model.vlm`` is the plain InternVL (no adapter) with W + (alpha / r) B A in each LoRA target and
    the trained perception-token rows in its input embeddings and LM head. A head that was untied
    stays untied (the config keeps ``tie_word_embeddings`` as the checkpoint loaded it). Returns
    ``model``. Its tensors change: merge a model loaded for the purpose."""
    from perceptio_core.model.internvl import keep_head_as_loaded, new_token_rows, set_token_rows

    if not hasattr(model.vlm, "merge_and_unload"):
        raise ValueError("the model's LoRA is merged already (no PEFT wrapper)")
    ids = model.token_ids.all
    untied = model.base_model.get_output_embeddings() is not None and not getattr(
        model.base_model.config.get_text_config(), "tie_word_embeddings", False
    )
    with torch.no_grad():
        embed, head = (t.detach().clone() for t in new_token_rows(model.base_model, ids))
        merged = model.vlm.merge_and_unload()
        set_token_rows(merged, ids, embed, head)
    tied_now = keep_head_as_loaded(merged)
    if untied and tied_now:  # never expected: merging must not make the head the embeddings
        raise RuntimeError("merging tied an untied LM head to the embeddings")
    model.vlm = merged
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------------------------
# The reload check
# --------------------------------------------------------------------------------------------


def probe_inputs(model: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed probe for ``model`` (seeded, independent of the global random state):
    ``input_ids`` [1, T] (``<img>`` + the context tokens of one tile + ``</img>`` + text + the
    perception tokens), ``pixel_values`` [1, 3, S, S] (one tile), ``sam2_pixel_values`` [1, 3, S2, S2] and
    ``depth_indices`` [1, N]."""
    from perceptio_core.model.internvl import image_seq_length, image_tokens, vision_image_size

    tok = model.tokenizer
    config = model.base_model.config
    start, context, end = image_tokens(tok)
    img = tok.convert_tokens_to_ids([start] + [context] * image_seq_length(config) + [end])
    text = tok("What is in the picture, and how far is it?", add_special_tokens=False).input_ids
    tid = model.token_ids
    ids = img + text + [tid.seg, tid.d_start, *tid.codes[: min(4, len(tid.codes))], tid.d_end]
    g = torch.Generator().manual_seed(seed)
    s, s2 = vision_image_size(config), model.sam2.image_size
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "pixel_values": torch.randn(1, 3, s, s, generator=g),
        "sam2_pixel_values": torch.randn(1, 3, s2, s2, generator=g),
        "depth_indices": torch.randint(0, model.codebook_size, (1, model.num_depth_tokens), generator=g),
    }


@torch.no_grad()
def probe_outputs(model: Any, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs on :func:`probe_inputs`, float32 on the CPU: ``logits`` [1, T, V] of
    every position, ``mask_logits`` [1, 1, h, w] from the state at the ``[SEG]`` position, and
    ``depth`` [1, H, W] decoded from the probe's codes."""
    model.eval()
    device = next(model.parameters()).device
    dtype = model.base_model.dtype
    ids = probe["input_ids"].to(device)
    pixels = probe["pixel_values"].to(device=device, dtype=dtype)
    out = model.lm_forward(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, logits_from=0)
    seg_at = int((ids[0] == model.token_ids.seg).nonzero()[0, 0])
    mask = model.predict_mask_logits(out.hidden[:, seg_at], probe["sam2_pixel_values"].to(device))
    depth = model.decode_depth(probe["depth_indices"].to(device))
    return {k: v.detach().float().cpu() for k, v in (("logits", out.logits), ("mask_logits", mask), ("depth", depth))}


def probe_tolerance(dtype: str, merged: bool) -> float:
    """The largest ``max |a - b| / max(1, max |a|)`` a reload may show on the probe. An unmerged
    export holds the source's tensors as they were: equal up to float rounding of the same
    operations (1e-5). A merged one computes ``(W + s B A) x`` instead of ``W x + s B (A x)``: 1e-4 in
    float32; in bfloat16 / float16 the merged weights are rounded to 8 / 11 bits, 5e-2."""
    if dtype == "float32":
        return 1e-4 if merged else 1e-5
    return 5e-2 if merged else 1e-5


def compare_outputs(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{name: max |ref - got| / max(1, max |ref|)}`` of each probe output."""
    out = {}
    for k, a in ref.items():
        b = got[k]
        if a.shape != b.shape:
            raise ExportError(f"probe output {k}: shape {tuple(b.shape)} after reload, {tuple(a.shape)} before")
        out[k] = float((a - b).abs().max()) / max(1.0, float(a.abs().max()))
    return out


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------

LINEAGE_COLUMNS = ("stage", "key", "config_digest", "code_digest", "git_commit", "run_id", "inputs")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return "" if v is None else str(v)


def render_model_card(export: dict[str, Any], folder_name: str) -> str:
    """``model_card.md`` from the ``export.json`` record (before its file list): what the model is,
    how to load it, its metrics, lineage and config."""
    model = export["config"].get("model", {}) if isinstance(export.get("config"), dict) else {}
    codec = export["model"]["depth_codec"]
    merged = export["merged"]
    lines = [
        f"# Perceptio model: {folder_name}",
        "",
        "InternVL with LoRA, perception tokens (`[SEG]` -> SAM2 mask decoder; `<d_start>` + N depth codes + "
        "`<d_end>` decoded by a frozen VQ-VAE), exported by `perceptio export` as a self-contained folder: "
        "the base InternVL, SAM2 and the depth codec are inside.",
        "",
        "- LoRA: " + ("merged into the base weights (no adapter; inference only)" if merged
                      else "kept as a PEFT adapter (adapter/)"),
        f"- weights: {export['model']['dtype']}; SAM2 variant {export['model']['sam2_variant']}",
        f"- depth codec: K = {codec['codebook_size']} codes, N = {codec['num_tokens']} tokens "
        f"({codec['grid']} x {codec['grid']}), maps {codec['map_size']} px",
        f"- exported {export['created_at']} from `{export['source'].get('model_dir', '?')}`",
        "",
        "## How to load",
        "",
        "```python",
        "from perceptio_core.model.perceptio_model import PerceptioModel",
        "",
        f'model = PerceptioModel.from_pretrained("{folder_name}")  # checks every file against export.json first',
        "```",
        "",
        "```bash",
        f'perceptio infer --model {folder_name} --image photo.jpg --query "the red ball" --out answer/',
        "```",
        "",
        "## Metrics",
        "",
    ]
    metrics = export.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No run record was given: no metrics.")
    lines += ["", "## Lineage", ""]
    rows = export.get("lineage") or []
    if rows:
        lines.append("Each artifact the model came from (stage, cache key, digest of its resolved config section, "
                     "digest of the code it depends on, git commit, run, upstream artifacts; digests cut to 12 "
                     f"characters here, whole in `{EXPORT_JSON}`).")
        lines += ["", "| " + " | ".join(LINEAGE_COLUMNS) + " |", "|" + " --- |" * len(LINEAGE_COLUMNS)]
        short = {"config_digest", "code_digest", "git_commit"}  # cut as `perceptio lineage` shows them
        lines += ["| " + " | ".join(_fmt(r.get(c))[:12] if c in short else _fmt(r.get(c)) for c in LINEAGE_COLUMNS)
                  + " |" for r in rows]  # fmt: skip
    else:
        lines.append("No run record was given: no lineage.")
    lines += ["", "## Config", "", "The resolved config the model was trained with:", "", "```json",
              json.dumps(export.get("config") or {"model": model}, indent=2, sort_keys=True, default=str), "```", ""]
    lines += ["## Files", "", f"Every file's size and sha256 are listed in `{EXPORT_JSON}` (\"files\"); "
              "`from_pretrained` refuses the folder when one differs, is missing or is not listed.", ""]
    check = export.get("check") or {}
    if check:
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in check["outputs"].items())
        lines += [f"Reload check: the export reproduces the source model on a fixed probe (relative max abs "
                  f"difference: {diffs}; tolerance {check['tolerance']:g}).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy every file below ``src`` into ``dst`` (same relative paths, replacing)."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)


def export_model(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    merge: bool = False,
    metrics: dict[str, Any] | None = None,
    lineage: list[dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
    check_reload: bool = True,
    load_kwargs: dict[str, Any] | None = None,
) -> ExportResult:
    """Write the self-contained export of the model saved at ``model_dir`` to ``out_dir`` (module
    docstring).

    Args:
        model_dir: a ``save_pretrained`` folder; it is loaded with ``PerceptioModel.from_pretrained``
            (so its base, ``base/`` or the recorded ``model.base``, must be reachable now: after the
            export it is not needed any more).
        out_dir: the export folder; must not exist unless ``overwrite`` (then it is replaced, only
            once the new one is complete and checked).
        merge: merge LoRA into the base weights (:func:`merge_lora`).
        metrics: ``{name: value}`` of the run (e.g. ``finetune.llm_last``, ``evaluate.refcoco.val.ciou``).
        lineage: one dict per upstream artifact (keys of :data:`LINEAGE_COLUMNS`, more are kept).
        config: the resolved config the model was trained with; default: the model's own
            ``model`` and ``loss`` sections.
        source: what the export came from (run id, store, finetune key, ...), recorded as given.
        check_reload: load the written export and compare it with the source model on a probe
            (:func:`probe_outputs`); off, only the manifest is checked after writing.
        load_kwargs: passed to ``from_pretrained`` of ``model_dir`` (``depth_tokenizer``, ``base``).

    Returns an :class:`ExportResult`. Raises ``FileExistsError`` when ``out_dir`` exists and not
    ``overwrite``, :class:`ExportError` when a check fails (nothing is left at ``out_dir`` then).
    """
    from perceptio_core.model.perceptio_model import PerceptioModel

    src, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (overwrite it explicitly)")
    if out == src or src in out.parents:
        raise ValueError(f"the export {out} must not be inside the model folder {src}")
    src_meta = json.loads((src / "config.json").read_text())
    model = PerceptioModel.from_pretrained(src, **(load_kwargs or {}))
    probe = probe_inputs(model) if check_reload else {}
    reference = probe_outputs(model, probe) if check_reload else {}
    if merge:
        merge_lora(model)
    dtype = model.model_cfg.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    try:
        model.save_pretrained(tmp, self_contained=True)
        if not (tmp / "depth_tokenizer").is_dir():
            raise ExportError(f"{src}: its depth codec ({type(model.depth_tokenizer).__name__}) is not a "
                              f"DepthTokenizer and is not saved with the model: an export must hold its codec")
        if (src / "tokenizer").is_dir():  # processor files, chat template: as the run's folder holds them
            _copy_tree(src / "tokenizer", tmp / "tokenizer")
        del model
        gc.collect()
        check: dict[str, Any] = {}
        if check_reload:
            again = PerceptioModel.from_pretrained(tmp, verify=False)
            diffs = compare_outputs(reference, probe_outputs(again, probe))
            del again
            gc.collect()
            tol = probe_tolerance(dtype, merge)
            check = {"outputs": diffs, "tolerance": tol}
            bad = {k: v for k, v in diffs.items() if not v <= tol}
            if bad:
                raise ExportError(f"the export does not reproduce {src} on the probe: "
                                  + ", ".join(f"{k} differs by {v:.3g} (tolerance {tol:g})" for k, v in bad.items()))
        saved = json.loads((tmp / "config.json").read_text())
        record: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "merged": bool(merge),
            "source": {"model_dir": str(src), "base": src_meta["model"].get("base"),
                       "tokenizer": src_meta["model"].get("tokenizer"),
                       "sam2_checkpoint": src_meta["model"].get("sam2_checkpoint"), **(source or {})},
            "model": {"dtype": dtype, "sam2_variant": saved["model"]["sam2_variant"],
                      "depth_codec": saved["depth_codec"], "token_ids": saved["token_ids"]},
            "metrics": dict(metrics or {}),
            "lineage": list(lineage or []),
            "config": config if config is not None else {"model": saved["model"], "loss": saved["loss"]},
            "check": check,
        }
        write_text(tmp / MODEL_CARD, render_model_card(record, out.name))
        record["files"] = file_manifest(tmp)
        write_json(tmp / EXPORT_JSON, record)
        verify_export(tmp)  # every file read back from disk against the manifest
        fsync_tree(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (%s, %d files)", src, out, "merged" if merge else "adapter", len(record["files"]))
    return ExportResult(path=out, merged=bool(merge), files=len(record["files"]), check=check)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed
    once the new folder is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "EXPORT_JSON",
    "ExportError",
    "ExportResult",
    "MODEL_CARD",
    "export_model",
    "file_manifest",
    "merge_lora",
    "probe_inputs",
    "probe_outputs",
    "probe_tolerance",
    "render_model_card",
    "verify_export",
]
