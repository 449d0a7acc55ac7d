"""The logit store: a zarr v3 group of raw teacher logits, one array per split, and a completion marker.

The arrays of `cache/gen-K/` (readable with plain zarr):
    zarr.json            group metadata; attributes = provenance (see `REQUIRED_ATTRS`), `layout` (the store
                         format, `pipeline.cache.formats`), `slots`, `augmentation`, `retained_mass`, `views`
                         (V, of train), `split_views` (per split)
    train/               array (N, V, S), dtype float16 or float32, chunks (chunk_rows, V, S): per row and
                         view, S = C raw logits (layout "dense"), the k largest raw logits ("topk"), or
                         the counts of the sampled classes ("sampled", integer-valued)
    train_idx/           sparse layouts only: (N, V, S) int16/int32 class index of each value
    train_mass/          sparse layouts only: (N, V) float32 teacher probability (T = 1) of the kept classes
                         (the arrays beside the values are the format's `extra_arrays`)
    train_aug/           views > 1 only: (N, V, 3) int16 (top, left, flip) of each view's crop and flip
                         (`pipeline.data.augment.apply_params`); view 0 is the clean image (pad, pad, 0);
                         on-disk datasets' RandomResizedCrop views (augmentation kind "resized-crop+flip"):
                         (N, V, 5) int32 (i, j, h, w, flip), view 0 the evaluation view (0, 0, 0, 0, 0)
    test/, test_*        the same for the test split with its own view count, `split_views["test"]`: the
                         export keeps view 0 (the clean image) only, (N, 1, S) and no test_aug, since
                         evaluation, ensembles and inspect read view 0 and no student trains on test rows
    complete/zarr.json   the completion marker, written last, after every row was checked: an empty zarr group
                         whose attributes are the rows per split, the sha256 of each array's decoded rows (C
                         order) and `marker_sha256`, the sha256 of the rest of the marker
    train_labels, test_labels, val_index, and for a subset train_source_index and test_source_index: (N,)
                         int64 labels, validation rows of train, each row's index in the original dataset

Chunks are zstd-compressed with zstd's content checksum on, so a damaged chunk fails to decode. Readers
verify on top of that: `LogitStore.open(verify=True)` (the default) hashes each array while it is read in
row order (`read`, `blocks`) and raises `CorruptStoreError` when the last row's hash differs from the
marker, before the caller can write anything derived from it; a reader that reads rows out of order calls
`verify` first. `verify=False` (CLI `bancache --trust-stores`) skips the hashing for trusted stores.

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
from zarr.codecs import ZstdCodec

from pipeline.cache.formats import LAYOUTS, StoreFormat, format_of
from pipeline.core.errors import (
    CorruptStoreError,
    ForeignStoreError,
    IncompleteStoreError,
    ParamsError,
    StoreError,
    StoreNotFoundError,
)
from pipeline.core.files import write_json

FORMAT = "bancache-logits-v1"
# The completion marker is the metadata of an empty zarr group `complete` whose attributes hold the rows and
# hashes, so plain zarr lists it as a group (a bare JSON file in the store made zarr warn "not recognized").
MARKER = "complete/zarr.json"
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
    "num_classes",
    "split_views",
    "layout",
    "slots",
    "augmentation",
)
AUG_ARRAY = "aug"  # suffix of the (N, V, 3) crop/flip array of a multi-view store
# zstd level 0 is zarr's default; checksum=True adds zstd's 4-byte content checksum to every chunk
COMPRESSORS = (ZstdCodec(level=0, checksum=True),)
MARKER_KEYS = {"format", "rows", "sha256", "marker_sha256"}
REEXPORT = "re-export the store (`bancache export-logits --gen K`)"


def views_of(attrs: dict[str, Any], split: str) -> int:
    """Views per row of `split` (the attribute `split_views`)."""
    return int(attrs["split_views"][split])


def taught_by(attrs: dict[str, Any]) -> str:
    """What the store's generation learned from, for tables and summaries: "labels" (generation 0 and the
    label-trained members, whose `teacher` attribute is None), "generation J", or "generations 0, 1" (an
    ensemble teacher, the list of its members)."""
    teacher = attrs.get("teacher")
    if teacher is None:
        return "labels"
    if isinstance(teacher, list):
        return "generations " + ", ".join(str(t) for t in teacher)
    return f"generation {teacher}"


def has_aug(attrs: dict[str, Any], split: str) -> bool:
    """Whether `split` has a `<split>_aug` array: the store has an augmentation recipe and the split more
    than one view."""
    return bool(attrs["augmentation"]) and views_of(attrs, split) > 1


def check_temperature(path: str | os.PathLike[str], layout: str | StoreFormat, temperature: float, key: str) -> None:
    """Refuse a temperature the store's format cannot serve (sampled class counts estimate the teacher
    distribution at T = 1 only, Anshumann et al. 2025); `key` names the setting at fault."""
    fmt = LAYOUTS[layout] if isinstance(layout, str) else layout
    if fmt.t1_only is not None and temperature != 1.0:
        others = " or ".join(name for name, f in LAYOUTS.items() if f.t1_only is None)
        raise ParamsError(
            f"{key} = {temperature}: the teacher's store {path} holds {fmt.name} targets, {fmt.t1_only}. "
            f"Use temperature: 1.0 or a {others} store"
        )


class LogitStore:
    """One generation's cached logits. Create with `create`, fill with `write`, finish with `seal`;
    read with `open`, which refuses incomplete, foreign or malformed stores."""

    def __init__(self, path: str | os.PathLike[str], group: zarr.Group, marker: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}  # zarr 3 re-reads an array's zarr.json on every group[name]
        self.marker = marker  # None: nothing to verify against (a store being written, or verify=False)
        self._hashing: dict[str, tuple[Any, int] | None] = {}  # name -> (sha256, next row), None: gave up

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
        layout: str | StoreFormat = "dense",
        slots: int | None = None,
        augmentation: dict[str, Any] | None = None,
        split_views: dict[str, int] | None = None,
    ) -> LogitStore:
        """Create an empty store (no marker) with one (rows, views, slots) value array per split.

        `layout` is the store format (`pipeline.cache.formats`: an object, or its name in `LAYOUTS`) and
        `slots` the values per row and view: num_classes for "dense" (the default), k for "topk", the
        most distinct classes a row can draw for "sampled". `split_views` gives a split fewer views than
        `views` (views 0..v-1; the export gives test view 0 only). The format adds its extra arrays (sparse
        ones `<split>_idx` and `<split>_mass`); `augmentation` (the recipe of views 1..V-1) adds
        `<split>_aug` to each split with more than one view."""
        fmt = layout if isinstance(layout, StoreFormat) else LAYOUTS.get(layout)
        if fmt is None:
            raise ValueError(f"{path}: layout {layout!r}: allowed values are {', '.join(LAYOUTS)}")
        slots = num_classes if slots is None else slots
        if fmt.full_logits and slots != num_classes:
            raise ValueError(f"{path}: a {fmt.name} store holds all {num_classes} classes per row, not {slots}")
        per_split = {split: views for split in rows} | dict(split_views or {})
        if set(per_split) != set(rows) or not all(1 <= v <= views for v in per_split.values()):
            raise ValueError(f"{path}: split_views {split_views}: give splits of {list(rows)} 1..{views} views each")
        attrs = {
            **attributes,
            "format": FORMAT,
            "dtype": dtype,
            "views": views,
            "split_views": per_split,
            "num_classes": num_classes,
            "splits": dict(rows),
            "chunk_rows": chunk_rows,
            "layout": fmt.name,
            "slots": slots,
            "augmentation": augmentation,
            "retained_mass": None,
        }
        group = zarr.create_group(str(path), overwrite=True, attributes=attrs)
        for split, n in rows.items():
            _create_split(group, split, (n, per_split[split], slots), min(chunk_rows, max(n, 1)), attrs, fmt)
        return cls(path, group)

    @property
    def format(self) -> StoreFormat:
        """The store's format (attribute `layout`); one this version does not know is refused."""
        return format_of(self.attrs, self.path)

    def array_names(self) -> list[str]:
        """Every array of the store: each split's values, then its format's and augmentation arrays."""
        a = self.attrs
        extra_arrays = [e.suffix for e in self.format.extra_arrays(a["num_classes"])]
        names = []
        for split in a["splits"]:
            extra = (*extra_arrays, *((AUG_ARRAY,) if has_aug(a, split) else ()))
            names += [split, *(f"{split}_{e}" for e in extra)]
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
        """Write rows [start, start + len(logits)) of `split`; `logits` is (B, V, S), V the split's views,
        or (B, S) for V = 1 (the values: logits, or counts for "sampled"). Sparse stores also take `idx`
        (B, V, S) and `mass` (B, V); multi-view splits `aug` (B, V, 3) = (top, left, flip)."""
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
        """Check every row of every split (finite, so no missing chunk), then write the marker last. The
        provenance arrays are hashed, not checked for fill values: they are written whole when the store is
        created, and a transfer set's train_labels holds -1 (no label) on purpose."""
        marker: dict[str, Any] = {"format": FORMAT, "rows": {}, "sha256": {}}
        whole = set(self.attrs.get("provenance") or ())
        for split in self.array_names():
            arr = self.array(split)
            h = hashlib.sha256()
            n_bad, first = 0, -1
            for start, block in iter_blocks(arr):
                bad = np.zeros(len(block), bool) if split in whole else bad_rows(block)
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
        marker["marker_sha256"] = _marker_digest(marker)
        (self.path / MARKER).parent.mkdir(exist_ok=True)
        write_json(self.path / MARKER, {"zarr_format": 3, "node_type": "group", "attributes": marker})
        return marker

    def _retained_mass(self) -> dict[str, float]:
        """Per split, the mean over rows and views of the teacher probability (T = 1) the store keeps:
        1.0 for a format with full logits, else the mean of its `mass` array."""
        if self.format.full_logits:
            return {split: 1.0 for split in self.attrs["splits"]}
        out = {}
        for split in self.attrs["splits"]:
            total, count = 0.0, 0
            for _, block in iter_blocks(self.array(f"{split}_mass")):
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
        verify: bool = True,
    ) -> LogitStore:
        """Open a complete store, checking it against the dataset the reader is about to use. With `verify`
        every array read in full (`read`, `blocks`, `verify`) is checked against the marker's sha256."""
        p = Path(path)
        if not (p / "zarr.json").exists():
            gen = p.name.removeprefix("gen-") if p.name.startswith("gen-") else "K"
            raise StoreNotFoundError(f"{p}: no logit store here. Run `bancache export-logits --gen {gen}` first")
        marker = _read_marker(p)
        try:
            group = zarr.open_group(str(p), mode="r")
            attrs: dict[str, Any] = group.attrs.asdict()
        except Exception as e:  # zarr raises many types for damaged metadata
            raise CorruptStoreError(f"{p}: unreadable store metadata ({e}); re-export it") from e
        if attrs.get("format") != FORMAT:
            raise CorruptStoreError(f"{p}: not a bancache logit store (format {attrs.get('format')!r}); re-export it")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise CorruptStoreError(
                f"{p}: not a store this version wrote (missing attributes {missing}); re-export it with this "
                f"version (`bancache export-logits --gen K`)"
            )
        format_of(attrs, p)  # an unknown layout is refused before anything reads the arrays
        store = cls(p, group, marker if verify else None)
        store._check_marker(marker)
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

    def _check_marker(self, marker: dict[str, Any]) -> None:
        """The marker names every array of the store, and each split's shape agrees with it."""
        a = self.attrs
        if set(marker["sha256"]) != set(self.array_names()):
            raise CorruptStoreError(
                f"{self.path}: {MARKER} lists arrays {sorted(marker['sha256'])}, the store has "
                f"{sorted(self.array_names())}; {REEXPORT}"
            )
        for split, n in a["splits"].items():
            shape = tuple(self.array(split).shape)
            want = (n, views_of(a, split), a["slots"])
            if shape != want or marker["rows"].get(split) != n:
                raise CorruptStoreError(
                    f"{self.path}: array '{split}' has shape {shape}, attributes and marker say {want}; "
                    f"re-export the store"
                )

    @property
    def attrs(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    def require_dense(self, needed_by: str) -> None:
        """Refuse a sparse store where all C logits of each row are needed: its values are not C logits, and
        reading them as such would be silently wrong."""
        fmt = self.format
        if not fmt.full_logits:
            full = " or ".join(name for name, f in LAYOUTS.items() if f.full_logits)
            raise StoreError(
                f"{self.path}: layout {fmt.name!r} keeps only part of each row's logits, and {needed_by} needs all "
                f"of them. Export it with export.layout: {full}"
            )

    def array(self, split: str) -> zarr.Array:
        """The zarr array `split`, opened once per LogitStore."""
        if split in self._arrays:
            return self._arrays[split]
        try:
            found = self.group[split]
            if not isinstance(found, zarr.Array):
                raise KeyError(split)
            self._arrays[split] = found
            return found
        except KeyError:
            raise CorruptStoreError(f"{self.path}: array '{split}' is missing; re-export the store") from None
        except Exception as e:  # damaged array metadata fails inside zarr with many exception types
            raise CorruptStoreError(
                f"{self.path}: array '{split}' has unreadable metadata ({type(e).__name__}: {e}); re-export the store"
            ) from e

    def verify(self, names: list[str] | None = None) -> None:
        """Re-hash arrays `names` (default: every array) against the marker, reading them whole."""
        marker = self.marker or _read_marker(self.path)
        for name in names or list(marker["sha256"]):
            h = hashlib.sha256()
            try:
                for _, block in iter_blocks(self.array(name)):
                    h.update(np.ascontiguousarray(block).tobytes())
            except Exception as e:
                raise CorruptStoreError(f"{self.path}: '{name}' has an unreadable chunk ({e}); {REEXPORT}") from e
            self._compare(name, h.hexdigest(), marker)

    def _compare(self, name: str, digest: str, marker: dict[str, Any]) -> None:
        if digest != marker["sha256"].get(name):
            raise CorruptStoreError(
                f"{self.path}: '{name}' content differs from its marker (sha256 in {MARKER}): a chunk or the "
                f"marker was altered after export; {REEXPORT}"
            )

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name`. Reads in row order are hashed on the way (verify=True): the
        read that reaches the last row raises CorruptStoreError if the array differs from its marker."""
        arr = self.array(name)
        block = read_rows(arr, start, stop)
        self.hash_rows(name, start, block)
        return block

    def hash_rows(self, name: str, start: int, block: np.ndarray) -> None:
        """Feed rows read from `start` to array `name`'s running hash (no-op without a marker to check);
        rows out of order stop the hashing of that array: such a reader calls `verify` itself."""
        if self.marker is None:
            return
        state = (hashlib.sha256(), 0) if start == 0 else self._hashing.get(name)  # row 0 (re)starts it
        if state is None or state[1] != start:
            self._hashing[name] = None
            return
        h, _ = state
        h.update(np.ascontiguousarray(block).tobytes())
        stop = start + len(block)
        self._hashing[name] = (h, stop)
        if stop >= self.array(name).shape[0]:
            self._hashing.pop(name)  # a second pass starts a new hash
            self._compare(name, h.hexdigest(), self.marker)

    def blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(start_row, rows) of array `name` one chunk at a time, verified as `read` does."""
        arr = self.array(name)
        for start in range(0, arr.shape[0], arr.chunks[0]):
            yield start, self.read(name, start, start + arr.chunks[0])


def _create_split(
    group: zarr.Group, split: str, shape: tuple[int, int, int], chunk: int, attrs: dict, fmt: StoreFormat
) -> None:
    """The arrays of one split: values (N, V, S), the format's extra arrays and `_aug` (V > 1) as needed."""
    n, views, slots = shape
    kw: dict[str, Any] = {"compressors": COMPRESSORS}
    group.create_array(split, shape=shape, chunks=(chunk, views, slots), dtype=attrs["dtype"], fill_value=np.nan, **kw)
    for extra in fmt.extra_arrays(attrs["num_classes"]):
        per_row = (views, slots) if extra.per_slot else (views,)
        group.create_array(
            f"{split}_{extra.suffix}",
            shape=(n, *per_row),
            chunks=(chunk, *per_row),
            dtype=extra.dtype,
            fill_value=extra.fill_value,
            **kw,
        )
    if has_aug(attrs, split):
        width = len(attrs["augmentation"].get("fields", ("top", "left", "flip")))  # resized crops: i, j, h, w, flip
        dtype = "int16" if width == 3 else "int32"
        group.create_array(
            f"{split}_{AUG_ARRAY}",
            shape=(n, views, width),
            chunks=(chunk, views, width),
            dtype=dtype,
            fill_value=-1,
            **kw,
        )


def bad_rows(block: np.ndarray) -> np.ndarray:
    """Rows holding a fill value or worse: non-finite floats, negative integers (fill value -1)."""
    flat = block.reshape(len(block), int(np.prod(block.shape[1:])))  # -1 fails on an empty block
    if np.issubdtype(block.dtype, np.floating):
        return np.asarray(~np.isfinite(flat).all(axis=1))
    return np.asarray((flat < 0).any(axis=1))


def require_finite(path: Path | str, split: str, start: int, block: np.ndarray, consequence: str) -> None:
    """Refuse the rows of `block` (rows `start`.. of `split` of the store at `path`) that hold NaN/Inf or a
    fill value: a store read with verify=False, or written by other tools. `consequence` says what reading
    them would do."""
    bad = bad_rows(block)
    if bad.any():
        rows = (start + np.flatnonzero(bad))[:5].tolist()
        raise CorruptStoreError(
            f"{path}: rows {rows} of '{split}' are missing or not finite ({int(bad.sum())} in rows "
            f"{start}..{start + len(block) - 1}); {consequence}: {REEXPORT}"
        )


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
        keys = {"zarr_format", "node_type", "attributes"}
        if set(marker) != keys or marker["zarr_format"] != 3 or marker["node_type"] != "group":
            raise ValueError("not a zarr v3 group's metadata")
        marker = marker["attributes"]
        if marker.get("format") != FORMAT:
            raise ValueError("wrong format")
        if not isinstance(marker.get("rows"), dict) or not isinstance(marker.get("sha256"), dict):
            raise ValueError("no rows or sha256 table")
        if set(marker) - MARKER_KEYS:
            raise ValueError(f"unknown entries {sorted(set(marker) - MARKER_KEYS)}")
        if MARKER_KEYS - set(marker):
            raise ValueError(f"missing entries {sorted(MARKER_KEYS - set(marker))}")
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise StoreError(f"{mp}: damaged completion marker ({e}); rerun `bancache export-logits`") from e
    if marker["marker_sha256"] != _marker_digest(marker):
        raise CorruptStoreError(
            f"{mp}: damaged completion marker (its content differs from its own marker_sha256: it was edited or "
            f"damaged after export); {REEXPORT}"
        )
    return marker  # type: ignore[no-any-return]


def _marker_digest(marker: dict[str, Any]) -> str:
    """sha256 of the marker without its `marker_sha256` entry, in its canonical JSON form."""
    body = {k: v for k, v in marker.items() if k != "marker_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
