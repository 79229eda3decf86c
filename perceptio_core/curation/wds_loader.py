"""Training data from the curated WebDataset shards, in an order fixed by (seed, epoch) (SPEC §4, §5;
ARCHITECTURE "curate" -> "finetune").

Design (why not a streaming ``wds.WebDataset(...).shuffle(buffer)`` pipeline): the trainer must
resume a killed run at the very batch it stopped at, with the same data order, so that the final
weights equal an uninterrupted run's (tests/core/test_trainer.py checks it). A streaming pipeline's
order depends on the shuffle buffer's state, the worker count and how far each worker had read;
reproducing it after a restart means re-reading everything before the stop. Curation already
writes, for every sample, its shard and byte offset (``manifest.parquet``, ``shards.py``), so here
the shards are read as a **map-style dataset**:

* :class:`ShardIndex`: the manifest's (key, shard, offset) columns for the selected split / tasks,
  as arrays: memory is O(number of samples) for the index only (about 20 bytes + the key per
  sample), never the images.
* :class:`ShardSampleDataset`: ``ds[i]`` seeks to the sample's offset in its ``.tar`` and reads its
  two members (``<key>.json`` + the image), exactly the bytes ``webdataset`` would yield, through
  :func:`perceptio_core.curation.sample.from_wds`; an optional picklable ``transform`` runs in the loader
  worker (e.g. Sample -> ``TrainExample`` with its teacher depth map). Each worker keeps a few shard
  files open (LRU), so reads are one seek + one small read.
* The order is :class:`perceptio_core.training.sampler.EpochSampler`'s, a function of ``(seed,
  epoch)`` alone, so a resumed run skips the batches it had done without reading them.
* Several processes: ``accelerator.prepare`` wraps the batch sampler in ``BatchSamplerShard``:
  process r takes global batches r, r + n, r + 2n, ... of the same (seed, epoch) order (the role
  ``wds.split_by_node`` plays in a streaming pipeline); loader workers (``num_workers``) each
  build whole batches, as ``torch.utils.data`` does (the role of ``wds.split_by_worker``).
  Epoch-based (not resampled): every epoch visits each sample once; the tail that does not fill a
  batch on every process is dropped (drop_last), and the next epoch draws a fresh permutation.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from perceptio_core.curation.sample import IMAGE_EXTS, Sample, from_wds

MANIFEST = "manifest.parquet"


class ShardIndex:
    """Where each selected sample lies: ``shard_paths[shard[i]]`` at byte ``offset[i]``, key ``key(i)``.

    Args:
        data_dir: a curated shard directory (``manifest.parquet`` + ``{prefix}-%06d.tar``).
        splits: keep rows whose ``split`` is in this list (None: all).
        tasks: keep rows whose ``task`` is in this list (None: all).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        splits: Sequence[str] | None = ("train",),
        tasks: Sequence[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        manifest = self.data_dir / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {self.data_dir}: not a complete curated shard set")
        table = pq.read_table(manifest, columns=["key", "shard", "offset", "split", "task"])
        keep = None
        if splits is not None:
            keep = pc.is_in(table["split"], value_set=_pa_strings(splits))
        if tasks is not None:
            t = pc.is_in(table["task"], value_set=_pa_strings(tasks))
            keep = t if keep is None else pc.and_(keep, t)
        if keep is not None:
            table = table.filter(keep)
        shard_names = table["shard"].to_pylist()
        self.shard_names: list[str] = sorted(set(shard_names))
        pos = {n: i for i, n in enumerate(self.shard_names)}
        self.shard = np.fromiter((pos[n] for n in shard_names), dtype=np.int32, count=len(shard_names))
        self.offset = table["offset"].to_numpy().astype(np.int64)
        self._keys = table["key"].combine_chunks()
        missing = [n for n in self.shard_names if not (self.data_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"manifest of {self.data_dir} names missing shards: {missing[:3]}")

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def key(self, i: int) -> str:
        return str(self._keys[int(i)].as_py())

    @property
    def shard_paths(self) -> list[str]:
        return [str(self.data_dir / n) for n in self.shard_names]

    def shard_sizes(self) -> list[int]:
        """Number of selected samples in each shard (rows of a shard are contiguous in the manifest)."""
        return np.bincount(self.shard, minlength=len(self.shard_names)).astype(int).tolist()


def _pa_strings(values: Sequence[str]) -> Any:
    import pyarrow as pa

    return pa.array([str(v) for v in values], type=pa.string())


def read_sample_at(f: Any, offset: int, expect_key: str | None = None) -> Sample:
    """The sample whose first tar member header starts at byte ``offset`` of the open shard ``f``.

    Reads members of the same key until its ``json`` and image are both in hand (the two members
    ``sample.to_wds`` writes). Raises ``ValueError`` if the key differs from ``expect_key`` (a
    manifest that does not match its shards).
    """
    f.seek(offset)
    item: dict[str, Any] = {}
    key = None
    with tarfile.open(fileobj=f, mode="r:") as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            k, _, ext = ti.name.partition(".")
            if key is None:
                key = k
            elif k != key:
                break
            data = tf.extractfile(ti)
            item[ext] = data.read() if data is not None else b""
            if "json" in item and any(e in item for e in (*IMAGE_EXTS, "jpeg")):
                break
    if key is None:
        raise ValueError(f"no tar member at offset {offset}")
    if expect_key is not None and key != expect_key:
        raise ValueError(f"shard holds sample {key!r} at offset {offset}, the manifest says {expect_key!r}")
    item["__key__"] = key
    return from_wds(item)


class ShardSampleDataset(Dataset):
    """Map-style dataset over :class:`ShardIndex`: ``ds[i]`` -> ``transform(Sample)`` (or the Sample).

    Picklable (loader workers get a copy); file handles are opened lazily in each process and at
    most ``max_open`` stay open.
    """

    def __init__(
        self, index: ShardIndex, transform: Callable[[Sample], Any] | None = None, max_open: int = 8
    ) -> None:
        self.index = index
        self.transform = transform
        self.max_open = max_open
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, shard: int) -> Any:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._files = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = open(self.index.shard_paths[shard], "rb", buffering=0)
            f = io.BufferedReader(f, buffer_size=1 << 16)
            self._files[shard] = f
            while len(self._files) > self.max_open:
                _, old = self._files.popitem(last=False)
                old.close()
        else:
            self._files.move_to_end(shard)
        return f

    def sample(self, i: int) -> Sample:
        """The raw :class:`Sample` at position ``i`` (no transform)."""
        idx = self.index
        return read_sample_at(self._file(int(idx.shard[i])), int(idx.offset[i]), idx.key(i))

    def __getitem__(self, i: int) -> Any:
        s = self.sample(int(i))
        return self.transform(s) if self.transform is not None else s

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        return state

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


__all__ = ["MANIFEST", "ShardIndex", "ShardSampleDataset", "read_sample_at"]
