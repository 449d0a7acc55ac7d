"""Prototypes of reader changes, measured by the benchmarks as extra arms against `pipeline.reader`.

None of this is used by the library. Each class keeps `CachedTargets`' contract (rows by dataset index, any
order, repeats allowed, float32 out, IndexError outside the split, CorruptStoreError on non-finite rows) so
it could replace it.

- `HandleTargets`: the current read path, but the zarr array handle is opened once per process instead of
  on every batch (`self.check().array(split)` is `group[split]`, which re-reads and parses the array's
  zarr.json from disk each call).
- `InMemoryTargets` (recommended): the split's view is read once, chunk by chunk, into an (N, C) tensor of
  the stored dtype, checked for finiteness once; a batch is then one `index_select` and a cast to float32
  (torch's float16 -> float32 cast is ~4x faster than numpy's `astype`). 2.4 GiB for ImageNet-1k
  (1.28M x 1000 float16), 10 MiB for CIFAR-100, 80 KiB for MNIST-1D.
- `ChunkCacheTargets` + `BlockShuffleSampler`: for stores larger than memory, a "quasi-random" order
  (FFCV's QUASI_RANDOM idea): chunks in random order, rows shuffled within windows of `window` chunks,
  and an LRU of decoded chunks, so every chunk is decoded once per epoch instead of once per row.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
from _benchlib import REPO  # noqa: F401  (puts the repository on sys.path)
from torch.utils.data import Sampler

from pipeline.errors import CorruptStoreError
from pipeline.reader import CachedTargets
from pipeline.store import iter_blocks


def _as_index(index: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)


def _check_bounds(t: CachedTargets, idx: np.ndarray, n: int) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)]
        raise IndexError(f"{t.path}: indices {bad[:5].tolist()} are outside rows 0..{n - 1} of '{t.split}'")


class HandleTargets(CachedTargets):
    """CachedTargets with the zarr array handle kept per process (one metadata read, not one per batch)."""

    _arr = None
    _arr_pid: int | None = None

    def _array(self):  # type: ignore[no-untyped-def]
        if self._arr is None or self._arr_pid != os.getpid():
            self._arr, self._arr_pid = self.check().array(self.split), os.getpid()
        return self._arr

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_arr"] = None
        return state

    def rows(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        idx = _as_index(index)
        uniq, inverse = np.unique(idx, return_inverse=True)
        arr = self._array()
        _check_bounds(self, idx, arr.shape[0])
        block = arr.oindex[uniq, self.view, :]
        if not np.isfinite(block).all():
            raise CorruptStoreError(f"{self.path}: non-finite rows in '{self.split}'; re-export the store")
        return torch.from_numpy(block[inverse].astype(np.float32))


class InMemoryTargets(CachedTargets):
    """Proposed `CachedTargets`: load the view once (<= `max_bytes`), then gather rows from memory."""

    def __init__(self, *args, max_bytes: int = 4 * 2**30, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.max_bytes = max_bytes
        self._table: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_table"] = None  # a spawned worker reloads; a forked one shares the parent's pages
        return state

    def load(self) -> torch.Tensor | None:
        """The (N, C) table of this split and view, or None when it exceeds `max_bytes`."""
        if self._table is None:
            arr = self.check().array(self.split)
            n, _, c = arr.shape
            if n * c * arr.dtype.itemsize > self.max_bytes:
                return None
            table = np.empty((n, c), dtype=arr.dtype)
            for start, block in iter_blocks(arr):
                view = block[:, self.view]
                if not np.isfinite(view).all():
                    bad = start + np.flatnonzero(~np.isfinite(view).all(axis=1))
                    raise CorruptStoreError(
                        f"{self.path}: rows {bad[:5].tolist()} of '{self.split}' are not finite (damaged chunk?); "
                        f"re-export the store"
                    )
                table[start : start + len(block)] = view
            self._table = torch.from_numpy(table)
        return self._table

    def rows(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        table = self.load()
        if table is None:
            return super().rows(index)
        idx = _as_index(index)
        _check_bounds(self, idx, len(table))
        return table.index_select(0, torch.from_numpy(idx)).float()


class ChunkCacheTargets(CachedTargets):
    """Rows served from an LRU of whole decoded chunks (`capacity` chunks of the split's view)."""

    def __init__(self, *args, capacity: int = 16, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.capacity = capacity
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decoded = 0  # chunks decoded so far (for the benchmark's report)
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"] = OrderedDict()
        return state

    def _chunk(self, arr, k: int, step: int) -> np.ndarray:  # type: ignore[no-untyped-def]
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        block = arr[k * step : (k + 1) * step, self.view]
        if not np.isfinite(block).all():
            raise CorruptStoreError(f"{self.path}: non-finite rows in chunk {k} of '{self.split}'; re-export")
        self._cache[k] = block
        self.decoded += 1
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return block

    def rows(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        idx = _as_index(index)
        arr = self.check().array(self.split)
        _check_bounds(self, idx, arr.shape[0])
        step = arr.chunks[0]
        out = np.empty((len(idx), arr.shape[2]), dtype=np.float32)
        chunk_of = idx // step
        for k in np.unique(chunk_of):
            sel = chunk_of == k
            out[sel] = self._chunk(arr, int(k), step)[idx[sel] - k * step]
        return torch.from_numpy(out)


class BlockShuffleSampler(Sampler[int]):
    """Dataset positions in quasi-random order: store chunks in random order, positions shuffled within
    windows of `window` consecutive (in that random order) chunks. `rows[i]` is position i's store row."""

    def __init__(self, rows: np.ndarray, chunk_rows: int, window: int, generator: torch.Generator) -> None:
        self.rows = np.asarray(rows)
        self.chunk_rows, self.window, self.generator = chunk_rows, window, generator
        chunk_of = self.rows // chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        self.groups = np.split(order, bounds)  # positions of each chunk that has any

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        rng = np.random.default_rng(seed)
        chunks = rng.permutation(len(self.groups))
        for w in range(0, len(chunks), self.window):
            pos = np.concatenate([self.groups[c] for c in chunks[w : w + self.window]])
            yield from rng.permutation(pos).tolist()


class _MemoGroup:
    """A zarr.Group whose `group[name]` opens each array once. In zarr 3 every `group[name]` re-reads and
    parses that array's zarr.json (a synchronous round trip through zarr's event-loop thread, ~0.5-1 ms)."""

    def __init__(self, group) -> None:  # type: ignore[no-untyped-def]
        self._group, self._arrays = group, {}

    def __getitem__(self, name: str):  # type: ignore[no-untyped-def]
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._group, name)


@contextlib.contextmanager
def cached_array_handles() -> Iterator[None]:
    """Within the block, every LogitStore keeps its zarr array handles (prototype of a memo in
    `LogitStore.array`, used by write, seal and the reader)."""
    from pipeline.store import LogitStore

    orig = LogitStore.__init__

    def init(self, path, group) -> None:  # type: ignore[no-untyped-def]
        orig(self, path, _MemoGroup(group))

    LogitStore.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        LogitStore.__init__ = orig  # type: ignore[method-assign]
