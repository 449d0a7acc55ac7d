"""Prepared datasets: one HDF5 file holding train/test arrays, labels, class names, the validation split
and a fingerprint that every later artifact records.

The file (all at the root):
    x_train (N, ...), y_train (N,) int64, x_test (M, ...), y_test (M,) int64: float32 signals (MNIST-1D,
    (N, 1, 40)) or uint8 images (N, C, H, W), with channel_mean / channel_std attributes for images,
    val_index (V,) int64 (rows of the train arrays held out for checkpoint selection),
    attrs: format, dataset, class_names (JSON list), fingerprint (sha256 hex), num_classes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import DatasetError
from pipeline.core.files import atomic_path

log = logging.getLogger(__name__)

FORMAT = "bancache-dataset-v1"
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
SOURCE_INDEX = ("source_index_train", "source_index_test")  # optional: a subset's rows in the original splits
MNIST1D_CLASSES = [str(i) for i in range(10)]


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset in memory (small datasets) with its provenance."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    val_index: np.ndarray
    class_names: list[str]
    fingerprint: str
    name: str
    channel_mean: tuple[float, ...] | None = None  # uint8 images: per-channel stats of train pixels / 255
    channel_std: tuple[float, ...] | None = None
    description: str = ""  # a name a person can read, e.g. "cifar10 at data/cifar (subset: 45 train, 30 test rows)"
    source_index: dict[str, np.ndarray] | None = None  # subsets: per split, each row's original index

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def fit_index(self) -> np.ndarray:
        """Train rows used for fitting: all train rows except the validation split."""
        mask = np.ones(len(self.y_train), dtype=bool)
        mask[self.val_index] = False
        return np.flatnonzero(mask)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split {name!r}: expected 'train' or 'test'")


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the arrays, in a fixed order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def make_mnist1d(num_samples: int = 5000) -> dict[str, np.ndarray]:
    """Generate MNIST-1D locally with the package's default arguments (no download)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    d = make_dataset(args)
    # (N, 40) signals become (N, 1, 40): one channel for the 1-D models.
    return {
        "x_train": d["x"].astype(np.float32)[:, None, :],
        "y_train": d["y"].astype(np.int64),
        "x_test": d["x_test"].astype(np.float32)[:, None, :],
        "y_test": d["y_test"].astype(np.int64),
    }


