"""The logit store: a zarr v3 group of raw teacher logits, one array per split, and a completion marker.

Layout of `cache/gen-K/` (readable with plain zarr):
    zarr.json            group metadata; attributes = provenance (see `REQUIRED_ATTRS`)
    train/               array (N, V, C), dtype float16 or float32, chunks (chunk_rows, V, C)
    test/                array (M, V, C), same layout
    COMPLETE.json        written last, after every row was checked: rows per split and sha256 of content

Logits are stored raw (T = 1); softened targets are computed at read time with any temperature. The fill
value is NaN, so a chunk that was never written reads back as NaN and fails validation instead of passing
as zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import (
    CorruptStoreError,
    ForeignStoreError,
    IncompleteStoreError,
    StoreError,
    StoreNotFoundError,
)
from pipeline.io import write_json

FORMAT = "bancache-logits-v1"
MARKER = "COMPLETE.json"
REQUIRED_ATTRS = (
    "format", "generation", "arch", "seed", "temperature", "checkpoint_sha256", "dataset_fingerprint",
    "class_names", "dtype", "views", "splits",
)  # fmt: skip


class LogitStore:
    """One generation's cached logits. Create with `create`, fill with `write`, finish with `seal`;
    read with `open`, which refuses incomplete, foreign or malformed stores."""

    def __init__(self, path: str | os.PathLike[str], group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group

    # -- writing ---------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        rows: dict[str, int],
        num_classes: int,
        views: int,
        dtype: str,
        chunk_rows: int,
        attributes: dict[str, Any],
    ) -> LogitStore:
        """Create an empty store (no marker) with one (rows, views, num_classes) array per split."""
        attrs = {
            **attributes, "format": FORMAT, "dtype": dtype, "views": views, "num_classes": num_classes,
            "splits": dict(rows), "chunk_rows": chunk_rows,
        }  # fmt: skip
        group = zarr.create_group(str(path), overwrite=True, attributes=attrs)
        for split, n in rows.items():
            group.create_array(
                split, shape=(n, views, num_classes), chunks=(min(chunk_rows, max(n, 1)), views, num_classes),
                dtype=dtype, fill_value=np.nan,
            )  # fmt: skip
        return cls(path, group)

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> LogitStore:
        """Open a store being written (no marker yet) to add rows: other ranks of a distributed export."""
        return cls(path, zarr.open_group(str(path), mode="r+"))

    def write(self, split: str, start: int, logits: np.ndarray) -> None:
        """Write rows [start, start + len(logits)) of `split`; `logits` is (B, V, C) or (B, C) for V = 1."""
        arr = self.group[split]
        if logits.ndim == 2 and arr.shape[1] == 1:
            logits = logits[:, None, :]
        # zarr broadcasts and truncates mismatched values silently, so check the shape here.
        want = (len(logits), *arr.shape[1:])
        if logits.shape != want or start < 0 or start + len(logits) > arr.shape[0]:
            raise ValueError(
                f"{self.path}: cannot write logits of shape {logits.shape} at row {start} of '{split}' "
                f"(shape {tuple(arr.shape)}); expected {want} within rows 0..{arr.shape[0]}"
            )
        arr[start : start + len(logits)] = logits.astype(arr.dtype, copy=False)

    def seal(self) -> dict[str, Any]:
        """Check every row of every split (finite, so no missing chunk), then write the marker last."""
        marker: dict[str, Any] = {"format": FORMAT, "rows": {}, "sha256": {}}
        for split in self.attrs["splits"]:
            arr = self.group[split]
            h = hashlib.sha256()
            n_bad, first = 0, -1
            for start, block in iter_blocks(arr):
                bad = ~np.isfinite(block).all(axis=(1, 2))
                if bad.any() and not n_bad:
                    first = start + int(np.flatnonzero(bad)[0])
                n_bad += int(bad.sum())
                h.update(np.ascontiguousarray(block).tobytes())
            if n_bad:
                raise CorruptStoreError(
                    f"{self.path}: {n_bad} non-finite rows in '{split}' (first: row {first}); "
                    f"the export produced NaN/Inf or missed rows, so the store was not marked complete"
                )
            marker["rows"][split] = int(arr.shape[0])
            marker["sha256"][split] = h.hexdigest()
        write_json(self.path / MARKER, marker)
        return marker

    # -- reading ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        fingerprint: str | None = None,
        rows: dict[str, int] | None = None,
        num_classes: int | None = None,
    ) -> LogitStore:
        """Open a complete store, checking it against the dataset the reader is about to use."""
        p = Path(path)
        if not (p / "zarr.json").exists():
            raise StoreNotFoundError(f"{p}: no logit store here. Run `bancache export-logits --gen K` first")
        marker = _read_marker(p)
        try:
            group = zarr.open_group(str(p), mode="r")
            attrs = group.attrs.asdict()
        except Exception as e:  # zarr raises many types for damaged metadata
            raise CorruptStoreError(f"{p}: unreadable store metadata ({e}); re-export it") from e
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if attrs.get("format") != FORMAT or missing:
            raise CorruptStoreError(f"{p}: not a bancache logit store (missing attributes {missing}); re-export it")
        store = cls(p, group)
        store._check_shapes(marker)
        if fingerprint is not None and attrs["dataset_fingerprint"] != fingerprint:
            raise ForeignStoreError(
                f"{p}: exported from another dataset (fingerprint {attrs['dataset_fingerprint'][:12]}..., "
                f"this dataset is {fingerprint[:12]}...). Re-export the teacher on this dataset"
            )
        if num_classes is not None and attrs["num_classes"] != num_classes:
            raise ForeignStoreError(
                f"{p}: has {attrs['num_classes']} classes, the dataset has {num_classes}. "
                f"Re-export the teacher on this dataset"
            )
        for split, n in (rows or {}).items():
            if split not in attrs["splits"]:
                raise ForeignStoreError(f"{p}: has no '{split}' split (has {list(attrs['splits'])})")
            if attrs["splits"][split] != n:
                raise ForeignStoreError(
                    f"{p}: '{split}' has {attrs['splits'][split]} rows, the dataset has {n}. "
                    f"Re-export the teacher on this dataset"
                )
        return store

    def _check_shapes(self, marker: dict[str, Any]) -> None:
        a = self.attrs
        for split, n in a["splits"].items():
            shape = tuple(self.array(split).shape)
            want = (n, a["views"], a["num_classes"])
            if shape != want or marker["rows"].get(split) != n:
                raise CorruptStoreError(
                    f"{self.path}: array '{split}' has shape {shape}, attributes and marker say {want}; "
                    f"re-export the store"
                )

    @property
    def attrs(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    def array(self, split: str) -> zarr.Array:
        try:
            return self.group[split]
        except KeyError:
            raise CorruptStoreError(f"{self.path}: array '{split}' is missing; re-export the store") from None
        except Exception as e:  # damaged array metadata fails inside zarr with many exception types
            raise CorruptStoreError(
                f"{self.path}: array '{split}' has unreadable metadata ({type(e).__name__}: {e}); re-export the store"
            ) from e

    def verify(self) -> None:
        """Re-hash every split against the marker (reads the whole store)."""
        marker = _read_marker(self.path)
        for split, want in marker["sha256"].items():
            h = hashlib.sha256()
            try:
                for _, block in iter_blocks(self.group[split]):
                    h.update(np.ascontiguousarray(block).tobytes())
            except Exception as e:
                raise CorruptStoreError(f"{self.path}: '{split}' has an unreadable chunk ({e}); re-export") from e
            if h.hexdigest() != want:
                raise CorruptStoreError(f"{self.path}: '{split}' content differs from its marker; re-export it")


def iter_blocks(arr: zarr.Array) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start_row, rows) one chunk of rows at a time, so memory stays at one chunk."""
    step = arr.chunks[0]
    for start in range(0, arr.shape[0], step):
        yield start, read_rows(arr, start, start + step)


def read_rows(arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of `arr`; a damaged chunk becomes a CorruptStoreError naming the store."""
    try:
        return np.asarray(arr[start:stop])
    except Exception as e:  # codecs fail with many exception types
        raise CorruptStoreError(
            f"{arr.store_path}: rows {start}..{stop - 1} are unreadable ({type(e).__name__}: {e}); "
            f"a chunk is damaged, re-export the store"
        ) from e


def _read_marker(p: Path) -> dict[str, Any]:
    mp = p / MARKER
    if not mp.exists():
        raise IncompleteStoreError(
            f"{p}: incomplete store (no {MARKER}): its export was interrupted or failed validation. "
            f"Rerun `bancache export-logits` for this generation"
        )
    try:
        marker = json.loads(mp.read_text())
        if marker.get("format") != FORMAT:
            raise ValueError("wrong format")
        return marker  # type: ignore[no-any-return]
    except (ValueError, AttributeError) as e:
        raise StoreError(f"{mp}: damaged completion marker ({e}); rerun `bancache export-logits`") from e
