"""Prepared datasets: one HDF5 file holding train/test arrays, labels, class names, the validation split
and a fingerprint that every later artifact records.

The file (all at the root):
    x_train (N, ...), y_train (N,) int64, x_test (M, ...), y_test (M,) int64: float32 signals (MNIST-1D,
    (N, 1, 40)) or uint8 images (N, C, H, W), with channel_mean / channel_std attributes for images,
    val_index (V,) int64 (rows of the train arrays held out for checkpoint selection),
    attrs: format, dataset, class_names (JSON list), fingerprint (sha256 hex), num_classes.

A transfer set (`data.n_unlabelled`) keeps its unlabelled rows in the train split after the labelled ones,
with label -1 (`UNLABELLED`) and attribute num_unlabelled: inputs a teacher exports logits for and a
student learns from; the validation split is drawn from the labelled rows only.

With `data.storage: files` (`write_files_index`) the file holds no pixels: per split `files_<split>`
(paths relative to attribute `root`), `bytes_<split>` (int64) and `sha256_<split>` (hex), beside
y_train, y_test, val_index and a subset's source_index_<split>; attrs add storage = "files", root, size
and eval_resize. `load_prepared` then gives `ImageFiles` (`pipeline.data.files`) as x_train / x_test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import DatasetError
from pipeline.core.files import atomic_path
from pipeline.core.labels import UNLABELLED
from pipeline.data.files import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, SplitFiles, hash_files, index_fingerprint, scan

log = logging.getLogger(__name__)

FORMAT = "bancache-dataset-v1"
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
SOURCE_INDEX = ("source_index_train", "source_index_test")  # optional: a subset's rows in the original splits
MNIST1D_CLASSES = [str(i) for i in range(10)]


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset in memory (small datasets) with its provenance."""

    x_train: np.ndarray  # or ImageFiles (data.storage: files), which slices like a uint8 NCHW array
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

    @property
    def num_unlabelled(self) -> int:
        """Train rows without a label (a transfer set's, label `UNLABELLED`); 0 for a labelled dataset."""
        return int(np.count_nonzero(self.y_train == UNLABELLED))

    def fit_index(self, unlabelled: bool = False) -> np.ndarray:
        """Train rows used for fitting (`fit_rows` of the train labels and validation split)."""
        return fit_rows(self.y_train, self.val_index, unlabelled)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split {name!r}: expected 'train' or 'test'")


def fit_rows(y_train: np.ndarray, val_index: np.ndarray | None, unlabelled: bool = False) -> np.ndarray:
    """Train rows used for fitting: the labelled train rows except the validation split `val_index`, and with
    `unlabelled` the rows without a label too (what a student learns from a teacher's targets on)."""
    mask = np.ones(len(y_train), dtype=bool) if unlabelled else np.asarray(y_train) != UNLABELLED
    if val_index is not None:
        mask[val_index] = False
    return np.flatnonzero(mask)


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


