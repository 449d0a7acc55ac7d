"""Stream cached teacher logits by dataset index.

The training loop's dataset yields (x, y, index); `CachedTargets.rows(index)` returns the stored logits of
exactly those rows, whatever order the loader shuffled them into. Rows are never matched by position in a
batch or loader. The store is opened lazily on first use, so the object can be handed to forked DataLoader
workers (each opens its own handle).

A split's arrays are read into memory whole on first use when they fit `max_memory_bytes`, and each batch
is then a numpy gather. Arrays over the budget are streamed by whole chunks through a bounded cache with
background prefetch (`pipeline.cache.stream.ChunkCache`: at most `cache_chunks` decoded chunks per array), since
a shuffled read through zarr decompresses a whole chunk per requested row (benchmarks/reader.py). Either
path returns exactly the rows asked for, in any order; the streaming path is fast only when the epoch
order follows chunk blocks: train with `pipeline.cache.stream.epoch_sampler(targets, rows, seed)` (a
`BlockShuffleSampler` when `targets.streaming`, else None for the loader's own shuffle). Damaged rows are
found while loading (or decoding a chunk) and refused only when a batch asks for them.

Multi-view stores (export `views` > 1) take a view per row: `rows(index, views)` and `target(index, views)`
return that view's teacher output and `aug(index, views)` the crop/flip the teacher saw, to be replayed on
the clean images with `pipeline.data.augment.apply_params`. Their test split has view 0 only. `target`
returns the teacher distribution p_T (a `Probs`) for every layout; sparse stores (layout "topk" or
"sampled") have no full logits, and their format (`pipeline.cache.formats`) rebuilds it from what they keep
(see `CachedTargets.teacher`, what training reads: a dense store's raw logits, softened in the loss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.formats import StoreFormat, format_of
from pipeline.cache.store import AUG_ARRAY, LogitStore, bad_rows, has_aug
from pipeline.cache.stream import DEFAULT_CAPACITY, DEFAULT_WINDOW, ChunkCache
from pipeline.core.errors import CorruptStoreError
from pipeline.data.augment import AugParams
from pipeline.losses import Probs, Teacher, soften

DEFAULT_MAX_MEMORY_BYTES = 4 * 2**30  # ImageNet-1k train logits in float16 (1.28M x 1000) take 2.4 GiB


@dataclass
class _Table:
    """An array of the store in memory: values (N, V, ...), bad (N, V) rows holding fill values, and for
    each row the index into `errors` of its chunk's read error (-1: the chunk was read)."""

    values: np.ndarray
    bad: np.ndarray
    unreadable: np.ndarray
    errors: list[str] = field(default_factory=list)


