"""Stream the rows of a logit store that does not fit in memory: whole chunks, a bounded cache, prefetch.

A shuffled read through zarr decodes a whole chunk (`chunk_rows` rows, 1024 by default) for every row it
returns, so a uniformly shuffled epoch decodes each chunk about `chunk_rows` times. `ChunkCache` decodes a
chunk once, keeps at most `capacity` decoded chunks of one array (least recently used out first), and
decodes the chunks that an epoch's schedule says come next on one background thread. It returns exactly
the rows asked for, in the order asked, repeats allowed: the cache changes how often a chunk is decoded,
never what a read returns.

For the cache to hit, an epoch must visit the rows chunk block by chunk block. `block_shuffle` draws that
order (FFCV's "quasi-random" order), and `BlockShuffleSampler` feeds it to a DataLoader:

- Randomness: epoch e of seed s uses `numpy.random.default_rng([s, e])`. It permutes the chunks that hold
  any of the sampled rows, cuts that chunk order into blocks of `window` consecutive chunks, and permutes
  the rows of each block. Every row comes exactly once per epoch; rows of different blocks never swap, so a
  batch mixes rows of at most `window` chunks (two blocks at a block border), not of the whole split.
- Memory: the cache holds at most `capacity` decoded chunks per array (80 MiB for ImageNet-1k logits in
  float16 with the default 40: 1024 x 1000 x 2 bytes a chunk), whatever the number of rows. A read decodes
  the (at most `capacity`) chunks it misses in one zarr read, then copies each out, so it peaks at about
  3 x `capacity` chunks; a read that misses more chunks than that reads only its own rows, uncached (the
  zarr per-batch read), which is what a uniformly shuffled epoch over a large store gets.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import zarr
from torch.utils.data import Sampler

DEFAULT_WINDOW = 16  # chunks per block of the block-shuffled order
DEFAULT_CAPACITY = 40  # decoded chunks kept per array: the current block, the next one, and slack


class ChunkCache:
    """Rows of one zarr array served from whole decoded chunks (rows along the first axis)."""

    def __init__(self, arr: zarr.Array, capacity: int = DEFAULT_CAPACITY, prefetch: int = DEFAULT_WINDOW) -> None:
        if capacity < 1 or not 0 <= prefetch < capacity:
            raise ValueError(f"chunk cache: capacity {capacity} must be >= 1 and prefetch {prefetch} in 0..capacity-1")
        self.arr, self.capacity, self.prefetch = arr, capacity, prefetch
        self.step = int(arr.chunks[0])
        self.decoded = 0  # chunks decoded so far (a chunk evicted and asked again is decoded again)
        self._entries: OrderedDict[int, Future[np.ndarray]] = OrderedDict()  # LRU order, oldest first
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._schedule: list[int] = []
        self._position: dict[int, int] = {}  # chunk -> its first place in the schedule

    def __len__(self) -> int:
        """Decoded or decoding chunks held now (<= capacity)."""
        return len(self._entries)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """`arr[idx]` for in-range row indices `idx` (any order, repeats allowed), every trailing axis.

        Chunks held (or being prefetched) are served from the cache; the others are decoded whole, one
        concurrent zarr read, and cached. A read that misses more than `capacity` chunks (a uniform shuffle
        over a large store, not the block order) reads just its rows through zarr instead, uncached."""
        out = np.empty((len(idx), *self.arr.shape[1:]), dtype=self.arr.dtype)
        chunk_of = idx // self.step
        order = np.argsort(chunk_of, kind="stable")
        starts = np.flatnonzero(np.diff(chunk_of[order])) + 1
        groups = {int(chunk_of[g[0]]): g for g in (np.split(order, starts) if len(idx) else [])}
        missing = []
        for k, g in groups.items():
            block = self._held(k)
            if block is None:
                missing.append(k)
            else:
                out[g] = block[idx[g] - k * self.step]
        if len(missing) > self.capacity:  # a scattered read (not in block order): caching would only thrash
            sel = np.concatenate([groups[k] for k in missing])
            uniq, inverse = np.unique(idx[sel], return_inverse=True)
            out[sel] = np.asarray(self.arr.oindex[uniq])[inverse]  # zarr decodes each chunk, keeps its rows
            with self._lock:
                self.decoded += len(missing)
            missing = []
        for i in range(0, len(missing), self.capacity):
            some = missing[i : i + self.capacity]
            for k, block in zip(some, self._decode(some), strict=True):
                out[groups[k]] = block[idx[groups[k]] - k * self.step]
                self._keep(k, block)
        self._prefetch_after(max((self._position.get(k, -1) for k in groups), default=-1))
        return out

    def schedule(self, chunks: Sequence[int]) -> None:
        """The order in which the coming reads will first touch chunks: prefetch runs ahead along it."""
        self._schedule = [int(k) for k in chunks]
        self._position = {}
        for i, k in enumerate(self._schedule):
            self._position.setdefault(k, i)
        self._prefetch_after(-1)

    def close(self) -> None:
        """Stop the prefetch thread (after its current read) and drop every cached chunk."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._entries.clear()

    def _decode(self, chunks: list[int]) -> list[np.ndarray]:
        """Chunks `chunks` whole, in one read (zarr decodes them concurrently)."""
        n = self.arr.shape[0]
        if len(chunks) == 1:
            blocks = [np.asarray(self.arr[chunks[0] * self.step : (chunks[0] + 1) * self.step])]
        else:
            bounds = [(k * self.step, min((k + 1) * self.step, n)) for k in chunks]
            rows = np.concatenate([np.arange(a, b) for a, b in bounds])
            data = np.asarray(self.arr.oindex[rows])
            cuts = np.cumsum([b - a for a, b in bounds])[:-1]
            # Copies: a view would keep the whole group's buffer alive for as long as one chunk is cached.
            blocks = [b.copy() for b in np.split(data, cuts)]
        with self._lock:
            self.decoded += len(chunks)
        return blocks

    def _held(self, k: int) -> np.ndarray | None:
        """Chunk k if held (waiting for its prefetch to finish), else None; a failed prefetch is dropped,
        so the chunk is decoded again and its error raised by the caller's own read."""
        entry = self._entries.get(k)
        if entry is None:
            return None
        try:
            block = entry.result()
        except Exception:
            del self._entries[k]
            return None
        self._entries.move_to_end(k)
        return block

    def _keep(self, k: int, block: np.ndarray) -> None:
        if self._make_room(1):  # else every entry is still decoding: the chunk was served, not kept
            done: Future[np.ndarray] = Future()
            done.set_result(block)
            self._entries[k] = done

    def _make_room(self, n: int) -> bool:
        """Evict finished chunks, least recently used first, until `n` more fit; False if they cannot."""
        for k in [k for k, f in self._entries.items() if f.done()]:
            if len(self._entries) + n <= self.capacity:
                break
            del self._entries[k]
        return len(self._entries) + n <= self.capacity

    def _prefetch_after(self, position: int) -> None:
        """Decode the `prefetch` scheduled chunks after schedule place `position` in the background (one
        read for all of them), evicting the least recently used chunks to make room."""
        ahead = [k for k in self._schedule[position + 1 : position + 1 + self.prefetch] if k not in self._entries]
        if not ahead or not self._make_room(len(ahead)):
            return
        futures: list[Future[np.ndarray]] = [Future() for _ in ahead]
        for k, f in zip(ahead, futures, strict=True):
            self._entries[k] = f
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bancache-prefetch")
        self._pool.submit(self._fill, ahead, futures)

    def _fill(self, chunks: list[int], futures: list[Future[np.ndarray]]) -> None:
        try:
            blocks = self._decode(chunks)
        except Exception as e:  # raised again by the caller's own read of these chunks
            for f in futures:
                f.set_exception(e)
            return
        for f, block in zip(futures, blocks, strict=True):
            f.set_result(block)


