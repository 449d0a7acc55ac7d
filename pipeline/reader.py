"""Stream cached teacher logits by dataset index.

The training loop's dataset yields (x, y, index); `CachedTargets.rows(index)` returns the stored logits of
exactly those rows, whatever order the loader shuffled them into. Rows are never matched by position in a
batch or loader. The store is opened lazily on first use, so the object can be handed to forked DataLoader
workers (each opens its own handle).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import CorruptStoreError
from pipeline.store import LogitStore


class CachedTargets:
    """Raw teacher logits of one split of one store, read by row index."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str,
        fingerprint: str,
        num_rows: int,
        num_classes: int,
        view: int = 0,
    ) -> None:
        self.path = Path(path)
        self.split = split
        self._expect = {"fingerprint": fingerprint, "rows": {split: num_rows}, "num_classes": num_classes}
        self.view = view
        self._store: LogitStore | None = None
        self._pid: int | None = None
        self.check()

    def check(self) -> LogitStore:
        """Open (or reopen after a fork) and validate the store; raises a StoreError subclass if unusable."""
        if self._store is None or self._pid != os.getpid():
            self._store = LogitStore.open(self.path, **self._expect)  # type: ignore[arg-type]
            self._pid = os.getpid()
        return self._store

    @property
    def attrs(self) -> dict:
        return self.check().attrs

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def rows(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits (B, C) of rows `index` (any order, repeats allowed), as float32."""
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        arr = self.check().array(self.split)
        # zarr wraps negative indices, which would silently return another sample's row.
        if idx.size and (idx.min() < 0 or idx.max() >= arr.shape[0]):
            bad = idx[(idx < 0) | (idx >= arr.shape[0])]
            raise IndexError(
                f"{self.path}: indices {bad[:5].tolist()} are outside rows 0..{arr.shape[0] - 1} of '{self.split}'"
            )
        try:
            block = arr.oindex[uniq, self.view, :]
        except Exception as e:  # a damaged chunk fails inside the codec with many exception types
            raise CorruptStoreError(
                f"{self.path}: cannot read rows of '{self.split}' ({type(e).__name__}: {e}); a chunk is damaged, "
                f"re-export the store"
            ) from e
        if not np.isfinite(block).all():
            bad = uniq[~np.isfinite(block).all(axis=1)]
            raise CorruptStoreError(
                f"{self.path}: rows {bad[:5].tolist()} of '{self.split}' are not finite (damaged chunk?); "
                f"re-export the store"
            )
        return torch.from_numpy(block[inverse].astype(np.float32))