class CachedTargets:
    """The teacher outputs of one split of one store, read by row index: `rows` the stored values (raw
    logits of a dense store), `target` the distribution p_T, `len()` the split's rows."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str,
        fingerprint: str,
        num_rows: int,
        num_classes: int,
        view: int = 0,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        verify: bool = True,
        cache_chunks: int = DEFAULT_CAPACITY,
        prefetch_chunks: int = DEFAULT_WINDOW,
        opened: LogitStore | None = None,
    ) -> None:
        self.path = Path(path)
        self.split = split
        # verify: each array is checked against the marker's sha256 when first used (hashed while loading
        # into memory; read whole once before per-batch zarr reads); False skips that for trusted stores
        self._expect = {"fingerprint": fingerprint, "rows": {split: num_rows}, "num_classes": num_classes}
        self._expect["verify"] = verify
        self.view = view
        self.max_memory_bytes = max_memory_bytes  # 0: always stream
        self.cache_chunks, self.prefetch_chunks = cache_chunks, prefetch_chunks  # per streamed array
        self._store: LogitStore | None = None
        self._pid: int | None = None
        self._tables: dict[str, _Table | None] = {}  # array name -> in memory, or None when over budget
        self._caches: dict[str, ChunkCache] = {}  # array name -> chunk cache of a streamed array
        self._schedule: list[int] = []  # the current epoch's chunk order, for the caches' prefetch
        if opened is not None:  # the caller's open of this store (one open per store per run), checked alike
            self._adopt(opened)
        self.check()

    def _adopt(self, store: LogitStore) -> None:
        """Read through `store`, already opened by the caller, after checking it is this reader's store as
        `LogitStore.open` would: same path, dataset, rows of the split, classes and verification."""
        a, e = store.attrs, self._expect
        same = (
            store.path == self.path
            and a["dataset_fingerprint"] == e["fingerprint"]
            and a["splits"].get(self.split) == e["rows"][self.split]  # type: ignore[index]
            and a["num_classes"] == e["num_classes"]
            and (store.marker is not None) == e["verify"]
        )
        if not same:
            raise ValueError(f"{self.path}: the opened store given is not this reader's store (or its verify)")
        self._store, self._pid = store, os.getpid()

    def check(self) -> LogitStore:
        """Open (or reopen after a fork) and validate the store; raises a StoreError subclass if unusable."""
        if self._store is None or self._pid != os.getpid():
            self._store = LogitStore.open(self.path, **self._expect)  # type: ignore[arg-type]
            self._pid = os.getpid()
            self._caches = {}  # a forked child has the parent's caches but not their prefetch thread
        return self._store

    @property
    def attrs(self) -> dict:
        return self.check().attrs

    @property
    def format(self) -> StoreFormat:
        """The store's format (`pipeline.cache.formats`)."""
        return self.check().format

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None
        state["_tables"] = {}  # a spawned worker reloads; a forked one shares the parent's pages
        state["_caches"] = {}
        return state

    @property
    def streaming(self) -> bool:
        """True when the split's values exceed `max_memory_bytes` and are streamed by chunk (asking loads
        the split into memory when it fits, as the first read would)."""
        return self._table(self.split) is None

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk of the store (every array of a store is chunked alike)."""
        return int(self.check().array(self.split).chunks[0])

    def schedule(self, chunks: list[int]) -> None:
        """Tell every streamed array the order in which the coming batches first touch chunks (an epoch's
        `pipeline.cache.stream.block_shuffle` order), so background prefetch decodes them ahead."""
        self._schedule = list(chunks)
        for cache in self._caches.values():
            cache.schedule(self._schedule)

    def close(self) -> None:
        """Stop the prefetch threads and free the chunk caches (reading again restarts them)."""
        for cache in self._caches.values():
            cache.close()
        self._caches = {}

    def _cache(self, name: str) -> ChunkCache:
        if name not in self._caches:
            cache = ChunkCache(self.check().array(name), self.cache_chunks, self.prefetch_chunks)
            cache.schedule(self._schedule)
            self._caches[name] = cache
        return self._caches[name]

    def _table(self, name: str) -> _Table | None:
        """Array `name` in memory if it fits what is left of `max_memory_bytes`, with each (row, view)'s
        damage found while loading: non-finite or fill values, or the error of an unreadable chunk."""
        if name not in self._tables:
            arr = self.check().array(name)
            used = sum(t.values.nbytes for t in self._tables.values() if t is not None)
            if used + int(np.prod(arr.shape)) * arr.dtype.itemsize > self.max_memory_bytes:
                if self._expect["verify"]:
                    self.check().verify([name])
                self._tables[name] = None
                return None
            t = _Table(np.empty(arr.shape, arr.dtype), np.zeros(arr.shape[:2], bool), np.full(arr.shape[0], -1))
            step = arr.chunks[0]
            for start in range(0, arr.shape[0], step):
                stop = min(start + step, arr.shape[0])
                try:
                    block = np.asarray(arr[start:stop])
                except Exception as e:  # a damaged chunk fails inside the codec with many exception types
                    if self._expect["verify"]:  # the array cannot be verified: refuse it now
                        raise CorruptStoreError(
                            f"{self.path}: cannot read rows {start}..{stop - 1} of '{name}' ({type(e).__name__}: "
                            f"{e}); a chunk is damaged, re-export the store"
                        ) from e
                    t.errors.append(f"{type(e).__name__}: {e}")
                    t.unreadable[start:stop] = len(t.errors) - 1
                    continue
                self.check().hash_rows(name, start, np.asarray(block))  # raises after the last row if altered
                t.values[start:stop] = block
                t.bad[start:stop] = bad_rows(block.reshape(-1, *block.shape[2:])).reshape(block.shape[:2])
            self._tables[name] = t
        return self._tables[name]

    def _gather(self, name: str, idx: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Array `name` at (idx[b], views[b]) for every b: (B, ...) in the array's dtype."""
        arr = self.check().array(name)
        # zarr wraps negative indices, which would silently return another sample's row.
        if idx.size and (idx.min() < 0 or idx.max() >= arr.shape[0]):
            bad = idx[(idx < 0) | (idx >= arr.shape[0])]
            raise IndexError(
                f"{self.path}: indices {bad[:5].tolist()} are outside rows 0..{arr.shape[0] - 1} of '{self.split}'"
            )
        if views.size and (views.min() < 0 or views.max() >= arr.shape[1]):
            bad = np.unique(views[(views < 0) | (views >= arr.shape[1])])
            raise IndexError(f"{self.path}: views {bad[:5].tolist()} outside 0..{arr.shape[1] - 1} of '{self.split}'")
        table = self._table(name)
        if table is not None:
            unreadable = table.unreadable[idx]
            if (unreadable >= 0).any():
                raise CorruptStoreError(
                    f"{self.path}: cannot read rows of '{self.split}' ({table.errors[unreadable.max()]}); a chunk "
                    f"is damaged, re-export the store"
                )
            out, bad = table.values[idx, views], table.bad[idx, views]
        else:
            cache = self._cache(name)
            try:
                out = cache.take(idx)[np.arange(len(idx)), views]
            except Exception as e:  # a damaged chunk fails inside the codec with many exception types
                raise CorruptStoreError(
                    f"{self.path}: cannot read rows of '{self.split}' ({type(e).__name__}: {e}); a chunk is "
                    f"damaged, re-export the store"
                ) from e
            bad = bad_rows(out)
        if bad.any():
            raise CorruptStoreError(
                f"{self.path}: rows {np.unique(idx[bad])[:5].tolist()} of '{name}' are not finite "
                f"(damaged chunk?); re-export the store"
            )
        return out  # type: ignore[no-any-return]

    def _keys(
        self, index: torch.Tensor | np.ndarray, views: torch.Tensor | np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        if views is None:
            return idx, np.full(idx.shape, self.view, dtype=np.int64)
        v = np.asarray(views.cpu() if isinstance(views, torch.Tensor) else views, dtype=np.int64).reshape(-1)
        if v.shape != idx.shape:
            raise ValueError(f"{self.path}: {len(v)} views for {len(idx)} rows; give one view per row")
        return idx, v

    def rows(self, index: torch.Tensor | np.ndarray, views: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Stored values (B, S) of rows `index` (any order, repeats allowed), as float32: raw logits for a
        dense store. `views` (B,) picks each row's view; by default every row reads `self.view`."""
        idx, v = self._keys(index, views)
        return torch.from_numpy(self._gather(self.split, idx, v)).float()  # torch casts fp16 ~4x faster

    def teacher(
        self,
        index: torch.Tensor | np.ndarray,
        *,
        views: torch.Tensor | np.ndarray | None = None,
        temperature: float = 1.0,
    ) -> Teacher:
        """What the training losses take for rows `index`, in its cheapest form, as the store's format
        expands its rows (`pipeline.cache.formats`, `StoreFormat.expand`): raw logits (B, C) of a dense store
        (the loss softens them at its temperature, on the training device), else a `Probs` distribution p_T
        (B, C) rebuilt from the sparse layout:

        - topk, k kept logits z_K with kept mass m (teacher probability at T = 1): the kept classes get
          m * softmax(z_K / T), the other C - k classes share 1 - m equally (`topk_rest` "uniform"), or
          the kept classes get softmax(z_K / T) and the others 0 ("renorm"). With k = C this is softmax(z / T).
        - sampled, counts n_c of S classes drawn from p_1 (Anshumann et al. 2025): p = n / S, an unbiased
          estimate of p_1. It has no temperature: T != 1 raises ValueError.

        Training reads this (`pipeline.train.inputs`), so that a dense store's softmax runs where the loss
        runs; `target` is the same teacher as a distribution for every layout.
        """
        a = self.attrs
        fmt = format_of(a, self.path)  # from the attributes read once per batch
        idx, v = self._keys(index, views)
        values = torch.from_numpy(self._gather(self.split, idx, v))
        arrays = {name: torch.from_numpy(self._gather(f"{self.split}_{name}", idx, v)) for name in fmt.read}
        return fmt.expand(self.path, a, values, arrays, temperature)

    def target(
        self,
        index: torch.Tensor | np.ndarray,
        *,  # keyword-only: target(idx, 1.0) would read 1.0 as the views
        views: torch.Tensor | np.ndarray | None = None,
        temperature: float = 1.0,
    ) -> Probs:
        """The teacher distribution p_T (B, C) of rows `index` at `temperature`, for every layout: a dense
        store's softmax(z / T) in float32 (exactly what the losses compute from its raw logits), a sparse
        store's rebuilt distribution (see `teacher`). Every loss takes it as is; `rows` gives the raw values."""
        return Probs(soften(self.teacher(index, views=views, temperature=temperature), temperature))

    def __len__(self) -> int:
        """Rows of this split (the dataset's rows it was opened against)."""
        return int(self._expect["rows"][self.split])  # type: ignore[index]

    def boxes(self, index: torch.Tensor | np.ndarray, views: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        """(B, 5) int64 (i, j, h, w, flip) of each row's RandomResizedCrop view (stores of on-disk datasets
        exported with resized crops; `pipeline.data.files.box_view` replays one, view 0 is (0, 0, 0, 0, 0))."""
        augmentation = self.attrs["augmentation"]
        if not augmentation or len(augmentation.get("fields", ())) != 5 or not has_aug(self.attrs, self.split):
            raise ValueError(f"{self.path}: split '{self.split}' has no resized-crop boxes")
        idx, v = self._keys(index, views)
        return self._gather(f"{self.split}_{AUG_ARRAY}", idx, v).astype(np.int64)

    def aug(self, index: torch.Tensor | np.ndarray, views: torch.Tensor | np.ndarray | None = None) -> AugParams:
        """The crop/flip each row's view was exported with (`pipeline.data.augment.apply_params` replays it)."""
        a = self.attrs
        augmentation = a["augmentation"]
        if not augmentation:
            raise ValueError(f"{self.path}: this store has one clean view and no augmentation parameters")
        if not has_aug(a, self.split):
            raise ValueError(
                f"{self.path}: split '{self.split}' has only its clean view 0 and no augmentation parameters "
                f"(the export keeps augmented views for 'train' only)"
            )
        idx, v = self._keys(index, views)
        tlf = self._gather(f"{self.split}_{AUG_ARRAY}", idx, v).astype(np.int64)
        return AugParams.from_numpy(
            {"top": tlf[:, 0], "left": tlf[:, 1], "flip": tlf[:, 2].astype(bool)},
            pad=augmentation["pad"],
            size=augmentation["size"],
        )
