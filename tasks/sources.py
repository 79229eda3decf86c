"""Stage ``sources``: resolve the *training* datasets named by the config (or generate the synthetic
world), read and validate them with the real-format readers, and store the records and the
quarantine (SPEC §5; :func:`perceptio_core.data.sources.read_training_sources`).

The training sources are the REFER trees on their COCO images (train and the val/test splits
evaluation scores, one set of files), ADE20k, the LLaVA / GLaMM conversation files (checked and
fingerprinted here, read by ``curate`` and ``base``) and the COCO captions, which only the offline
base fit reads: they are read, demanded and keyed only while ``model.base`` is unset
(:func:`training_data`). The evaluation benchmarks (HardBLINK, the VQA TSV) are the ``benchmarks``
stage's (:mod:`tasks.benchmarks`), so pointing ``data.hardblink``, ``data.mcq`` or ``data.mme`` elsewhere
re-keys evaluation only. Every dataset this stage needs that the disk lacks is named in one
:class:`~perceptio_core.data.records.MissingDataError` when the keys are computed, before any stage
runs, each with the ``--set`` that skips it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perceptio_core.config import PerceptioConfig
from perceptio_core.data import sources as data_sources
from tasks.data import data_fingerprint, data_root, prepare, synth_code_modules, training_data, world_dir
from tasks.runner import StageContext, StageOutput, StageSpec

__all__ = ["SPEC", "data_root", "synth_code_modules", "training_data", "world_dir"]


def fingerprint(cfg: PerceptioConfig, workdir: Path) -> str:
    """The training datasets' content (or the synthetic world's generator): :func:`tasks.data.data_fingerprint`."""
    return data_fingerprint(cfg, workdir, training_data(cfg), data_sources.TRAINING)


def config_view(cfg: PerceptioConfig) -> dict[str, Any]:
    """The ``data`` fields this stage reads, as ``sections`` names them (``data.captions`` "" while
    ``model.base`` is set: then it is not read)."""
    data = training_data(cfg)
    return {f"data.{f}": getattr(data, f) for f in ("root", *data_sources.FIELDS[data_sources.TRAINING])}


def read_sources(ctx: StageContext) -> StageOutput:
    root = data_root(ctx.cfg, ctx.run.workdir)
    ctx.log.info("reading the training sources under %s", root)
    sources = data_sources.read_training_sources(root, training_data(ctx.cfg), progress=True)
    with ctx.writer.atomic("sources.json", "w") as f:
        f.write(sources.to_json())
    counts = sources.counts()
    for name in ("hardblink", "mcq", "mme"):  # the benchmarks stage's
        counts.pop(name, None)
    for q in sources.quarantine[:20]:
        ctx.log.warning("quarantined %s %s: %s", q.source, q.record, q.reason)
    if len(sources.quarantine) > 20:
        ctx.log.warning("... and %d more quarantined records", len(sources.quarantine) - 20)
    ctx.log.info("sources: %s", counts)
    return StageOutput(metrics=counts, quarantine=list(sources.quarantine), notes=[f"root {root}"])


SPEC = StageSpec(
    name="sources",
    upstream=(),
    sections=tuple(f"data.{f}" for f in ("root", *data_sources.FIELDS[data_sources.TRAINING])),
    view=config_view,  # data.captions only while model.base is unset
    body=read_sources,
    description="resolve and validate the training datasets (or the synthetic world)",
    fingerprint=fingerprint,
    prepare=prepare,
)
