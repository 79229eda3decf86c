"""The paper's ablations (§4.2, Tables 3-5) as configuration, and their comparison table.

A variant removes one perception signal the way the paper does, "the underlying dataset, task and
loss function for the respective perception signal", as ``--set`` overrides of the run's config
(:func:`variant_overrides`), so that it changes the cache keys of exactly the stages it changes:

* ``full``: the model as configured.
* ``no_depth`` (2D only): no depth block in any target (``curate.perception`` without ``depth``), no
  depth chain-of-thought samples (``depth_cot`` out of ``curate.tasks``), no L_dtok and no L_rec
  (``loss.w_dtok = loss.w_rec = 0``).
* ``no_seg`` (3D only): no ``[SEG]`` and no masks in any target (``curate.perception`` without
  ``seg``), no ADE20k semantic-segmentation and no GLaMM grounded-conversation samples, no mask loss
  (``loss.w_seg = 0``): SAM2 gets no gradient. The referring samples keep their depth block and answer.
* ``no_rec``: L_rec off (``loss.w_rec = 0``), all else as ``full``.
* ``no_dtok``: the marker, token and count losses off (``loss.w_dtok = 0``); the depth tokens stay in
  the targets and are learned through L_llm alone.

The teacher, the codebook, the depth tokens and the stand-ins' fits are shared by every variant;
curation by ``full``, ``no_rec`` and ``no_dtok``. Only curation (for ``no_depth`` / ``no_seg``),
fine-tuning and evaluation are computed per variant.

:func:`ablation_table` compares the variants' evaluations on the same samples: each figure with
its 95% interval (Wilson for an accuracy, bootstrap over expressions for cIoU) and its paired
difference to ``full`` (paired bootstrap), as the paper's tables lay them out: HardBLINK 3/4/5 and
their mean, RefCOCO/+/g cIoU per split, each multiple-choice benchmark's accuracy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from perceptio_core.config import PerceptioConfig
from perceptio_core.evaluation.stats import (
    Estimate,
    bootstrap_iou,
    paired_difference,
    paired_iou_difference,
    proportion,
    within_noise,
)

FULL = "full"
VARIANTS: dict[str, str] = {
    FULL: "the full model",
    "no_depth": "2D only: no depth block, no depth chain-of-thought, no L_dtok and no L_rec",
    "no_seg": "3D only: no [SEG], no masks, no segmentation samples, no mask loss",
    "no_rec": "no soft depth reconstruction loss (w_rec = 0)",
    "no_dtok": "no depth-token loss: marker, token and count (w_dtok = 0)",
}
DEFAULT_VARIANTS = ("no_depth", "no_seg", "no_rec", "no_dtok")


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join(values) + "]"


def variant_overrides(cfg: PerceptioConfig, variant: str) -> list[str]:
    """The ``--set`` overrides that make ``variant`` of the run configured by ``cfg`` (module
    docstring); ``[]`` for ``full``. Raises ``ValueError`` for an unknown variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ablation variant {variant!r} (known: {', '.join(VARIANTS)})")
    perception = list(cfg.curate.perception)
    tasks = list(cfg.curate.tasks)
    if variant == "no_depth":
        return [f"curate.perception={_list([p for p in perception if p != 'depth'])}",
                f"curate.tasks={_list([t for t in tasks if t != 'depth_cot'])}",
                "loss.w_dtok=0", "loss.w_rec=0"]  # fmt: skip
    if variant == "no_seg":
        return [f"curate.perception={_list([p for p in perception if p != 'seg'])}",
                f"curate.tasks={_list([t for t in tasks if t not in ('semantic_seg', 'grounded_conv')])}",
                "loss.w_seg=0"]  # fmt: skip
    if variant == "no_rec":
        return ["loss.w_rec=0"]
    if variant == "no_dtok":
        return ["loss.w_dtok=0"]
    return []


def parse_variants(text: str | Sequence[str] | None) -> list[str]:
    """``"no_depth,no_seg"`` (or a list) -> the variants to run, ``full`` first and always there."""
    names = [v.strip() for v in (text.split(",") if isinstance(text, str) else (text or DEFAULT_VARIANTS))]
    names = [v for v in names if v]
    for v in names:
        if v not in VARIANTS:
            raise ValueError(f"unknown ablation variant {v!r} (known: {', '.join(VARIANTS)})")
    return [FULL] + [v for v in dict.fromkeys(names) if v != FULL]


@dataclass
class Row:
    """One figure of the table: its metric, each variant's estimate and difference to ``full``."""

    group: str  # "HardBLINK", "RefCOCO", "MCQ"
    label: str  # "3 points", "refcoco val cIoU", "mmbench"
    metric: str  # the evaluate metric name ("hardblink.3.accuracy", "refcoco.val.ciou")
    values: dict[str, Estimate] = field(default_factory=dict)
    differences: dict[str, Estimate] = field(default_factory=dict)  # variant - full (not for full)

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "label": self.label, "metric": self.metric,
                "values": {v: e.to_dict() for v, e in self.values.items()},
                "differences": {v: {**e.to_dict(), "within_noise": within_noise(e)}
                                for v, e in self.differences.items()}}  # fmt: skip


