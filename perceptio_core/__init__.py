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
    "SEG": "perception_tokens", "D_START": "perception_tokens", "D_END": "perception_tokens",
    "depth_token": "perception_tokens",
    "format_target": "perception_format", "parse_generation": "perception_format",
    "ParseStatus": "perception_format", "Sample": "sample",
    # data (SPEC §5)
    "generate_world": "synth", "read_sources": "sources", "data_fingerprint": "sources",
    "safe_load": "safe_pickle", "UnsafePickleError": "safe_pickle",
    "load_image": "image_io", "file_digest": "image_io", "ImageError": "image_io",
    "ann_to_mask": "refer", "read_refer": "refer", "read_ade20k": "ade20k",
    "read_hardblink": "hardblink", "read_mmbench_tsv": "vqa",
    "Sources": "records", "QuarantineEntry": "records",
    "iter_samples": "curate", "ShardWriter": "shards", "read_shards": "shards",
    "encode_mask": "masks", "decode_mask": "masks",
    # depth (SPEC §2)
    "load_teacher": "depth_teacher", "fit_teacher": "depth_teacher", "predict_depth": "depth_teacher",
    "VQVAE": "vqvae", "train_vqvae": "vqvae", "DepthTokenizer": "depth_tokens", "DepthMaps": "depth_maps",
    # model, loss, training (SPEC §1, §3, §4)
    "PerceptioModel": "perceptio_model", "generate": "generation", "fit_base": "base_fit",
    "Trainer": "trainer", "run_training": "trainer",
    # evaluation (SPEC §6)
    "IoUAccumulator": "metrics", "run_evaluation": "evaluate", "evaluate_all": "evaluate",
    "write_report": "evaluate", "infer": "infer",
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
