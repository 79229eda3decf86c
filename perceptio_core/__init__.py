"""Perceptio's science: plain Python, numpy and torch (no Prefect, no file-layout policy).

Public names are re-exported here lazily (PEP 562), so ``import perceptio_core.config`` stays cheap
while ``from perceptio_core import VQVAE`` works.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # config
    "PerceptioConfig": "config", "ConfigError": "config", "load_config": "config",
    # tokens and sample format (SPEC §1)
    "SEG": "format.tokens", "D_START": "format.tokens", "D_END": "format.tokens",
    "depth_token": "format.tokens",
    "format_target": "format.target", "parse_generation": "format.target",
    "ParseStatus": "format.target", "Sample": "curation.sample",
    # data (SPEC §5)
    "generate_world": "world.synth", "read_sources": "data.sources", "data_fingerprint": "data.sources",
    "safe_load": "data.safe_pickle", "UnsafePickleError": "data.safe_pickle",
    "load_image": "data.image_io", "file_digest": "atomic_io", "ImageError": "data.image_io",
    "ann_to_mask": "data.refer", "read_refer": "data.refer", "read_ade20k": "data.ade20k",
    "read_hardblink": "data.hardblink", "read_mcq_tsv": "data.mcq", "read_mme": "data.mme",
    "Sources": "data.records", "QuarantineEntry": "data.records",
    "iter_samples": "curation.curate", "ShardWriter": "curation.shards", "read_shards": "curation.shards",
    "encode_mask": "data.masks", "decode_mask": "data.masks",
    # depth (SPEC §2)
    "load_teacher": "depth.teacher", "predict_depth": "depth.teacher", "write_teacher_maps": "depth.teacher",
    "VQVAE": "depth.vqvae", "DepthTokenizer": "depth.tokenizer", "DepthMaps": "depth.maps",
    "DepthCodec": "depth.codec", "DepthCodecSpec": "depth.codec",
    # model, loss, training (SPEC §1, §3, §4)
    "PerceptioModel": "model.perceptio_model", "generate": "model.generation", "fit_base": "training.base_fit",
    "export_model": "model.export", "verify_export": "model.export", "ExportError": "model.export",
    "convert_internvl": "model.convert", "checkpoint_layout": "model.convert",
    "fit_teacher": "training.teacher_fit", "train_vqvae": "training.vqvae_fit",
    "Trainer": "training.trainer", "run_training": "training.trainer",
    # evaluation (SPEC §6)
    "IoUAccumulator": "evaluation.metrics", "run_evaluation": "evaluation.evaluate",
    "write_report": "evaluation.report", "infer": "evaluation.infer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'perceptio_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"perceptio_core.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