def carve_val(n_train: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Sorted random subset of train rows for validation (seeded, so the split is reproducible): `fraction`
    of the labelled rows (those of `labels` other than `UNLABELLED`; all `n_train` rows without `labels`)."""
    rows = np.arange(n_train) if labels is None else np.flatnonzero(labels != UNLABELLED)
    n_val = int(round(len(rows) * fraction))
    rng = np.random.default_rng(seed)
    return np.sort(rows[rng.permutation(len(rows))[:n_val]]).astype(np.int64)


def check_labels(y: np.ndarray, split: str, n_classes: int, name: str) -> int:
    """Refuse labels outside 0..n_classes-1 (the train split may also hold `UNLABELLED` rows, but not only
    those); returns the number of unlabelled rows."""
    unlabelled = int(np.count_nonzero(y == UNLABELLED)) if split == "train" else 0
    known = y[y != UNLABELLED] if unlabelled else y
    if len(known) and (known.min() < 0 or known.max() >= n_classes):
        allowed = f"0..{n_classes - 1}" + (f" or {UNLABELLED} (no label)" if split == "train" else "")
        raise DatasetError(f"dataset {name!r}: y_{split} has labels outside {allowed}")
    if unlabelled and unlabelled == len(y):
        raise DatasetError(
            f"dataset {name!r}: every train row is unlabelled; a transfer set needs labelled rows to train and "
            "select the teacher on (set data.n_train)"
        )
    return unlabelled


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
    unlabelled = check_labels(arrays["y_train"], "train", n_classes, name)
    check_labels(arrays["y_test"], "test", n_classes, name)
    val_index = carve_val(len(arrays["y_train"]), val_fraction, split_seed, arrays["y_train"])
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
            if unlabelled:
                f.attrs["num_unlabelled"] = unlabelled
            if arrays["x_train"].dtype == np.uint8 and arrays["x_train"].ndim == 4:
                from pipeline.data.augment import channel_stats

                mean, std = channel_stats(arrays["x_train"])
                f.attrs["channel_mean"] = json.dumps(list(mean))
                f.attrs["channel_std"] = json.dumps(list(std))
    log.info(
        "wrote %s: %d train (%d val, %d unlabelled), %d test rows",
        path,
        len(arrays["y_train"]),
        len(val_index),
        unlabelled,
        len(arrays["y_test"]),
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


def load_prepared(path: str | os.PathLike[str], verify: bool = True, workers: int = 1) -> PreparedData:
    """Read a prepared dataset written by `write_prepared`; `verify` recomputes its fingerprint from the
    arrays read (benchmarks/verify.py measures the cost) and refuses a file whose arrays were edited. An
    on-disk dataset (`write_files_index`) is checked instead by `_load_files` (`workers`: decode threads)."""
    with _open_dataset(path) as f:
        if f.attrs.get("storage") == "files":
            return _load_files(f, path, verify, workers)
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


def subset_files(
    splits: dict[str, SplitFiles],
    k: int,
    n_train: int | None,
    n_test: int | None,
    seed: int,
    n_unlabelled: int | None = None,
) -> tuple[dict[str, SplitFiles], dict[str, np.ndarray]]:
    """The class-balanced subset `pipeline.data.sources.subset` takes (same rows, same seed), of file lists,
    with `n_unlabelled` left-out train files after the subset's, labelled `UNLABELLED`."""
    from pipeline.data.sources import subset_rows

    labels = {split: files.labels for split, files in splits.items()}
    source = subset_rows(labels, k, n_train, n_test, seed, unit="files", n_unlabelled=n_unlabelled)
    extra = source.pop("unlabelled", None)
    out = dict(splits)
    for split, rows in source.items():
        out[split] = splits[split].take(rows)
    if extra is not None:
        out["train"] = out["train"].joined(splits["train"].take(extra), UNLABELLED)
        source["train"] = np.concatenate([source["train"], extra])
    return out, source


def write_files_index(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    recipe: dict[str, int],
    val_fraction: float,
    split_seed: int,
    subset: tuple[int | None, int | None] = (None, None),
    workers: int = 8,
    on_files: Callable[[int, int], None] | None = None,
    n_unlabelled: int | None = None,
) -> str:
    """Index the images under `root` (`pipeline.data.files.scan`) into `path`, no pixels: each file's path,
    label, size and sha256 (hashed by `workers` threads, `on_files(n, total)` as files are done); `recipe` holds
    size and eval_resize. Returns the fingerprint, which is derived from the index."""
    root = Path(root).resolve()
    splits, names = scan(root)
    splits, source = subset_files(splits, len(names), subset[0], subset[1], split_seed, n_unlabelled)
    total = sum(len(files.paths) for files in splits.values())
    tick = None if on_files is None else (lambda n: on_files(n, total))
    splits = {split: hash_files(root, files, workers, tick) for split, files in splits.items()}
    y = splits["train"].labels
    unlabelled = check_labels(y, "train", len(names), "imagefolder")
    val_index = carve_val(len(y), val_fraction, split_seed, y)
    fp = index_fingerprint(splits, names, val_index, recipe)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for split, files in splits.items():
            f.create_dataset(f"y_{split}", data=files.labels)
            f.create_dataset(f"files_{split}", data=np.asarray(files.paths, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset(f"bytes_{split}", data=np.asarray(files.sizes, dtype=np.int64))
            f.create_dataset(f"sha256_{split}", data=np.asarray(files.sha256, dtype="S64"))
            if split in source:
                f.create_dataset(f"source_index_{split}", data=source[split].astype(np.int64))
        f.create_dataset("val_index", data=val_index)
        n = {split: len(files.labels) for split, files in splits.items()}
        desc = f"imagefolder from {root.name} on disk ({n['train']} train, {n['test']} test files)"
        f.attrs.update({"format": FORMAT, "storage": "files", "dataset": "imagefolder", "description": desc})
        f.attrs.update({"root": str(root), "class_names": json.dumps(names), "num_classes": len(names)})
        f.attrs["fingerprint"] = fp
        if unlabelled:
            f.attrs["num_unlabelled"] = unlabelled
        f.attrs.update({"channel_mean": json.dumps(IMAGENET_MEAN), "channel_std": json.dumps(IMAGENET_STD), **recipe})
    log.info("indexed %s: %s files (no pixels copied)", path, n)
    return fp


def _split_files(f: h5py.File, split: str) -> SplitFiles:
    return SplitFiles(
        [p.decode() if isinstance(p, bytes) else str(p) for p in f[f"files_{split}"][()]],
        f[f"y_{split}"][()].astype(np.int64),
        f[f"bytes_{split}"][()].astype(np.int64),
        [h.decode() for h in f[f"sha256_{split}"][()]],
    )


def _load_files(f: h5py.File, path: str | os.PathLike[str], verify: bool, workers: int) -> PreparedData:
    """An on-disk dataset's index as PreparedData (x_train, x_test: `ImageFiles`). `verify` recomputes the
    fingerprint from the index and stats every file (missing, or another size: refused by name); file
    contents are checked as each one is read."""
    try:
        splits = {split: _split_files(f, split) for split in ("train", "test")}
        names, fp, val = json.loads(f.attrs["class_names"]), str(f.attrs["fingerprint"]), f["val_index"][()]
        recipe = {"size": int(f.attrs["size"]), "eval_resize": int(f.attrs["eval_resize"])}
        root = Path(str(f.attrs["root"]))
        source = {s: f[f"source_index_{s}"][()] for s in ("train", "test") if f"source_index_{s}" in f}
        mean, std = (tuple(json.loads(f.attrs[k])) for k in ("channel_mean", "channel_std"))
    except (OSError, KeyError) as e:
        raise DatasetError(f"{path}: unreadable prepared dataset ({e}); rerun `bancache prepare`") from e
    if verify and index_fingerprint(splits, names, val, recipe) != fp:
        raise DatasetError(f"{path}: its index differs from its fingerprint {fp[:12]}...; rerun `bancache prepare`")
    x = {s: ImageFiles(root, files, recipe["size"], recipe["eval_resize"], workers) for s, files in splits.items()}
    if verify:
        for images in x.values():
            images.check_sizes()
    return PreparedData(
        x_train=x["train"],  # type: ignore[arg-type]  # ImageFiles slices like the array it stands for
        y_train=splits["train"].labels,
        x_test=x["test"],  # type: ignore[arg-type]
        y_test=splits["test"].labels,
        val_index=val,
        class_names=names,
        fingerprint=fp,
        name="imagefolder",
        channel_mean=mean,  # type: ignore[arg-type]
        channel_std=std,  # type: ignore[arg-type]
        description=str(f.attrs.get("description", "imagefolder")),
        source_index=source or None,
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
