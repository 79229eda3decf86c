"""Map-style reading of the curated shards by manifest offset, and the (seed, epoch) sample order
over them."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from perceptio_core.atomic_io import bytes_digest

from perceptio_core.curation.sample import Sample, make_key
from perceptio_core.curation.shards import read_shards, shard_paths, write_shards
from perceptio_core.curation.wds_loader import ShardIndex, ShardSampleDataset
from perceptio_core.training.sampler import EpochSampler


def _samples(n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (6 + i % 5, 7, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG" if i % 2 else "JPEG")
        img = buf.getvalue()
        yield Sample(
            key=make_key("s", i), source="refcoco", split="val" if i % 5 == 4 else "train",
            task="refer_seg" if i % 3 else "vqa_mc", image_digest=bytes_digest(img), image=img,
            prompt=f"p{i}", target=f"t{i}", answer=f"a{i}",
            depth_tokens=list(range(i % 4)) or None, meta={"i": i},
        )  # fmt: skip


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    shards = write_shards(_samples(23), d, max_samples=5)  # 5 shards: 5, 5, 5, 5, 3
    return d, shards


def _key(s: Sample) -> int:
    return int(s.meta["i"])


def test_index_reads_every_sample_like_webdataset(shard_dir):
    d, shards = shard_dir
    index = ShardIndex(d, splits=None)
    ds = ShardSampleDataset(index)
    assert len(ds) == 23 and len(index.shard_names) == 5 and index.shard_sizes() == [5, 5, 5, 5, 3]
    streamed = list(read_shards(shard_paths(d, shards)))
    # random access, in a scrambled order, gives exactly what webdataset streams
    for i in [22, 0, 7, 3, 15, 15, 9]:
        assert ds[i] == streamed[i]


def test_split_and_task_filters(shard_dir):
    d, _ = shard_dir
    train = ShardIndex(d, splits=["train"])
    ds = ShardSampleDataset(train)
    got = {_key(ds[i]) for i in range(len(ds))}
    assert got == {i for i in range(23) if i % 5 != 4}
    vqa = ShardSampleDataset(ShardIndex(d, splits=["train", "val"], tasks=["vqa_mc"]))
    assert {_key(vqa[i]) for i in range(len(vqa))} == {i for i in range(23) if i % 3 == 0}


def test_manifest_that_lies_is_caught(shard_dir, tmp_path):
    d, _ = shard_dir
    index = ShardIndex(d, splits=None)
    index.offset = index.offset.copy()
    index.offset[1] = index.offset[2]  # sample 1's row now points at sample 2's bytes
    with pytest.raises(ValueError, match="manifest says"):
        ShardSampleDataset(index)[1]


def test_epoch_order_is_a_function_of_seed_and_epoch():
    s = EpochSampler(50, seed=3)
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    assert sorted(a) == list(range(50)) and sorted(b) == list(range(50)) and a != b
    t = EpochSampler(50, seed=3)
    t.set_epoch(1)
    assert list(t) == b  # a fresh sampler (a resumed run) recomputes the same order
    assert list(EpochSampler(50, seed=4)) != list(EpochSampler(50, seed=3))
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_shard_window_shuffle_stays_local():
    sizes = [4, 4, 4, 4, 3, 5, 4, 4]
    n = sum(sizes)
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    s = EpochSampler(n, seed=1, shard_sizes=sizes, window_shards=2)
    for epoch in range(3):
        order = s.order(epoch)
        assert sorted(order.tolist()) == list(range(n))
        pos = np.empty(n, dtype=int)
        pos[order] = np.arange(n)
        # a shard's samples all lie within one group of 2 shards: at most 5 + 4 positions apart
        for k in range(len(sizes)):
            p = pos[shard_of == k]
            assert p.max() - p.min() < 9
    assert s.order(0).tolist() != s.order(1).tolist()
    spread = [np.ptp(np.flatnonzero(np.isin(EpochSampler(n, seed=1).order(0), np.flatnonzero(shard_of == k))))
              for k in range(len(sizes))]
    assert max(spread) >= 9  # the global permutation does not have that locality
    assert not hasattr(s, "generator")  # accelerate would seed it from the global RNG


def test_workers_and_pickling_give_the_same_items(shard_dir):
    d, _ = shard_dir
    ds = ShardSampleDataset(ShardIndex(d, splits=None), transform=_key)
    ds[0]  # open a file in this process: workers must not share its offset
    again = pickle.loads(pickle.dumps(ds))
    assert [again[i] for i in range(23)] == list(range(23))
    sampler = EpochSampler(len(ds), seed=0)
    sampler.set_epoch(2)
    dl = DataLoader(ds, sampler=sampler, batch_size=4, num_workers=2, collate_fn=list)
    flat = [k for batch in dl for k in batch]
    assert flat == sampler.order(2).tolist()
