"""Helpers the stage bodies share: reading upstream artifacts, a training stage's scratch folder
and publishing what a training run wrote. Every stage whose body imports this module has it in its
code version (:meth:`tasks.runner.StageSpec.code_files`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from perceptio_core.data.records import Benchmarks, Sources
from tasks.data import data_root
from tasks.runner import StageContext


def load_sources(ctx: StageContext) -> Sources:
    """The ``sources`` artifact of ``ctx``'s upstream: the training sources (no benchmarks), their
    file paths under this run's data root (:func:`tasks.data.data_root`), so that a moved workdir
    or data root reads its own files."""
    folder = ctx.upstream_dir("sources")
    return Sources.from_json((folder / "sources.json").read_text(), root=data_root(ctx.cfg, ctx.run.workdir),
                             artifact=folder)


def load_benchmarks(ctx: StageContext) -> Benchmarks:
    """The ``benchmarks`` artifact of ``ctx``'s upstream (HardBLINK, multiple-choice VQA with its
    decoded images in the artifact, MME), paths located as :func:`load_sources`."""
    folder = ctx.upstream_dir("benchmarks")
    return Benchmarks.from_json((folder / "benchmarks.json").read_text(), root=data_root(ctx.cfg, ctx.run.workdir),
                                artifact=folder)


def read_tokens(folder: str | Path) -> dict[str, np.ndarray]:
    """The tokenize_depth artifact as {image digest: [N] int array} (``tokens.npy`` [n, N] and
    ``digests.json``, one digest per row: other lengths raise ``ValueError`` naming the folder)."""
    folder = Path(folder)
    digests = json.loads((folder / "digests.json").read_text())
    tokens = np.load(folder / "tokens.npy")
    if tokens.ndim != 2 or len(tokens) != len(digests):
        raise ValueError(f"{folder}: tokens.npy {tuple(tokens.shape)} is not one row per digest of digests.json "
                         f"({len(digests)})")
    return dict(zip(digests, tokens))


def scratch_dir(ctx: StageContext) -> Path:
    """A durable local folder for a training stage's checkpoints: a rerun resumes from it."""
    p = ctx.run.workdir / "cache" / f"{ctx.spec.name}-{ctx.key}"
    p.mkdir(parents=True, exist_ok=True)
    return p


def publish_training(ctx: StageContext, out: Path, model_prefix: str = "model") -> dict[str, str]:
    """Copy a training run's final model (into ``model_prefix`` of the artifact; "" for its top, where
    a saved model is read as a released one is), history and loss curves into the artifact."""
    ctx.writer.add_tree(out / "model", model_prefix)
    for name in ("history.jsonl", "metrics.json"):
        if (out / name).exists():
            ctx.writer.add_file(out / name, name)
    figures = {}
    if (out / "plots").is_dir():
        for p in sorted((out / "plots").glob("*.png")):
            ctx.writer.add_file(p, f"plots/{p.name}")
            figures[f"loss curve: {p.stem.removeprefix('loss_')}"] = f"plots/{p.name}"
    return figures
