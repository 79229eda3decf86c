"""The order in which the training loop visits a map-style dataset (SPEC §4): a pure function of
``(seed, epoch)``, so any process can recompute it and a resumed run skips the first batches of
the epoch it resumes in (``accelerator.skip_first_batches``) without reading them. With
``window_shards = w > 0`` it shuffles like webdataset's shard shuffle + buffer instead: shards in a
random order, and samples shuffled within consecutive groups of w shards, so a worker reads at most
w shards at a time (locality on network storage) at the price of a less global shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Indices 0..n-1 in the order of epoch ``e``, a pure function of ``(seed, e)``.

    ``set_epoch(e)`` picks the epoch (the trainer, through accelerate's ``DataLoaderShard.set_epoch``).
    ``shard_sizes`` + ``window_shards > 0``: shard-local shuffling (see the module docstring).
    ``shuffle=False``: the manifest order every epoch.

    Deliberately has no ``generator`` attribute: accelerate would otherwise seed one from the global
    torch RNG, and the order would no longer be a function of (seed, epoch) alone.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        shuffle: bool = True,
        shard_sizes: Sequence[int] | None = None,
        window_shards: int = 0,
    ) -> None:
        if shard_sizes is not None and sum(shard_sizes) != n:
            raise ValueError(f"shard_sizes sum to {sum(shard_sizes)}, not n = {n}")
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.shard_sizes = list(shard_sizes) if shard_sizes is not None else None
        self.window_shards = int(window_shards)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The index order of ``epoch`` (default: the current one), int64 [n]."""
        e = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, e])
        if self.window_shards <= 0 or self.shard_sizes is None:
            return rng.permutation(self.n).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)
        shard_order = rng.permutation(len(self.shard_sizes))
        out = []
        for g in range(0, len(shard_order), self.window_shards):
            group = shard_order[g : g + self.window_shards]
            idx = np.concatenate(
                [np.arange(starts[s], starts[s] + self.shard_sizes[s], dtype=np.int64) for s in group]
            )
            out.append(rng.permutation(idx))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())
