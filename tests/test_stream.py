"""pipeline.cache.stream: the chunk cache returns exactly the rows asked for within its bound, the block-shuffled
epoch order visits every row once, and CachedTargets streams a store over its memory budget through it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from pipeline.cache.reader import CachedTargets
from pipeline.cache.stream import BlockShuffleSampler, ChunkCache, block_shuffle, epoch_sampler
from pipeline.core.errors import CorruptStoreError
from pipeline.data.prepared import IndexedDataset
from tests.test_reader import FP, table, write_store

N, V, C, CHUNK = 103, 2, 3, 8  # 13 chunks, the last one partial (rows 96-102)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("stream") / "gen-0"
    data = table(N, V, C)
    write_store(path, data, chunk_rows=CHUNK)
    return path, data


def _array(path: Path) -> zarr.Array:
    return zarr.open_array(str(path / "train"), mode="r")


class _Counting:
    """A zarr array stand-in that records which chunks are read (whole chunks: slices or row lists)."""

    def __init__(self, arr: zarr.Array) -> None:
        self.arr, self.shape, self.dtype, self.chunks = arr, arr.shape, arr.dtype, arr.chunks
        self.reads: list[int] = []
        self.oindex = self

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        rows = np.arange(self.shape[0])[key]
        self.reads += np.unique(rows // self.chunks[0]).tolist()
        return self.arr.oindex[rows] if isinstance(key, np.ndarray) else self.arr[key]


# -- the chunk cache ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(0, N - 1), max_size=40), min_size=1, max_size=6),
    capacity=st.integers(1, 5),
    prefetch=st.integers(0, 4),
)
def test_cache_returns_exactly_the_rows_asked_for_within_its_bound(stored, batches, capacity, prefetch) -> None:
    path, data = stored
    prefetch = min(prefetch, capacity - 1)
    cache = ChunkCache(_array(path), capacity=capacity, prefetch=prefetch)
    cache.schedule(np.random.default_rng(len(batches)).permutation(13).tolist())
    for batch in batches:
        idx = np.asarray(batch, dtype=np.int64)
        np.testing.assert_array_equal(cache.take(idx), data[idx])  # any order, repeats, across chunk borders
        assert len(cache) <= capacity
    cache.close()


def test_cache_decodes_each_chunk_once_while_it_is_held(stored) -> None:
    path, data = stored
    arr = _Counting(_array(path))
    cache = ChunkCache(arr, capacity=2, prefetch=0)  # type: ignore[arg-type]
    for idx in ([0, 9, 1, 10], [2, 15, 8], [3, 4]):  # chunks 0 and 1 only
        cache.take(np.asarray(idx))
    assert sorted(arr.reads) == [0, 1] and cache.decoded == 2
    cache.take(np.asarray([20]))  # chunk 2 evicts chunk 1, the least recently used (the last batch read 0)
    np.testing.assert_array_equal(cache.take(np.asarray([0, 20])), data[[0, 20]])  # both held
    assert arr.reads == [0, 1, 2] and len(cache) == 2
    np.testing.assert_array_equal(cache.take(np.asarray([9])), data[[9]])  # chunk 1 again: decoded again
    assert arr.reads == [0, 1, 2, 1] and len(cache) == 2


def test_prefetch_decodes_the_scheduled_chunks_ahead(stored) -> None:
    path, data = stored
    arr = _Counting(_array(path))
    cache = ChunkCache(arr, capacity=6, prefetch=3)  # type: ignore[arg-type]
    cache.schedule([5, 2, 7, 0, 11])
    deadline = time.monotonic() + 60
    while cache.decoded < 3 and time.monotonic() < deadline:  # the background thread's work, not a timing
        time.sleep(0.01)
    assert sorted(arr.reads) == [2, 5, 7]  # the first three of the schedule, before any read
    np.testing.assert_array_equal(cache.take(np.asarray([41, 16])), data[[41, 16]])  # chunks 5 and 2: hits
    assert sorted(arr.reads[:3]) == [2, 5, 7] and 5 in arr.reads[:3]
    assert arr.reads.count(5) == 1 and arr.reads.count(2) == 1
    cache.close()


def test_a_failed_prefetch_is_refused_only_when_its_rows_are_asked_for(stored, tmp_path: Path) -> None:
    _, data = stored
    path = tmp_path / "gen-0"
    write_store(path, data, chunk_rows=CHUNK)
    chunk = path / "train" / "c" / "3" / "0" / "0"  # rows 24-31
    chunk.write_bytes(b"not zstd at all")
    cache = ChunkCache(_array(path), capacity=4, prefetch=2)
    cache.schedule([3, 4])
    np.testing.assert_array_equal(cache.take(np.asarray([33, 0])), data[[33, 0]])  # other chunks read fine
    with pytest.raises(Exception):  # noqa: B017  (the codec's own error; CachedTargets names it, below)
        cache.take(np.asarray([25]))
    cache.close()
    kw = {"max_memory_bytes": 0, "cache_chunks": 4, "prefetch_chunks": 2}
    t = CachedTargets(path, "train", FP, N, C, verify=False, **kw)  # trusted: the streamed read itself refuses
    with pytest.raises(CorruptStoreError, match="cannot read rows of 'train'.*re-export"):
        t.rows([5, 25])
    verified = CachedTargets(path, "train", FP, N, C, **kw)  # the default hashes the array before streaming it
    with pytest.raises(CorruptStoreError, match="'train' has an unreadable chunk.*re-export"):
        verified.rows([5])


def test_cache_refuses_a_prefetch_as_large_as_itself(stored) -> None:
    with pytest.raises(ValueError, match="prefetch 4 in 0..capacity-1"):
        ChunkCache(_array(stored[0]), capacity=4, prefetch=4)


# -- the block-shuffled epoch order ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.integers(0, 500), max_size=120, unique=True),
    chunk_rows=st.integers(1, 40),
    window=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 5),
)
def test_block_shuffle_visits_every_position_once_and_keeps_blocks_together(
    rows, chunk_rows, window, seed, epoch
) -> None:
    rows_a = np.asarray(rows, dtype=np.int64)
    positions, chunks = block_shuffle(rows_a, chunk_rows, window, seed, epoch)
    assert sorted(positions.tolist()) == list(range(len(rows)))  # each row exactly once per epoch
    assert sorted(chunks.tolist()) == sorted(set((rows_a // chunk_rows).tolist()))  # each chunk once
    # Walking the order block by block: the positions of block b are exactly the rows of its chunks.
    block_of = {int(k): i // window for i, k in enumerate(chunks)}
    seen_blocks = [block_of[int(r) // chunk_rows] for r in rows_a[positions]]
    assert seen_blocks == sorted(seen_blocks)
    again, _ = block_shuffle(rows_a, chunk_rows, window, seed, epoch)
    np.testing.assert_array_equal(positions, again)  # seeded


def test_block_shuffle_differs_by_epoch_and_seed_and_shuffles_within_blocks() -> None:
    rows = np.arange(4000)
    base, chunks = block_shuffle(rows, 100, 4, seed=1, epoch=0)
    assert not np.array_equal(base, block_shuffle(rows, 100, 4, seed=1, epoch=1)[0])
    assert not np.array_equal(base, block_shuffle(rows, 100, 4, seed=2, epoch=0)[0])
    first_block = base[:400]  # the rows of the first four chunks of the order, shuffled among them
    assert set((first_block // 100).tolist()) == set(chunks[:4].tolist())
    assert len(set((first_block[:50] // 100).tolist())) == 4  # mixed across the block's chunks
    assert not np.array_equal(chunks, np.sort(chunks))


def test_sampler_feeds_a_loader_every_row_once_per_epoch_and_schedules_the_targets(stored) -> None:
    path, data = stored
    t = CachedTargets(path, "train", FP, N, C, max_memory_bytes=0, cache_chunks=6, prefetch_chunks=2)
    assert t.streaming and t.chunk_rows == CHUNK
    fit = np.sort(np.random.default_rng(0).choice(N, 70, replace=False))  # a fit subset: positions != rows
    sampler = epoch_sampler(t, fit, seed=3, window=2)
    assert isinstance(sampler, BlockShuffleSampler)
    x = np.zeros((N, 1), np.float32)
    loader = DataLoader(IndexedDataset(x, np.zeros(N, np.int64), fit), batch_size=16, sampler=sampler)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for _, _, index in loader:
            np.testing.assert_array_equal(t.rows(index).numpy(), data[index.numpy(), 0])
            seen += index.tolist()
        assert sorted(seen) == fit.tolist()  # every fit row once per epoch
        orders.append(seen)
    assert orders[0] != orders[1]
    # Each chunk is decoded about once per epoch (a uniform shuffle decodes ~3x as many here: 82 for 26).
    assert t._caches["train"].decoded <= 2 * (len(set((fit // CHUNK).tolist())) + 1)
    t.close()


# -- CachedTargets over its memory budget ------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, N * V * C * 4 - 1])
def test_a_store_over_the_budget_streams_the_same_rows_as_one_in_memory(stored, budget: int) -> None:
    path, data = stored
    mem = CachedTargets(path, "train", FP, N, C)
    small = CachedTargets(path, "train", FP, N, C, max_memory_bytes=budget, cache_chunks=3, prefetch_chunks=1)
    assert not mem.streaming and small.streaming
    rng = np.random.default_rng(7)
    for _ in range(5):
        idx = rng.integers(0, N, 50)
        views = rng.integers(0, V, 50)
        assert torch.equal(small.rows(idx, views), mem.rows(idx, views))
        np.testing.assert_array_equal(small.rows(idx, views).numpy(), data[idx, views])
        assert len(small._caches["train"]) <= 3
    assert "train" not in mem._caches and small._tables["train"] is None
    assert epoch_sampler(mem, np.arange(N), seed=0) is None  # in memory: the loader's own shuffle
    small.close()