def _table_metrics(samples: Mapping[str, Sequence[Any]]) -> list[tuple[str, str, str]]:
    """(group, label, metric) of the figures ``samples`` (the full model's) holds, in table order."""
    out: list[tuple[str, str, str]] = []
    for n in ("3", "4", "5", "mean"):
        if f"hardblink.{n}.accuracy" in samples:
            out.append(("HardBLINK", f"{n} points" if n != "mean" else "mean", f"hardblink.{n}.accuracy"))
    for key in sorted(samples):
        if key.endswith(".iou") and not key.startswith(("base.", "hardblink", "mcq", "mme")):
            stem = key[: -len(".iou")]
            out.append(("Referring segmentation", f"{stem} cIoU", f"{stem}.ciou"))
    for key in sorted(samples):
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "mcq" and parts[2] == "accuracy":
            out.append(("Multiple choice", parts[1], key))
    return out


def _estimate(samples: Mapping[str, Sequence[Any]], metric: str, n_boot: int, seed: int) -> Estimate | None:
    if metric.endswith(".ciou"):
        pairs = samples.get(metric[: -len(".ciou")] + ".iou")
        if pairs is None:
            return None
        return bootstrap_iou([p[0] for p in pairs], [p[1] for p in pairs], n_boot=n_boot, seed=seed)["ciou"]
    vals = samples.get(metric)
    return None if vals is None else proportion(int(sum(vals)), len(vals))


def _difference(a: Mapping[str, Sequence[Any]], b: Mapping[str, Sequence[Any]], metric: str, n_boot: int,
                seed: int) -> Estimate | None:
    if metric.endswith(".ciou"):
        key = metric[: -len(".ciou")] + ".iou"
        if key not in a or key not in b or len(a[key]) != len(b[key]):
            return None
        return paired_iou_difference([p[0] for p in a[key]], [p[1] for p in a[key]], [p[0] for p in b[key]],
                                     [p[1] for p in b[key]], n_boot=n_boot, seed=seed)["ciou"]  # fmt: skip
    if metric not in a or metric not in b or len(a[metric]) != len(b[metric]):
        return None
    return paired_difference(a[metric], b[metric], n_boot=n_boot, seed=seed)


def ablation_table(samples: Mapping[str, Mapping[str, Sequence[Any]]], n_boot: int = 1000,
                   seed: int = 0) -> list[Row]:
    """The comparison of ``samples`` (variant -> its evaluation's per-sample outcomes, the
    ``samples.json`` of its evaluate artifact: 0/1 per question for an accuracy, ``[intersection,
    union]`` per expression for a referring split), ``full`` among them. A variant scored on other
    samples than ``full`` (another benchmark subset) gets no difference for that figure."""
    if FULL not in samples:
        raise ValueError("the table compares every variant with the full model: its samples are missing")
    rows = []
    for group, label, metric in _table_metrics(samples[FULL]):
        row = Row(group, label, metric)
        for variant, s in samples.items():
            est = _estimate(s, metric, n_boot, seed)
            if est is not None:
                row.values[variant] = est
            if variant != FULL:
                d = _difference(s, samples[FULL], metric, n_boot, seed)
                if d is not None:
                    row.differences[variant] = d
        rows.append(row)
    return rows


def _cell(e: Estimate | None, signed: bool = False) -> str:
    if e is None or math.isnan(e.value):
        return "-"
    sep = " to " if (e.lo < 0 or e.hi < 0) else "-"
    v = f"{e.value:+.3f}" if signed else f"{e.value:.3f}"
    return f"{v} ({e.lo:.2f}{sep}{e.hi:.2f})"


def table_markdown(rows: Sequence[Row], variants: Sequence[str]) -> str:
    """The table as markdown: per figure, each variant's value (95% interval), then each variant's
    difference to ``full`` (95% interval; ``*`` where the interval excludes 0: beyond noise)."""
    others = [v for v in variants if v != FULL]
    head = ["group", "figure", "n", *variants, *[f"{v} - full" for v in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r.values.get(FULL).n if FULL in r.values else 0
        cells = [r.group, r.label, str(n), *[_cell(r.values.get(v)) for v in variants]]
        for v in others:
            d = r.differences.get(v)
            cells.append(_cell(d, signed=True) + (" *" if d is not None and not within_noise(d) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Each figure: value (95% interval). Accuracies: Wilson interval over the n questions; "
                 "cIoU: bootstrap over the n expressions. Differences: the variant minus the full model on "
                 "the same samples, paired bootstrap; `*` marks an interval that excludes 0 (beyond noise).")
    return "\n".join(lines) + "\n"


def table_json(rows: Sequence[Row], variants: Sequence[str], runs: Mapping[str, Any]) -> str:
    """The table as JSON: the variants, what each ran as (``runs``: variant -> keys, overrides), rows."""
    return json.dumps({"variants": list(variants), "runs": dict(runs), "rows": [r.to_dict() for r in rows]},
                      indent=2, sort_keys=True)


__all__ = ["DEFAULT_VARIANTS", "FULL", "Row", "VARIANTS", "ablation_table", "parse_variants", "table_json",
           "table_markdown", "variant_overrides"]
