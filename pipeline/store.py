"""The logit store: a zarr v3 group of raw teacher logits, one array per split, and a completion marker.

Layout of `cache/gen-K/` (readable with plain zarr):
    zarr.json            group metadata; attributes = provenance (see `REQUIRED_ATTRS`), `layout`, `slots`,
                         `augmentation`, `retained_mass`
    train/               array (N, V, S), dtype float16 or float32, chunks (chunk_rows, V, S): per row and
                         view, S = C raw logits (layout "dense"), the k largest raw logits ("topk"), or
                         the counts of the sampled classes ("sampled", integer-valued)
    train_idx/           sparse layouts only: (N, V, S) int16/int32 class index of each value
    train_mass/          sparse layouts only: (N, V) float32 teacher probability (T = 1) of the kept classes
    train_aug/           views > 1 only: (N, V, 3) int16 (top, left, flip) of each view's crop and flip
                         (`pipeline.augment.apply_params`); view 0 is the clean image (pad, pad, 0)
    test/, test_*        the same for the test split
    complete/zarr.json   the completion marker, written last, after every row was checked: an empty zarr group
                         whose attributes are the rows per split and the sha256 of each array
    train_labels, test_labels, val_index, and for a subset train_source_index and test_source_index: (N,)
                         int64 labels, validation rows of train, each row's index in the original dataset

Logits are stored raw (T = 1); softened targets are computed at read time with any temperature. Fill
values are NaN (float arrays) and -1 (integer arrays), so a chunk that was never written fails validation
instead of passing as zeros.
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
# The completion marker is the metadata of an empty zarr group `complete` whose attributes hold the rows and
# hashes, so plain zarr lists it as a group (a bare JSON file in the store made zarr warn "not recognized").
MARKER = "complete/zarr.json"
LEGACY_MARKER = "COMPLETE.json"  # stores written before 0.2: still read
REQUIRED_ATTRS = (
    "format",
    "generation",
    "arch",
    "seed",
    "temperature",
    "checkpoint_sha256",
    "dataset_fingerprint",
    "class_names",
    "dtype",
    "views",
    "splits",
)
LAYOUTS = ("dense", "topk", "sampled")
SPARSE_ARRAYS = ("idx", "mass")  # suffixes of the arrays a sparse layout adds per split
AUG_ARRAY = "aug"  # suffix of the (N, V, 3) crop/flip array of a multi-view store


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


class LogitStore:
    """One generation's cached logits. Create with `create`, fill with `write`, finish with `seal`;
    read with `open`, which refuses incomplete, foreign or malformed stores."""

    def __init__(self, path: str | os.PathLike[str], group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}  # zarr 3 re-reads an array's zarr.json on every group[name]

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
        layout: str = "dense",
        slots: int | None = None,
        augmentation: dict[str, Any] | None = None,
    ) -> LogitStore:
        """Create an empty store (no marker) with one (rows, views, slots) value array per split.

        `slots` is the values per row and view: num_classes for "dense" (the default), k for "topk", the
        most distinct classes a row can draw for "sampled". Sparse layouts add `<split>_idx` and
        `<split>_mass`; `augmentation` (the recipe of views 1..V-1) adds `<split>_aug`."""
        if layout not in LAYOUTS:
            raise ValueError(f"{path}: layout {layout!r}: allowed values are {', '.join(LAYOUTS)}")
        slots = num_classes if slots is None else slots
        if layout == "dense" and slots != num_classes:
            raise ValueError(f"{path}: a dense store holds all {num_classes} classes per row, not {slots}")
        attrs = {
            **attributes,
            "format": FORMAT,
            "dtype": dtype,
            "views": views,
            "num_classes": num_classes,
            "splits": dict(rows),
            "chunk_rows": chunk_rows,
            "layout": layout,
            "slots": slots,
            "augmentation": augmentation,
            "retained_mass": None,
        }
        group = zarr.create_group(str(path), overwrite=True, attributes=attrs)
        for split, n in rows.items():
            c = min(chunk_rows, max(n, 1))
            group.create_array(split, shape=(n, views, slots), chunks=(c, views, slots), dtype=dtype, fill_value=np.nan)
            if layout != "dense":
                group.create_array(
                    f"{split}_idx",
                    shape=(n, views, slots),
                    chunks=(c, views, slots),
                    dtype=index_dtype(num_classes),
                    fill_value=-1,
                )
                group.create_array(
                    f"{split}_mass", shape=(n, views), chunks=(c, views), dtype="float32", fill_value=np.nan
                )
            if augmentation is not None:
                group.create_array(
                    f"{split}_{AUG_ARRAY}", shape=(n, views, 3), chunks=(c, views, 3), dtype="int16", fill_value=-1
                )
        return cls(path, group)

    def array_names(self) -> list[str]:
        """Every array of the store: each split's values, then its sparse and augmentation arrays."""
        a = self.attrs
        extra = (
            *(SPARSE_ARRAYS if a.get("layout", "dense") != "dense" else ()),
            *((AUG_ARRAY,) if a.get("augmentation") else ()),
        )
        names = [name for split in a["splits"] for name in (split, *(f"{split}_{e}" for e in extra))]
        return names + list(a.get("provenance") or ())  # labels, validation rows, a subset's source indices

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> LogitStore:
        """Open a store being written (no marker yet) to add rows: other ranks of a distributed export."""
        return cls(path, zarr.open_group(str(path), mode="r+"))

    def write(
        self,
        split: str,
        start: int,
        logits: np.ndarray,
        idx: np.ndarray | None = None,
        mass: np.ndarray | None = None,
        aug: np.ndarray | None = None,
    ) -> None:
        """Write rows [start, start + len(logits)) of `split`; `logits` is (B, V, S) or (B, S) for V = 1
        (the values: logits, or counts for "sampled"). Sparse stores also take `idx` (B, V, S) and `mass`
        (B, V); multi-view stores `aug` (B, V, 3) = (top, left, flip)."""
        names = set(self.array_names())
        given = {f"{split}_idx": idx, f"{split}_mass": mass, f"{split}_{AUG_ARRAY}": aug}
        for name, value in given.items():
            if (value is None) == (name in names):
                raise ValueError(
                    f"{self.path}: '{name}' {'is missing' if value is None else 'is not an array of this store'}"
                )
        checked = [self._checked(split, start, logits)]
        checked += [self._checked(name, start, value) for name, value in given.items() if value is not None]
        for name, value in checked:  # every shape is checked before anything is written
            self.array(name)[start : start + len(value)] = value

    def _checked(self, name: str, start: int, logits: np.ndarray) -> tuple[str, np.ndarray]:
        arr = self.array(name)
        if logits.ndim == arr.ndim - 1 and arr.shape[1] == 1:
            logits = logits[:, None, ...]
        # zarr broadcasts and truncates mismatched values silently, so check the shape here.
        want = (len(logits), *arr.shape[1:])
        if logits.shape != want or start < 0 or start + len(logits) > arr.shape[0]:
            raise ValueError(
                f"{self.path}: cannot write logits of shape {logits.shape} at row {start} of '{name}' "
                f"(shape {tuple(arr.shape)}); expected {want} within rows 0..{arr.shape[0]}"
            )
        return name, logits.astype(arr.dtype, copy=False)

    def seal(self) -> dict[str, Any]:
        """Check every row of every split (finite, so no missing chunk), then write the marker last."""
        marker: dict[str, Any] = {"format": FORMAT, "rows": {}, "sha256": {}}
        for split in self.array_names():
            arr = self.array(split)
            h = hashlib.sha256()
            n_bad, first = 0, -1
            for start, block in iter_blocks(arr):
                bad = _bad_rows(block)
                if bad.any() and not n_bad:
                    first = start + int(np.flatnonzero(bad)[0])
                n_bad += int(bad.sum())
                h.update(np.ascontiguousarray(block).tobytes())
            if n_bad:
                raise CorruptStoreError(
                    f"{self.path}: {n_bad} non-finite rows in '{split}' (first: row {first}); "
                    f"the export produced NaN/Inf or missed rows, so the store was not marked complete"
                )
            if split in self.attrs["splits"]:
                marker["rows"][split] = int(arr.shape[0])
            marker["sha256"][split] = h.hexdigest()
        self.group.attrs.update({"retained_mass": self._retained_mass()})
        (self.path / MARKER).parent.mkdir(exist_ok=True)
        write_json(self.path / MARKER, {"zarr_format": 3, "node_type": "group", "attributes": marker})
        return marker

    def _retained_mass(self) -> dict[str, float]:
        """Per split, the mean over rows and views of the teacher probability (T = 1) the store keeps:
        1.0 for dense stores."""
        if self.attrs.get("layout", "dense") == "dense":
            return {split: 1.0 for split in self.attrs["splits"]}
        out = {}
        for split in self.attrs["splits"]:
            total, count = 0.0, 0
            for _, block in iter_blocks(self.group[f"{split}_mass"]):
                total += float(block.astype(np.float64).sum())
                count += block.size
            out[split] = total / count if count else 1.0
        return out

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
            gen = p.name.removeprefix("gen-") if p.name.startswith("gen-") else "K"
            raise StoreNotFoundError(f"{p}: no logit store here. Run `bancache export-logits --gen {gen}` first")
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
            want = (n, a["views"], a.get("slots", a["num_classes"]))
            if shape != want or marker["rows"].get(split) != n:
                raise CorruptStoreError(
                    f"{self.path}: array '{split}' has shape {shape}, attributes and marker say {want}; "
                    f"re-export the store"
                )

    @property
    def attrs(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    def array(self, split: str) -> zarr.Array:
        """The zarr array `split`, opened once per LogitStore."""
        if split in self._arrays:
            return self._arrays[split]
        try:
            self._arrays[split] = self.group[split]
            return self._arrays[split]
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


def _bad_rows(block: np.ndarray) -> np.ndarray:
    """Rows holding a fill value or worse: non-finite floats, negative integers (fill value -1)."""
    flat = block.reshape(len(block), -1)
    if np.issubdtype(block.dtype, np.floating):
        return ~np.isfinite(flat).all(axis=1)
    return (flat < 0).any(axis=1)  # type: ignore[no-any-return]


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
    if not mp.exists() and (p / LEGACY_MARKER).exists():
        mp = p / LEGACY_MARKER
    if not mp.exists():
        raise IncompleteStoreError(
            f"{p}: incomplete store (no {MARKER}): its export was interrupted or failed validation. "
            f"Rerun `bancache export-logits` for this generation"
        )
    try:
        marker = json.loads(mp.read_text())
        if mp.name == "zarr.json":
            if set(marker) != {"zarr_format", "node_type", "attributes"} or marker["zarr_format"] != 3:
                raise ValueError("not a zarr v3 group's metadata")
            marker = marker["attributes"]
        if marker.get("format") != FORMAT:
            raise ValueError("wrong format")
        return marker  # type: ignore[no-any-return]
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise StoreError(f"{mp}: damaged completion marker ({e}); rerun `bancache export-logits`") from e
