"""Image datasets read from disk into the arrays `pipeline.data.prepared.write_prepared` stores.

Every loader returns a `Loaded` pair: `arrays` = {x_train, y_train, x_test, y_test} and `class_names`.
Images are **uint8 NCHW** (N, C, H, W) in 0..255, four times smaller than float32 on disk; the model
normalises them on the fly (`pipeline.models.registry.ImageInput`), in training and export alike. Labels are int64
class indices into `class_names`.

Sources:
- `load_cifar("cifar10" | "cifar100", root)`: torchvision's on-disk format (`root/cifar-10-batches-py`,
  `root/cifar-100-python`), read by `torchvision.datasets.CIFAR10/CIFAR100`, which checks every file's md5.
  CIFAR-100 uses the 100 fine labels.
- `load_npz(root)`: `root/train.npz` and `root/test.npz`, each with `x` uint8 (N, H, W, C) HWC, `y` int64
  (N,) and `classes` (K,) strings (the layout of the shared cifar10-jpeg copy).
- `load_imagefolder(root, size)`: `root/train/<class>/*.png|jpg` and `root/test/<class>/...`, resized to
  size x size RGB with `torchvision.datasets.ImageFolder`.
- `subset(loaded, n_train, n_test, seed, n_unlabelled)`: a class-balanced, seeded sample of rows (CPU
  experiments), and with `n_unlabelled` a transfer set: that many of the train rows the subset leaves out,
  appended after it with label -1 (`pipeline.core.labels.UNLABELLED`), their inputs only.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.core.errors import DatasetError
from pipeline.core.labels import UNLABELLED

log = logging.getLogger(__name__)

SOURCES = ("cifar10", "cifar100", "npz", "imagefolder")
SPLITS = ("train", "test")


class Loaded(NamedTuple):
    """Arrays {x_train, y_train, x_test, y_test} (x uint8 NCHW, y int64) and the class names."""

    arrays: dict[str, np.ndarray]
    class_names: list[str]


def load_dataset(
    source: str,
    root: str | os.PathLike[str],
    *,
    download: bool = False,
    size: int = 32,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    n_unlabelled: int | None = None,
) -> Loaded:
    """Load `source` (one of SOURCES) from `root`, then take a balanced subset when n_train/n_test are set
    (and `n_unlabelled` of the train rows it leaves out, without their labels: `subset`).

    `download` applies to CIFAR only (torchvision fetches the archive); `size` to ImageFolder only.
    """
    if source in ("cifar10", "cifar100"):
        loaded = load_cifar(source, root, download=download)
    elif source == "npz":
        loaded = load_npz(root)
    elif source == "imagefolder":
        loaded = load_imagefolder(root, size=size)
    else:
        raise DatasetError(f"unknown dataset source {source!r}; expected one of {', '.join(SOURCES)}")
    return subset(loaded, n_train, n_test, seed, n_unlabelled)


def _require_dir(root: Path, what: str, fix: str) -> None:
    if not root.is_dir():
        raise DatasetError(f"{root}: {what} not found (no such directory). {fix}")


def load_cifar(name: str, root: str | os.PathLike[str], download: bool = False) -> Loaded:
    """CIFAR-10 or CIFAR-100 from torchvision's layout under `root` (fetched there first if `download`).

    torchvision verifies the md5 of every batch file; files that fail it raise `DatasetError`.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    classes = {"cifar10": CIFAR10, "cifar100": CIFAR100}
    if name not in classes:
        raise DatasetError(f"unknown CIFAR variant {name!r}; expected 'cifar10' or 'cifar100'")
    cls = classes[name]
    root = Path(root)
    folder = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    fix = f"Set data.download: true in params.yaml (needs internet access), or unpack {cls.filename} into {root}"
    if not download:
        _require_dir(root, f"{name} data root", fix)
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise DatasetError(f"{folder}: {name} files missing: {', '.join(missing)}. {fix}")
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as e:  # torchvision's "not found or corrupted": a failed md5 check
        raise DatasetError(
            f"{folder}: torchvision rejected the {name} files ({e}); they fail its md5 check. "
            f"Delete {folder} and download again (data.download: true in params.yaml)"
        ) from e
    except OSError as e:  # download or read failure (URLError is an OSError)
        raise DatasetError(f"{folder}: could not fetch or read {name} ({e}). {fix}") from e
    arrays = {}
    for split, ds in (("train", train), ("test", test)):
        arrays[f"x_{split}"] = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
        arrays[f"y_{split}"] = np.asarray(ds.targets, dtype=np.int64)
    loaded = Loaded(arrays, [str(c) for c in train.classes])
    check_loaded(loaded, str(folder))
    return loaded


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found. An npz dataset root needs train.npz and test.npz")
    try:
        with np.load(path, allow_pickle=False) as d:
            present = set(d.files)
            arrays = {k: d[k] for k in ("x", "y", "classes") if k in present}
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # ValueError: not npz, or pickled object arrays
        raise DatasetError(f"{path}: not a readable npz of plain arrays ({e}); rewrite it with numpy.savez") from e
    missing = [k for k in ("x", "y", "classes") if k not in arrays]
    if missing:
        raise DatasetError(f"{path}: arrays {missing} missing; expected x (N, H, W, C) uint8, y (N,), classes (K,)")
    x, y, classes = arrays["x"], arrays["y"], [str(c) for c in arrays["classes"]]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        hint = " (it looks NCHW: transpose to NHWC)" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise DatasetError(f"{path}: x is {x.dtype} {x.shape}; expected uint8 (N, H, W, C) with C 1 or 3{hint}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: y is {y.dtype} {y.shape}; expected integer labels of shape ({len(x)},)")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y.astype(np.int64), classes


