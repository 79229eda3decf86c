"""Stage ``benchmarks``: resolve the evaluation-only datasets (SPEC §6) apart from the training
sources: HardBLINK (``data.hardblink``, AURORA's layout), the multiple-choice benchmarks in
VLMEvalKit's TSV layout (``data.mcq``, name -> TSV) and MME's release folder (``data.mme``), read
and validated by :func:`perceptio_core.data.sources.read_benchmarks` into ``benchmarks.json`` plus a
quarantine. The TSVs' images (base64 in the TSV) are decoded into the artifact (``mcq-images/``),
so evaluation reads nothing but the store and the data root.

Only ``evaluate`` reads this artifact, so pointing a benchmark elsewhere (or editing one) re-keys
``benchmarks`` and ``evaluate`` and nothing trained. No training stage reads benchmark images: the
teacher maps the training images only (evaluation looks a HardBLINK image's teacher map up by digest
and finds none), curation excludes the REFER evaluation splits (from the ``sources`` artifact), and
the offline base's tokenizer covers the HardBLINK question through the text depth chain-of-thought
training asks it with. The stage is demanded (its datasets checked) only by runs that reach it:
``perceptio run`` in full or ``--from``/``--only`` a stage upstream of ``evaluate``'s; ``""`` skips
any benchmark (``--set data.mme=``, ``--set data.mcq.mmbench=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perceptio_core.config import PerceptioConfig
from perceptio_core.data import sources as data_sources
from tasks.runner import StageContext, StageOutput, StageSpec
from tasks.data import data_fingerprint, data_root, prepare


def fingerprint(cfg: PerceptioConfig, workdir: Path) -> str:
    return data_fingerprint(cfg, workdir, cfg.data, data_sources.BENCHMARKS)


def read_benchmarks(ctx: StageContext) -> StageOutput:
    root = data_root(ctx.cfg, ctx.run.workdir)
    ctx.log.info("reading the benchmarks under %s", root)
    # the multiple-choice images are decoded into the artifact: evaluation reads them from the store
    bench = data_sources.read_benchmarks(root, ctx.cfg.data, image_dir=ctx.writer.file("mcq-images"))
    with ctx.writer.atomic("benchmarks.json", "w") as f:
        f.write(bench.to_json(artifact=ctx.writer.staging))
    for q in bench.quarantine[:20]:
        ctx.log.warning("quarantined %s %s: %s", q.source, q.record, q.reason)
    if len(bench.quarantine) > 20:
        ctx.log.warning("... and %d more quarantined records", len(bench.quarantine) - 20)
    counts: dict[str, Any] = bench.counts()
    ctx.log.info("benchmarks: %s", counts)
    return StageOutput(metrics=counts, quarantine=list(bench.quarantine), notes=[f"root {root}"])


SPEC = StageSpec(
    name="benchmarks",
    upstream=(),
    sections=("data.root", "data.hardblink", "data.mcq", "data.mme"),
    body=read_benchmarks,
    description="resolve and validate the evaluation benchmarks (HardBLINK, multiple-choice TSVs, MME)",
    fingerprint=fingerprint,
    prepare=prepare,
)
