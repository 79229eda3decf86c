"""Where a run's data lives, shared by the ``sources`` and ``benchmarks`` stages: the data root
(``data.root``) or the synthetic world generated into ``<workdir>/worlds/`` when it is unset, and
the input fingerprints folded into their keys (:func:`data_fingerprint`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from perceptio_core.config import DataConfig, PerceptioConfig, canonical_json
from perceptio_core.data import sources as data_sources
from storage import code_digest
from storage.keys import digest_text
from tasks.runner import RunContext, module_files, versioned_modules

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


def training_data(cfg: PerceptioConfig) -> DataConfig:
    """The data config as the ``sources`` stage reads it: the COCO captions only while the offline
    base is fit (``model.base`` unset; nothing else reads them)."""
    return cfg.data if not cfg.model.base else dataclasses.replace(cfg.data, captions="")


def data_fingerprint(cfg: PerceptioConfig, workdir: Path, data: DataConfig, part: str) -> str:
    """Key material for the inputs of ``part`` of ``data``: a content digest of a real data root's
    annotation files and image listings; for the synthetic world its config and generator code,
    plus the content of any dataset named by an absolute path outside it."""
    root = data_root(cfg, workdir)
    if cfg.data.root:
        return "data:" + data_sources.data_fingerprint(root, data, (part,))
    return "synth:" + digest_text(_synth_digest(cfg), data_sources.data_fingerprint(root, data, (part,), generated=True))


def prepare(run: RunContext) -> None:
    """Make sure the synthetic world exists (generated once; regenerated identically if deleted)."""
    from perceptio_core.world.synth import generate_world

    if not run.cfg.data.root:
        generate_world(world_dir(run.cfg, run.workdir), run.cfg.synth, progress=True)