def load_npz(root: str | os.PathLike[str]) -> Loaded:
    """`root/train.npz` and `root/test.npz` (x uint8 NHWC, y int64, classes), returned as NCHW."""
    root = Path(root)
    _require_dir(root, "npz dataset root", "Point it at the folder that holds train.npz and test.npz")
    arrays: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for split in SPLITS:
        arrays[f"x_{split}"], arrays[f"y_{split}"], names[split] = _read_npz(root / f"{split}.npz")
    if names["train"] != names["test"]:
        raise DatasetError(
            f"{root}: train.npz and test.npz list different classes: {names['train']} vs {names['test']}"
        )
    loaded = Loaded(arrays, names["train"])
    check_loaded(loaded, str(root))
    return loaded


def load_imagefolder(root: str | os.PathLike[str], size: int = 32) -> Loaded:
    """`root/train/<class>/<image>` and `root/test/<class>/<image>`, as RGB uint8 (N, 3, size, size).

    Images are resized (bilinear, antialiased) to size x size regardless of aspect ratio. Class names are
    the sorted folder names, which must be the same in train and test.
    """
    import torch
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = Path(root)
    _require_dir(root, "image folder root", "It must contain train/<class>/ and test/<class>/ folders of images")
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
    arrays: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for split in SPLITS:
        sub = root / split
        _require_dir(sub, f"{split} folder", f"Put the {split} images under {sub}/<class>/")
        try:
            ds = ImageFolder(str(sub), transform=transform, allow_empty=True)
        except FileNotFoundError as e:  # no class folders
            raise DatasetError(f"{sub}: {e}. Put images under {sub}/<class>/") from e
        names[split] = list(ds.classes)
        images = [ds[i][0] for i in range(len(ds))]
        arrays[f"x_{split}"] = torch.stack(images).numpy() if images else np.zeros((0, 3, size, size), np.uint8)
        arrays[f"y_{split}"] = np.asarray(ds.targets, dtype=np.int64)
    if names["train"] != names["test"]:
        raise DatasetError(
            f"{root}: train and test have different class folders: {names['train']} vs {names['test']}; "
            "give both splits the same folders (an empty folder is allowed)"
        )
    loaded = Loaded(arrays, names["train"])
    check_loaded(loaded, str(root))
    return loaded


def check_loaded(loaded: Loaded, source: str) -> None:
    """Shapes, dtypes and label ranges every loader guarantees; raises `DatasetError` naming `source`."""
    a, k = loaded.arrays, len(loaded.class_names)
    shapes = set()
    for split in SPLITS:
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DatasetError(f"{source}: x_{split} is {x.dtype} {x.shape}; expected uint8 (N, C, H, W), C 1 or 3")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise DatasetError(f"{source}: y_{split} is {y.dtype} {y.shape}; expected int64 ({len(x)},)")
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise DatasetError(f"{source}: y_{split} has labels outside 0..{k - 1} ({k} class names)")
        shapes.add(x.shape[1:])
    if len(shapes) > 1:
        raise DatasetError(f"{source}: train and test images differ in shape: {sorted(shapes)}")