def block_shuffle(
    rows: np.ndarray, chunk_rows: int, window: int, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, chunks): positions 0..len(rows)-1 in epoch `epoch`'s block-shuffled order, and the store
    chunks in the order that order first reaches them. `rows[i]` is position i's store row; see the module
    docstring for the randomness."""
    if chunk_rows < 1 or window < 1:
        raise ValueError(f"block shuffle: chunk_rows {chunk_rows} and window {window} must be >= 1")
    chunk_of = np.asarray(rows, dtype=np.int64).reshape(-1) // chunk_rows
    order = np.argsort(chunk_of, kind="stable")
    starts = np.flatnonzero(np.diff(chunk_of[order])) + 1
    groups = np.split(order, starts) if len(order) else []
    rng = np.random.default_rng([seed, epoch])
    chunk_order = rng.permutation(len(groups))
    blocks = [
        rng.permutation(np.concatenate([groups[g] for g in chunk_order[w : w + window]]))
        for w in range(0, len(groups), window)
    ]
    positions = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    chunks = np.asarray([chunk_of[groups[g][0]] for g in chunk_order], dtype=np.int64)
    return positions, chunks


class Schedulable(Protocol):
    def schedule(self, chunks: Sequence[int]) -> None: ...


class BlockShuffleSampler(Sampler[int]):
    """Dataset positions in block-shuffled order (`block_shuffle`), one epoch per iteration.

    Like DistributedSampler, the order depends on (seed, epoch): call `set_epoch(e)` before each epoch, or
    every epoch repeats epoch 0's order. With `targets` (a `CachedTargets` or `ChunkCache`), each iteration
    hands it the epoch's chunk schedule, so its prefetch runs ahead of the batches."""

    def __init__(
        self,
        rows: np.ndarray,
        chunk_rows: int,
        window: int = DEFAULT_WINDOW,
        seed: int = 0,
        targets: Schedulable | None = None,
    ) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.chunk_rows, self.window, self.seed, self.targets = chunk_rows, window, seed, targets
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        positions, chunks = block_shuffle(self.rows, self.chunk_rows, self.window, self.seed, self.epoch)
        if self.targets is not None:
            self.targets.schedule(chunks.tolist())
        return iter(positions.tolist())


def epoch_sampler(
    targets: Any, rows: np.ndarray, seed: int, window: int = DEFAULT_WINDOW
) -> BlockShuffleSampler | None:
    """The sampler a training loader needs for `targets`: a `BlockShuffleSampler` over dataset positions
    whose store rows are `rows` when `targets` streams its store (over the memory budget), else None
    (an in-memory store serves any order at the same speed: keep the loader's own shuffle)."""
    if targets is None or not targets.streaming:
        return None
    return BlockShuffleSampler(rows, targets.chunk_rows, window, seed, targets)
