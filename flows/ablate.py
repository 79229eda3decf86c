"""The paper's ablations (§4.2, Tables 3-5) as one Prefect flow: ``perceptio ablate``.

Each variant (:mod:`perceptio_core.evaluation.ablation`: ``full``, ``no_depth``, ``no_seg``, ``no_rec``,
``no_dtok``) runs as the pipeline flow with the variant's overrides, one after the other on one
workdir, as a subflow named after it; the stages the variants share (the teacher, the codebook, the
tokens, the stand-ins' fits, most curation) have equal keys and are computed once, and a variant
already in the store is not computed again. The comparison table (each figure with its 95%
interval and its paired difference to ``full``) is then written to
``<workdir>/ablations/<run id>/`` as ``ablation.md`` and ``ablation.json`` and published as a
Prefect markdown artifact (key ``perceptio-ablation``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from perceptio_core.evaluation.ablation import VARIANTS, ablation_table, parse_variants, table_json, table_markdown, variant_overrides
from perceptio_core.atomic_io import write_text
from flows.pipeline import new_run_id, perceptio_pipeline, resolve_config
from storage import ArtifactStore


def _samples(summary: dict[str, Any]) -> dict[str, list[Any]]:
    ev = summary["stages"].get("evaluate")
    if ev is None:
        raise RuntimeError("the run has no evaluate stage: the ablation table compares evaluations")
    store = ArtifactStore(summary["store"], cache_dir=Path(summary["workdir"]) / "cache")
    m = store.trust("evaluate", ev["key"])
    if m is None or "samples.json" not in m.files:
        raise RuntimeError(f"evaluate/{ev['key']} holds no per-sample outcomes (samples.json): run it again")
    return json.loads(store.path("evaluate", ev["key"], "samples.json").read_text())


@flow(name="perceptio-ablate", log_prints=True)
def perceptio_ablate(
    profile: str = "tiny",
    overrides: list[str] | None = None,
    workdir: str | None = None,
    variants: list[str] | None = None,
) -> dict[str, Any]:
    """Run ``full`` and ``variants`` (default: every ablation of the paper) and write their table.
    Returns ``{"table": path of ablation.md, "json": path of ablation.json, "runs": {variant: ...}}``."""
    log = get_run_logger()
    names = parse_variants(variants)
    cfg = resolve_config(profile, overrides, workdir)
    wd = Path(cfg.run.workdir).expanduser().resolve()
    runs: dict[str, Any] = {}
    samples: dict[str, dict[str, list[Any]]] = {}
    for v in names:
        extra = variant_overrides(cfg, v)
        log.info("ablation %s (%s): %s", v, VARIANTS[v], " ".join(extra) or "as configured")
        summary = perceptio_pipeline.with_options(flow_run_name=f"ablation-{v}")(
            profile=profile, overrides=[*(overrides or []), *extra], workdir=str(wd))
        computed = [s for s, r in summary["stages"].items() if r["status"] == "computed"]
        log.info("ablation %s: computed %s", v, ", ".join(computed) or "nothing (all in the store)")
        runs[v] = {"overrides": extra, "run_id": summary["run_id"], "computed": computed,
                   "keys": {s: r["key"] for s, r in summary["stages"].items()}}
        samples[v] = _samples(summary)
    n_boot = cfg.evaluate.bootstrap
    rows = ablation_table(samples, n_boot=n_boot)
    md = table_markdown(rows, names)
    out = wd / "ablations" / new_run_id()
    write_text(out / "ablation.md", "# Ablations (paper \u00a74.2)\n\n" + md)
    write_text(out / "ablation.json", table_json(rows, names, runs))
    create_markdown_artifact(key="perceptio-ablation", markdown=f"# Perceptio ablations\n\n{md}",
                             description="each variant against the full model, 95% intervals")
    log.info("ablation table: %s", out / "ablation.md")
    return {"table": str(out / "ablation.md"), "json": str(out / "ablation.json"), "runs": runs}
