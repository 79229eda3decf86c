"""The evaluation report (SPEC §6): ``report.md`` with the metrics table (Perceptio, the base and
their difference per metric) and pictures of right and wrong samples per benchmark, from an
:class:`~perceptio_core.evaluation.evaluate.Evaluation`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from perceptio_core.data.image_io import ImageError, load_image
from perceptio_core.depth.metrics import resize_map
from perceptio_core.evaluation.evaluate import Evaluation, Shown
from perceptio_core.evaluation.stats import Estimate, within_noise
from perceptio_core.format.target import ParseStatus

REPORT = "report.md"
FIGURES = "figures"


def split_metric_name(name: str) -> tuple[str, str, str]:
    """``"refcoco+.testA.ciou"`` -> ``("refcoco+", "testA", "ciou")``; a two-part name
    (``"perception_block.wellformed"``) has an empty split."""
    parts = name.split(".")
    if len(parts) == 2:
        return parts[0], "", parts[1]
    return parts[0], ".".join(parts[1:-1]), parts[-1]


def _fmt(v: float | None, integer: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.0f}" if integer or abs(v) >= 1000 else f"{v:.3f}"


def _ci(e: Estimate | None) -> str:
    if e is None or math.isnan(e.lo) or math.isnan(e.hi):
        return ""
    return f"{e.lo:.2f}-{e.hi:.2f}" if e.lo >= 0 else f"{e.lo:+.2f} to {e.hi:+.2f}"


def metrics_table(metrics: Mapping[str, float], intervals: Mapping[str, Estimate] | None = None,
                  differences: Mapping[str, Estimate] | None = None) -> str:
    """Markdown table ``benchmark | split | metric | perceptio | 95% CI | base | 95% CI | Δ | Δ 95% CI |
    noise``: Δ = perceptio - base where both exist; with ``differences`` (the paired bootstrap on
    the same samples) its interval and whether it is ``within noise`` (the interval holds 0) or
    ``beyond noise``. Counts (``n``) are shown without Δ."""
    intervals, differences = intervals or {}, differences or {}
    rows = ["| benchmark | split | metric | perceptio | 95% CI | base | 95% CI | Δ | Δ 95% CI | noise |",
            "|---|---|---|---:|---|---:|---|---:|---|---|"]
    for name, v in metrics.items():
        if name.startswith("base."):
            continue
        b = metrics.get(f"base.{name}")
        bench, split, metric = split_metric_name(name)
        n = metric == "n" or metric.startswith("n_")  # counts: n, n_unconstrained
        delta = "" if b is None or n or math.isnan(v) or math.isnan(b) else f"{v - b:+.3f}"
        d = differences.get(name)
        noise = "" if d is None else ("within noise" if within_noise(d) else "beyond noise")
        rows.append(f"| {bench} | {split} | {metric} | {_fmt(v, n)} | {_ci(intervals.get(name))} | {_fmt(b, n)} | "
                    f"{_ci(intervals.get(f'base.{name}'))} | {delta} | {_ci(d)} | {noise} |")
    return "\n".join(rows)


def sample_figure(s: Shown, path: str | os.PathLike[str]) -> Path:
    """One PNG row for a kept sample: the image; for refer the predicted mask over it (green) with
    the ground truth's outline (red); the predicted depth map at the image's size (HardBLINK's
    points marked on it); the query / answer / reference / base answer and the verdict."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    try:
        img = np.asarray(load_image(s.image_path))
    except ImageError:
        img = np.zeros((32, 32, 3), dtype=np.uint8)
    refer = s.benchmark == "refer"
    fig, axes = plt.subplots(1, 4 if refer else 3, figsize=(13 if refer else 10, 3.2), dpi=80)
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=9)
    if refer:
        ax = axes[1]
        ax.imshow(img)
        if s.mask is not None and s.mask.shape == img.shape[:2]:
            overlay = np.zeros((*s.mask.shape, 4), dtype=np.float32)
            overlay[s.mask] = (0.1, 0.9, 0.2, 0.55)
            ax.imshow(overlay)
        if s.gt_mask is not None and s.gt_mask.any():
            ax.contour(s.gt_mask.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title("predicted mask (green) / truth (red)" if s.mask is not None
                     else "no [SEG]: empty mask / truth (red)", fontsize=9)  # fmt: skip
    ax = axes[2 if refer else 1]
    if s.depth_map is not None:
        ax.imshow(resize_map(np.asarray(s.depth_map, dtype=np.float32), img.shape[:2]), cmap="magma")
        ax.set_title("predicted depth (bright = near)", fontsize=9)
        for (x, y), lab in zip(s.points, s.labels):
            ax.plot([x], [y], "o", mfc="none", mec="cyan", ms=8)
            ax.text(x + 3, y - 3, lab, color="cyan", fontsize=8)
    else:
        ax.imshow(np.full(img.shape[:2], 0.5), cmap="gray", vmin=0, vmax=1)
        ax.text(img.shape[1] / 2, img.shape[0] / 2, f"no depth block\n({s.status or 'none'})",
                ha="center", va="center", fontsize=9)  # fmt: skip
        ax.set_title("predicted depth", fontsize=9)
    ax = axes[-1]
    verdict = "RIGHT" if s.correct else "WRONG"
    lines = [f"{s.name} - {verdict}" + (f" (IoU {s.score:.2f})" if s.score is not None else ""),
             f"query: {s.query}", f"answer: {s.answer or '(empty)'}", f"reference: {s.reference}"]
    if s.status:
        lines.append(f"block: {s.status}")
    if s.base_answer is not None:
        lines.append(f"base: {s.base_answer or '(empty)'} ({'right' if s.base_correct else 'wrong'})")
    ax.text(0.0, 1.0, "\n".join(textwrap.fill(line, 46) for line in lines), ha="left", va="top", fontsize=8,
            family="monospace")  # fmt: skip
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    axes[-1].axis("off")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(ev: Evaluation, out_dir: str | os.PathLike[str], title: str = "Perceptio evaluation") -> Path:
    """Write ``<out_dir>/report.md`` (metric tables, perceptio vs base; the notes on metrics left
    out or partial, such as ``hardblink.depth_tokens.skipped``; the perception block's statuses;
    timings; one picture row per kept sample, right and wrong, referenced by file name under
    ``figures/``) and the PNGs. Returns the markdown's path."""
    out = Path(out_dir)
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    has_base = any(k.startswith("base.") for k in ev.metrics)
    md = [f"# {title}", ""]
    md.append("Metrics are `<benchmark>.<split>.<metric>`; cIoU = sum of intersections / sum of unions, "
              "gIoU = mean IoU, p50 = share with IoU >= 0.5; a generation without `[SEG]` counts as an "
              "empty mask and an unreadable answer as wrong (never dropped).")
    if has_base:
        md.append("The base model gets the same prompts; it has no `[SEG]`, so its masks are empty.")
    md.append("Intervals are 95%: Wilson for accuracies, the bootstrap over expressions for cIoU and gIoU; "
              "Δ's interval is the paired bootstrap over the same samples, and a Δ whose interval holds 0 is "
              "within noise. `invalid` is the share of answers no option could be read from (scored wrong); "
              "`no_mask` the share of referring prompts answered without `[SEG]` (an empty mask); `chance` and "
              "`majority` are the baselines of a multiple-choice set; `hardblink.mean.accuracy`'s interval "
              "pools the questions of every point count.")
    md += ["", "## Metrics", "", metrics_table(ev.metrics, ev.intervals, ev.differences), ""]
    if ev.notes:  # metrics left out or partial, and why
        md += ["## Notes", ""] + [f"- `{k}`: {v}" for k, v in ev.notes.items()] + [""]
    if ev.block_status:
        md += ["## Perception block", "", "| decoding | " + " | ".join(s.value for s in ParseStatus) + " |",
               "|---|" + "---:|" * len(ParseStatus)]
        for kind, counts in ev.block_status.items():
            md.append(f"| {kind} | " + " | ".join(str(counts.get(s.value, 0)) for s in ParseStatus) + " |")
        md.append("")
    if ev.timings:
        md += ["## Timings", ""] + [f"- {k}: {_fmt(v)}" for k, v in ev.timings.items()] + [""]
    if ev.errors:
        md += ["## Unreadable images (scored wrong / empty)", ""] + [f"- {e}" for e in ev.errors] + [""]
    if ev.shown:
        md += ["## Samples", ""]
        by_bench: dict[str, list[Shown]] = {}
        for s in ev.shown:
            by_bench.setdefault(s.benchmark, []).append(s)
        for bench, items in by_bench.items():
            md += [f"### {bench}", ""]
            counters: Counter[str] = Counter()
            for s in sorted(items, key=lambda s: (not s.correct, s.key)):
                verdict = "right" if s.correct else "wrong"
                name = f"{bench}_{verdict}_{counters[verdict]}.png"
                counters[verdict] += 1
                sample_figure(s, out / FIGURES / name)
                s.figure = f"{FIGURES}/{name}"
                md += [f"**{s.name}, {verdict}**: {s.query}", "", f"![{s.name} {verdict}]({s.figure})", ""]
    path = out / REPORT
    path.write_text("\n".join(md) + "\n")
    return path