def carve_val(n_train: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted random subset of train rows for validation (seeded, so the split is reproducible)."""
    n_val = int(round(n_train * fraction))
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_train)[:n_val]).astype(np.int64)


def write_prepared(
    path: str | os.PathLike[str],
    arrays: dict[str, np.ndarray],
    class_names: list[str],
    name: str,
    val_fraction: float,
    split_seed: int,
    description: str = "",
) -> str:
    """Write a prepared dataset atomically; returns its fingerprint. Arrays `source_index_<split>` (a
    subset's original row indices), when given, are kept; `description` is a name a person can read."""
    missing = [a for a in ARRAYS if a not in arrays]
    if missing:
        raise DatasetError(f"dataset {name!r} lacks arrays {missing}; a prepared dataset needs {list(ARRAYS)}")
    n_classes = len(class_names)
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if len(y) != len(arrays[f"x_{split}"]):
            raise DatasetError(f"dataset {name!r}: x_{split} and y_{split} have different lengths")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise DatasetError(f"dataset {name!r}: y_{split} has labels outside 0..{n_classes - 1}")
    val_index = carve_val(len(arrays["y_train"]), val_fraction, split_seed)
    fp = fingerprint({**{k: arrays[k] for k in ARRAYS}, "val_index": val_index})
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k in ARRAYS:
                f.create_dataset(k, data=arrays[k])
            f.create_dataset("val_index", data=val_index)
            for k in SOURCE_INDEX:
                if k in arrays:
                    f.create_dataset(k, data=np.asarray(arrays[k], dtype=np.int64))
            f.attrs["format"] = FORMAT
            f.attrs["dataset"] = name
            f.attrs["description"] = description or name
            f.attrs["class_names"] = json.dumps(class_names)
            f.attrs["num_classes"] = n_classes
            f.attrs["fingerprint"] = fp
            if arrays["x_train"].dtype == np.uint8 and arrays["x_train"].ndim == 4:
                from pipeline.data.augment import channel_stats

                mean, std = channel_stats(arrays["x_train"])
                f.attrs["channel_mean"] = json.dumps(list(mean))
                f.attrs["channel_std"] = json.dumps(list(std))
    log.info(
        "wrote %s: %d train (%d val), %d test rows", path, len(arrays["y_train"]), len(val_index), len(arrays["y_test"])
    )
    return fp


class Labels(Protocol):
    """Labels indexed by a slice of rows: a numpy array, or an h5py dataset left on disk."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice) -> Any: ...


@dataclass(frozen=True)
class DatasetLabels:
    """Labels of a prepared dataset, left on disk (h5py datasets slice like arrays)."""

    train: Labels
    test: Labels
    class_names: list[str]
    fingerprint: str
    val_index: np.ndarray | None = None  # sorted train rows held out from fitting (small: a fraction of N)


@contextlib.contextmanager
def _open_dataset(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """Open a prepared dataset file for reading, refusing a missing, unreadable or foreign file."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: prepared dataset not found. Run `bancache prepare` (or `dvc repro prepare`) first")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise DatasetError(f"{p}: unreadable prepared dataset ({e}); rerun `bancache prepare`") from e
    with f:
        if f.attrs.get("format") != FORMAT or not all(k in f for k in ("y_train", "y_test")):
            raise DatasetError(f"{p}: not a bancache dataset (format attribute missing); rerun `bancache prepare`")
        yield f


def load_prepared(path: str | os.PathLike[str], verify: bool = True) -> PreparedData:
    """Read a prepared dataset written by `write_prepared`; `verify` recomputes its fingerprint from the
    arrays read (benchmarks/verify.py measures the cost) and refuses a file whose arrays were edited."""
    with _open_dataset(path) as f:
        try:
            arrays = {k: f[k][()] for k in (*ARRAYS, "val_index")}
            names = json.loads(f.attrs["class_names"])
            fp = str(f.attrs["fingerprint"])
            name = str(f.attrs["dataset"])
            mean, std = (
                tuple(json.loads(f.attrs[k])) if k in f.attrs else None for k in ("channel_mean", "channel_std")
            )
            source = {k.removeprefix("source_index_"): f[k][()] for k in SOURCE_INDEX if k in f}
            description = str(f.attrs.get("description", name))
        except (OSError, KeyError) as e:
            raise DatasetError(f"{path}: unreadable prepared dataset ({e}); rerun `bancache prepare`") from e
    if verify and fingerprint(arrays) != fp:
        raise DatasetError(
            f"{path}: its arrays differ from its recorded fingerprint {fp[:12]}... (edited or damaged after "
            f"`bancache prepare`); rerun `bancache prepare`"
        )
    return PreparedData(
        class_names=names,
        fingerprint=fp,
        name=name,
        description=description,
        source_index=source or None,
        channel_mean=mean,
        channel_std=std,
        **arrays,
    )


@contextlib.contextmanager
def open_labels(path: str | os.PathLike[str]) -> Iterator[DatasetLabels]:
    """Open the labels of a prepared dataset without reading the inputs or whole label arrays."""
    with _open_dataset(path) as f:
        names = json.loads(f.attrs["class_names"])
        val = np.sort(f["val_index"][()]) if "val_index" in f else None
        yield DatasetLabels(f["y_train"], f["y_test"], names, str(f.attrs["fingerprint"]), val)


class IndexedDataset(Dataset):
    """Yields (x, y, index) where index is the row in the split's arrays, the key of the cached logits."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.ascontiguousarray(y))
        self.rows = np.arange(len(y)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        row = int(self.rows[i])
        return self.x[row], self.y[row], row
