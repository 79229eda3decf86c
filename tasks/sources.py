"""Stage ``sources``: resolve the datasets named by the config (or generate the synthetic world),
read and validate them with the real-format readers, and store the records and the quarantine."""

from __future__ import annotations

from pathlib import Path

from perceptio_core.config import PerceptioConfig, canonical_json
from perceptio_core.data import sources as data_sources
from perceptio_core.world.synth import generate_world
from storage import code_digest
from storage.keys import digest_text
from tasks.runner import RunContext, StageContext, StageOutput, StageSpec, module_files, versioned_modules

SYNTH_ENTRY = "perceptio_core.world.synth"


def synth_code_modules() -> list[str]:
    """The modules whose source versions the synthetic world: the generator and every project module
    it reaches by import, less the config schema and package inits, as for a stage's code version
    (the synth config's values are keyed directly)."""
    return versioned_modules([SYNTH_ENTRY])


def _synth_digest(cfg: PerceptioConfig) -> str:
    return digest_text(canonical_json(cfg.synth), code_digest(module_files(synth_code_modules())))


def world_dir(cfg: PerceptioConfig, workdir: Path) -> Path:
    """Where the synthetic world of this config lives (one folder per synth config and code)."""
    return Path(workdir).resolve() / "worlds" / _synth_digest(cfg)[:16]


def data_root(cfg: PerceptioConfig, workdir: Path) -> Path:
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {root} does not exist or is not a folder")
        return root
    return world_dir(cfg, workdir)


def fingerprint(cfg: PerceptioConfig, workdir: Path) -> str:
    """Key material for the inputs: the synthetic world's config and generator code, or a content
    digest of a real data root's annotation files and image listings."""
    if cfg.data.root:
        return "data:" + data_sources.data_fingerprint(data_root(cfg, workdir), cfg.data)
    return "synth:" + _synth_digest(cfg)


def prepare(run: RunContext) -> None:
    """Make sure the synthetic world exists (generated once; regenerated identically if deleted)."""
    if not run.cfg.data.root:
        generate_world(world_dir(run.cfg, run.workdir), run.cfg.synth, progress=True)


def read_sources(ctx: StageContext) -> StageOutput:
    root = data_root(ctx.cfg, ctx.run.workdir)
    ctx.log.info("reading sources under %s", root)
    sources = data_sources.read_sources(root, ctx.cfg.data, cache_dir=ctx.run.workdir / "cache",
                                        progress=True)
    with ctx.writer.atomic("sources.json", "w") as f:
        f.write(sources.to_json())
    counts = sources.counts()
    for q in sources.quarantine[:20]:
        ctx.log.warning("quarantined %s %s: %s", q.source, q.record, q.reason)
    if len(sources.quarantine) > 20:
        ctx.log.warning("... and %d more quarantined records", len(sources.quarantine) - 20)
    ctx.log.info("sources: %s", counts)
    return StageOutput(metrics=counts, quarantine=list(sources.quarantine), notes=[f"root {root}"])


SPEC = StageSpec(
    name="sources",
    upstream=(),
    sections=("data",),
    body=read_sources,
    description="resolve and validate the datasets (or the synthetic world)",
    fingerprint=fingerprint,
    prepare=prepare,
)