def balanced_rows(y: np.ndarray, n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices of `n` rows, n // K per class, the remainder going to randomly chosen classes."""
    per = np.full(num_classes, n // num_classes)
    per[rng.choice(num_classes, n % num_classes, replace=False)] += 1
    rows = []
    for c in range(num_classes):
        have = np.flatnonzero(y == c)
        if len(have) < per[c]:
            raise DatasetError(
                f"class {c} has {len(have)} rows, fewer than the {per[c]} a balanced subset of {n} needs"
            )
        rows.append(rng.choice(have, per[c], replace=False))
    return np.sort(np.concatenate(rows)).astype(np.int64)


def subset_rows(
    labels: dict[str, np.ndarray],
    k: int,
    n_train: int | None,
    n_test: int | None,
    seed: int,
    unit: str = "rows",
    n_unlabelled: int | None = None,
) -> dict[str, np.ndarray]:
    """The rows of the class-balanced subset of each split asked for (`n_train` train, `n_test` test; None
    keeps a split whole and is left out), drawn train first from one generator seeded `seed`: the rows
    `subset` takes of arrays and `pipeline.data.prepared.subset_files` of file lists. With `n_unlabelled`,
    key "unlabelled" holds that many of the train rows the train subset leaves out, drawn uniformly (not by
    class: their labels are not used) from the same generator after the test rows, so the labelled subset is
    the one drawn without them. `unit` names what a row is in the messages."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        if n is None:
            continue
        y = labels[split]
        if not 0 < n <= len(y):
            raise DatasetError(f"subset: n_{split}={n} must be between 1 and the {len(y)} {split} {unit}")
        try:
            out[split] = balanced_rows(y, n, k, rng)
        except DatasetError as e:
            raise DatasetError(f"subset of {split}: {e}; ask for fewer rows") from e
    if n_unlabelled is not None:
        out["unlabelled"] = _unlabelled_rows(len(labels["train"]), out.get("train"), n_unlabelled, rng, unit)
    return out


def _unlabelled_rows(
    n: int, labelled: np.ndarray | None, count: int, rng: np.random.Generator, unit: str
) -> np.ndarray:
    """`count` sorted train rows outside `labelled`, drawn uniformly with `rng`."""
    if labelled is None:
        raise DatasetError(
            "data.n_unlabelled needs data.n_train: the unlabelled rows are train rows the labelled subset leaves out; "
            "set n_train to the number of labelled rows"
        )
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), labelled)
    if not 0 < count <= len(rest):
        raise DatasetError(
            f"data.n_unlabelled = {count}: of the {n} train {unit}, {len(rest)} are outside the {len(labelled)}-row "
            f"labelled subset (data.n_train); ask for between 1 and {len(rest)}"
        )
    return np.sort(rng.choice(rest, count, replace=False)).astype(np.int64)


def subset(
    loaded: Loaded, n_train: int | None, n_test: int | None, seed: int = 0, n_unlabelled: int | None = None
) -> Loaded:
    """A class-balanced random subset: `n_train` train and `n_test` test rows (None keeps a split whole).

    Rows keep their original order. The same (data, n_train, n_test, seed) always gives the same rows.
    `source_index_<split>` in the result maps each row to its index in the original split. With
    `n_unlabelled` (a transfer set), that many of the train rows the subset leaves out follow its rows in
    the train split, in their original order, with label -1 (`pipeline.core.labels.UNLABELLED`). Nothing
    asked for (all three None): `loaded` itself.
    """
    if n_train is None and n_test is None and n_unlabelled is None:
        return loaded
    arrays = dict(loaded.arrays)
    labels = {split: arrays[f"y_{split}"] for split in ("train", "test")}
    drawn = subset_rows(labels, len(loaded.class_names), n_train, n_test, seed, n_unlabelled=n_unlabelled)
    extra = drawn.pop("unlabelled", None)
    for split, rows in drawn.items():
        y = arrays[f"y_{split}"]
        x_all = arrays[f"x_{split}"]
        # index of each kept row in the original split (composed with an earlier subset's)
        before = arrays.get(f"source_index_{split}", np.arange(len(y), dtype=np.int64))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x_all[rows], y[rows]
        arrays[f"source_index_{split}"] = before[rows].astype(np.int64)
        if split == "train" and extra is not None:
            arrays["x_train"] = np.concatenate([arrays["x_train"], x_all[extra]])
            arrays["y_train"] = np.concatenate([arrays["y_train"], np.full(len(extra), UNLABELLED, dtype=np.int64)])
            arrays["source_index_train"] = np.concatenate([arrays["source_index_train"], before[extra]])
    log.info(
        "subset (seed %d): %d train (%d unlabelled), %d test rows",
        seed,
        len(arrays["y_train"]),
        0 if extra is None else len(extra),
        len(arrays["y_test"]),
    )
    return Loaded(arrays, loaded.class_names)
