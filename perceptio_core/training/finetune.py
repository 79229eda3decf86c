"""The ``finetune`` stage (SPEC §3, §4): the Perceptio model trained on the curated shards with the
one training loop (:mod:`perceptio_core.training.trainer`).

What is trained (SPEC §4, :meth:`PerceptioModel.build`): LoRA on the language model (``model.lora_*``),
the K + 3 new token rows of the embeddings and the LM head, the ``[SEG]`` projection and the SAM2
mask decoder; the vision tower, the SAM2 image encoder and the VQ-VAE stay frozen. The loss is the
model's composite SPEC §3 loss; every term is logged per step.

Data: the curated shard directory (``manifest.parquet`` + ``.tar`` shards) read by manifest offset
(:mod:`perceptio_core.curation.wds_loader`), rows of ``finetune.splits`` / ``finetune.tasks``; in the loader
workers each :class:`~perceptio_core.curation.sample.Sample` becomes a
:class:`~perceptio_core.model.batching.TrainExample` with its image's teacher depth map (looked up by
``image_digest`` in the ``teacher_depth`` artifact, for L_rec), then the model's collate. A sample's
depth tokens must be N codes below K of the depth codec (the ``train_vqvae`` artifact), the one
source of K and N; the saved model records them (``config.json``, ``depth_codec``).

Entry points: :func:`finetune` (the Prefect task, in-process) and ``flows.train_script``
(``accelerate launch``); both run the same :class:`FinetuneTask` through the same loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from perceptio_core.atomic_io import file_digest
from perceptio_core.config import PerceptioConfig, to_dict
from perceptio_core.curation.sample import Sample
from perceptio_core.depth.codec import DepthCodec, DepthCodecSpec
from perceptio_core.model.batching import TrainExample, example_from_sample
from perceptio_core.device import ProgressFn
from perceptio_core.training.trainer import TrainTask, run_training
from perceptio_core.curation.wds_loader import MANIFEST, ShardIndex, ShardSampleDataset


class SampleToExample:
    """Picklable transform ``Sample -> TrainExample`` run in loader workers (every round of a
    multi-round sample, every mask in ``[SEG]`` order, a text-only sample without image:
    :func:`~perceptio_core.model.batching.example_from_sample`); the teacher depth
    maps (a ``teacher_depth`` artifact folder, opened lazily per process, memory-mapped) give
    ``depth_map``; without a folder, or for an image it lacks, ``depth_map`` is None (L_rec is 0
    for that sample). A sample whose depth tokens are not N codes in [0, K) of ``depth_spec``
    raises ``ValueError`` naming it (shards curated against another codebook)."""

    def __init__(self, depth_spec: DepthCodecSpec, depth_maps_dir: str | os.PathLike[str] | None = None) -> None:
        self.depth_spec = depth_spec
        self.depth_maps_dir = str(depth_maps_dir) if depth_maps_dir is not None else None
        self._maps: Any = None

    def _lookup(self, digest: str) -> np.ndarray | None:
        if self.depth_maps_dir is None:
            return None
        if self._maps is None:
            from perceptio_core.depth.maps import DepthMaps

            self._maps = DepthMaps(self.depth_maps_dir)
        return self._maps.get(digest) if digest in self._maps else None

    def __call__(self, sample: Sample) -> TrainExample:
        codes = sample.depth_tokens
        spec = self.depth_spec
        if codes is not None and (len(codes) != spec.num_tokens or min(codes) < 0 or max(codes) >= spec.codebook_size):
            raise ValueError(
                f"sample {sample.key}: {len(codes)} depth tokens in [{min(codes, default=0)}, {max(codes, default=0)}]; "
                f"the depth codec ({spec.source}) has N = {spec.num_tokens}, K = {spec.codebook_size}: the shards "
                "were curated against another codebook"
            )
        return example_from_sample(sample, depth_map=self._lookup(sample.image_digest))

    def __getstate__(self) -> dict[str, Any]:
        return {"depth_spec": self.depth_spec, "depth_maps_dir": self.depth_maps_dir, "_maps": None}


def _dir_digest(path: str | os.PathLike[str] | None, names: tuple[str, ...]) -> str | None:
    """sha256 (16 hex) of the named small files of a directory (its identity for resuming)."""
    if path is None:
        return None
    h = hashlib.sha256()
    for n in names:
        p = Path(path) / n
        if p.is_file():
            h.update(n.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _maps_digest(folder: str | os.PathLike[str] | None) -> str | None:
    """Identity of a teacher-map folder: names and sizes of its chunk files."""
    if folder is None:
        return None
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("maps-*")):
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()[:16]


class FinetuneTask(TrainTask):
    """The ``finetune`` stage as a :class:`~perceptio_core.training.trainer.TrainTask`.

    Args:
        cfg: the resolved config (``model``, ``loss``, ``finetune``).
        data_dir: curated shards (``manifest.parquet`` + shards).
        base_dir: a ``save_pretrained`` InternVL directory with its tokenizer (the ``base`` stage's
            ``<out>/model``); None: ``cfg.model.base`` (a released InternVL2.5) is loaded.
        depth_tokenizer: the frozen depth codec (an ``nn.Module``
            :class:`~perceptio_core.depth.codec.DepthCodec`), or the ``train_vqvae`` artifact
            directory (``DepthTokenizer.from_pretrained``): the source of K and N.
        depth_maps_dir: the ``teacher_depth`` artifact folder (teacher maps for L_rec), or None.
        sam2_checkpoint: a SAM2 checkpoint in Meta's format to start from in place of
            ``cfg.model.sam2_checkpoint`` (the ``fit_sam2`` artifact's ``model/sam2.pt``). It is loaded
            exactly as a released one, and its frozen parts are stored in the saved model
            (``sam2_frozen.safetensors``), so the model does not depend on the file afterwards.
    """

    name = "finetune"

    def __init__(
        self,
        cfg: PerceptioConfig,
        data_dir: str | os.PathLike[str],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        depth_tokenizer: DepthCodec | str | os.PathLike[str],
        depth_maps_dir: str | os.PathLike[str] | None = None,
        sam2_checkpoint: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sam2_checkpoint = str(sam2_checkpoint) if sam2_checkpoint is not None else None
        self.data_dir = Path(data_dir)
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.depth_tokenizer = depth_tokenizer
        # K, N without loading the weights (an artifact's config.json), for the data check
        self.depth_spec = (DepthCodecSpec.of(depth_tokenizer) if isinstance(depth_tokenizer, nn.Module)
                           else DepthCodecSpec.from_pretrained(depth_tokenizer))  # fmt: skip
        self.depth_maps_dir = depth_maps_dir
        self._index: ShardIndex | None = None
        self._collate: Any = None

    def load_depth_tokenizer(self) -> DepthCodec:
        """The depth codec: the one given, or the artifact's ``DepthTokenizer``."""
        if isinstance(self.depth_tokenizer, nn.Module):
            return self.depth_tokenizer
        from perceptio_core.depth.tokenizer import DepthTokenizer

        return DepthTokenizer.from_pretrained(str(self.depth_tokenizer))

    def build_model(self) -> nn.Module:
        from perceptio_core.model.internvl import load_internvl, load_tokenizer
        from perceptio_core.model.perceptio_model import PerceptioModel

        mc = self.cfg.model
        if self.sam2_checkpoint is not None:
            mc = dataclasses.replace(mc, sam2_checkpoint=self.sam2_checkpoint)
        tokenizer = base_model = None
        if self.base_dir is not None:
            tokenizer = load_tokenizer(mc.tokenizer or self.base_dir)
            base_model = load_internvl(self.base_dir, mc.dtype)
        elif mc.base is None:
            raise ValueError("finetune needs a base: pass base_dir (the base stage's model) or set model.base")
        model = PerceptioModel.build(
            mc, self.cfg.loss, self.load_depth_tokenizer(), tokenizer=tokenizer, base_model=base_model,
            seed=self.cfg.finetune.seed,
        )  # fmt: skip
        if self.sam2_checkpoint is not None:  # embedded, not referenced (see the class docstring)
            model.model_cfg = dataclasses.replace(model.model_cfg, sam2_checkpoint=None)
        self._collate = model.collator()
        return model

    def _shard_index(self) -> ShardIndex:
        if self._index is None:
            ft = self.cfg.finetune
            self._index = ShardIndex(self.data_dir, splits=ft.splits, tasks=ft.tasks)
            if len(self._index) == 0:
                raise ValueError(f"{self.data_dir}: no samples of splits {ft.splits} / tasks {ft.tasks}")
        return self._index

    def build_dataset(self) -> Dataset:
        return ShardSampleDataset(self._shard_index(), transform=SampleToExample(self.depth_spec, self.depth_maps_dir))

    def shard_sizes(self) -> list[int]:
        return self._shard_index().shard_sizes()

    def build_collate(self) -> Any:
        if self._collate is None:
            raise RuntimeError("build_model first")
        return self._collate

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model(batch)

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

    def fingerprint(self) -> dict[str, Any]:
        dt = self.depth_tokenizer
        return {
            "model": to_dict(self.cfg.model),
            "loss": to_dict(self.cfg.loss),
            "data": _dir_digest(self.data_dir, (MANIFEST,)),
            "base": _dir_digest(self.base_dir, ("config.json", "tokenizer.json")),
            "depth_tokenizer": type(dt).__name__ if isinstance(dt, nn.Module) else _dir_digest(dt, ("config.json",)),
            "depth_codec": self.depth_spec.to_dict(),
            "depth_maps": _maps_digest(self.depth_maps_dir),
            "sam2": file_digest(self.sam2_checkpoint)[:16] if self.sam2_checkpoint else None,
        }


def finetune(
    cfg: PerceptioConfig,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    depth_tokenizer: DepthCodec | str | os.PathLike[str],
    depth_maps_dir: str | os.PathLike[str] | None = None,
    sam2_checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: ProgressFn | None = None,
    parents: dict[str, str] | None = None,
    grad_dump_dir: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Fine-tune Perceptio (SPEC §4) on the shards in ``data_dir`` with ``cfg.finetune``, the depth
    codec ``depth_tokenizer`` (see :class:`FinetuneTask`) giving K and N.

    ``out_dir``: a durable scratch directory; a rerun with ``resume`` continues from its latest
    checkpoint (same data order, same final weights). The final model
    (``PerceptioModel.save_pretrained``: PEFT adapter, heads + token rows safetensors, config.json,
    tokenizer, plus ``meta.json``) is ``<out_dir>/model``; ``<out_dir>/history.jsonl``,
    ``plots/loss_<term>.png`` and ``metrics.json`` beside it. Returns the metrics
    (``loss_first``, ``loss_last``, ``<term>_first``, ``<term>_last`` for llm, seg_bce, seg_dice,
    marker, token, count, rec; throughput, data-wait share, peak memory).
    """
    task = FinetuneTask(
        cfg, data_dir, base_dir=base_dir, depth_tokenizer=depth_tokenizer, depth_maps_dir=depth_maps_dir,
        sam2_checkpoint=sam2_checkpoint,
    )
    return run_training(
        task, cfg.finetune, out_dir, device=cfg.run.device, resume=resume, progress=progress,
        parents=parents, grad_dump_dir=grad_dump_dir,
    )  # fmt: skip


__all__ = ["FinetuneTask", "SampleToExample", "finetune"]
