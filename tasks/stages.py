"""The stages of the pipeline, in topological order (ARCHITECTURE.md, the DAG).

``sources`` (training datasets) and ``benchmarks`` (evaluation-only datasets) are the two roots:
every training stage hangs from ``sources``, and only ``evaluate`` reads ``benchmarks``. The
benchmarks come second so that a run reads (and checks) them before hours of training."""

from __future__ import annotations

from tasks import base, benchmarks, codebook, curate, evaluate, finetune, sam2, sources, teacher
from tasks.runner import StageSpec

STAGES: list[StageSpec] = [
    sources.SPEC,
    benchmarks.SPEC,
    teacher.FIT_TEACHER,
    teacher.TEACHER_DEPTH,
    codebook.TRAIN_VQVAE,
    codebook.TOKENIZE_DEPTH,
    curate.SPEC,
    base.BASE,
    sam2.FIT_SAM2,
    finetune.FINETUNE,
    evaluate.EVALUATE,
]
BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def downstream_of(name: str) -> set[str]:
    """``name`` and every stage that depends on it, directly or not."""
    out = {name}
    for s in STAGES:
        if any(u in out for u in s.upstream):
            out.add(s.name)
    return out


def upstream_of(name: str) -> set[str]:
    """Every stage ``name`` depends on, directly or not (``name`` excluded)."""
    out: set[str] = set()
    todo = list(BY_NAME[name].upstream)
    while todo:
        u = todo.pop()
        if u not in out:
            out.add(u)
            todo.extend(BY_NAME[u].upstream)
    return out
