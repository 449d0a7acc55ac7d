"""Dataset loaders on fabricated files: torchvision's CIFAR layout, the shared npz layout, ImageFolder.

CIFAR fabrication: the batch files are written exactly as the real archive stores them (pickled dicts with
`data` uint8 (N, 3072) rows in CHW order and `labels` / `fine_labels`, plus the meta pickle). torchvision
checks each file's md5 against the real archive's, which fabricated files cannot match; the tests replace
only that table of expected checksums (`train_list`, `test_list`, `meta` on the torchvision class) with the
fabricated files' md5, so torchvision's own reader and integrity check run unchanged. One test keeps the
real table and checks that the md5 failure becomes a `DatasetError`.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from pipeline.core.errors import DatasetError
from pipeline.data.sources import Loaded, load_cifar, load_dataset, load_imagefolder, load_npz, subset

PER_CLASS = {"train": 2, "test": 1}  # images per class per batch file


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> str:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def fabricate_cifar(
    root: Path, cls: type[CIFAR10], num_classes: int, label_key: str, meta_key: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Write `cls`'s files under root, PER_CLASS images per class in each batch file.

    Returns the CHW images and labels written, and the md5 of each file.
    """
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    out: dict[str, list[np.ndarray]] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    md5 = {}
    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        for i, (name, _) in enumerate(files):
            y = np.repeat(np.arange(num_classes), PER_CLASS[split])
            x = _images(len(y), seed=100 * (split == "test") + i)
            entry = {"batch_label": name, "data": x.reshape(len(y), -1), label_key: y.tolist(), "filenames": []}
            md5[name] = _dump(folder / name, entry)
            out[f"x_{split}"].append(x)
            out[f"y_{split}"].append(y)
    names = [f"class{c:03d}" for c in range(num_classes)]
    md5["meta"] = _dump(folder / cls.meta["filename"], {meta_key: names})
    return {k: np.concatenate(v) for k, v in out.items()}, md5


def trust_fabricated(monkeypatch: pytest.MonkeyPatch, cls: type[CIFAR10], md5: dict[str, str]) -> None:
    """Point torchvision's expected checksums at the fabricated files (its check still runs)."""
    monkeypatch.setattr(cls, "train_list", [[f, md5[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["meta"]})


Fabricated = tuple[Path, dict[str, np.ndarray], dict[str, str]]


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Fabricated:
    return (tmp_path, *fabricate_cifar(tmp_path, CIFAR10, 10, "labels", "label_names"))


def test_cifar10_reads_torchvision_layout(cifar10_root: Fabricated, monkeypatch: pytest.MonkeyPatch) -> None:
    root, expected, md5 = cifar10_root
    trust_fabricated(monkeypatch, CIFAR10, md5)
    loaded = load_cifar("cifar10", root)
    assert loaded.class_names == [f"class{c:03d}" for c in range(10)]
    a = loaded.arrays
    assert a["x_train"].shape == (5 * 20, 3, 32, 32) and a["x_test"].shape == (10, 3, 32, 32)
    assert a["x_train"].dtype == np.uint8 and a["y_train"].dtype == np.int64
    for k in ("x_train", "y_train", "x_test", "y_test"):  # CHW pixels and labels survive the HWC round trip
        np.testing.assert_array_equal(a[k], expected[k])


def test_cifar100_uses_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected, md5 = fabricate_cifar(tmp_path, CIFAR100, 100, "fine_labels", "fine_label_names")
    trust_fabricated(monkeypatch, CIFAR100, md5)
    loaded = load_dataset("cifar100", tmp_path)
    assert len(loaded.class_names) == 100 and loaded.class_names[99] == "class099"
    assert loaded.arrays["x_train"].shape == (200, 3, 32, 32) and loaded.arrays["y_test"].shape == (100,)
    np.testing.assert_array_equal(loaded.arrays["y_train"], expected["y_train"])
    np.testing.assert_array_equal(loaded.arrays["x_test"], expected["x_test"])


def test_cifar_md5_failure_is_a_dataset_error(cifar10_root: Fabricated) -> None:
    root, _, _ = cifar10_root  # torchvision's real checksums: the fabricated files fail them
    with pytest.raises(DatasetError, match="md5"):
        load_cifar("cifar10", root)


def test_cifar_missing_root_and_files(cifar10_root: Fabricated) -> None:
    root, _, _ = cifar10_root
    with pytest.raises(DatasetError, match="nowhere.*data.download: true"):
        load_cifar("cifar10", root / "nowhere")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing: data_batch_3"):
        load_cifar("cifar10", root)
    with pytest.raises(DatasetError, match="cifar-100-python"):
        load_cifar("cifar100", root)


def _write_npz(root: Path, n: int, classes: list[str], seed: int = 0, **override: np.ndarray) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "y": np.arange(n, dtype=np.int64) % len(classes),
        "classes": np.array(classes),
    }
    arrays.update(override)
    np.savez(root, **arrays)
    return arrays


def test_npz_importer(tmp_path: Path) -> None:
    classes = ["airplane", "automobile", "bird"]
    train = _write_npz(tmp_path / "train.npz", 12, classes, seed=1)
    test = _write_npz(tmp_path / "test.npz", 6, classes, seed=2)
    loaded = load_npz(tmp_path)
    assert loaded.class_names == classes
    np.testing.assert_array_equal(loaded.arrays["x_train"], train["x"].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(loaded.arrays["y_test"], test["y"])
    assert loaded.arrays["x_test"].flags.c_contiguous


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"x": np.zeros((6, 3, 32, 32), np.uint8)}, "looks NCHW"),
        ({"x": np.zeros((6, 32, 32, 3), np.float32)}, "float32"),
        ({"y": np.zeros(5, np.int64)}, "expected integer labels of shape \\(6,\\)"),
        ({"y": np.full(6, 3, np.int64)}, "outside 0..2"),
    ],
)
def test_npz_wrong_arrays(tmp_path: Path, override: dict, message: str) -> None:
    _write_npz(tmp_path / "train.npz", 6, ["a", "b", "c"], **override)
    _write_npz(tmp_path / "test.npz", 3, ["a", "b", "c"])
    with pytest.raises(DatasetError, match=message):
        load_npz(tmp_path)


def test_npz_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such directory"):
        load_npz(tmp_path / "absent")
    _write_npz(tmp_path / "train.npz", 3, ["a"])
    with pytest.raises(DatasetError, match="test.npz: file not found"):
        load_npz(tmp_path)
    _write_npz(tmp_path / "test.npz", 3, ["b"])
    with pytest.raises(DatasetError, match="different classes"):
        load_npz(tmp_path)


COLORS = {"cat": (255, 0, 0), "dog": (0, 128, 255)}


def _write_folder(root: Path, counts: dict[str, int]) -> None:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (10, 6), COLORS[cls]).save(root / cls / f"{i}.png")


def test_imagefolder_resizes_and_labels(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    _write_folder(tmp_path / "test", {"cat": 1, "dog": 1})
    loaded = load_imagefolder(tmp_path, size=4)
    assert loaded.class_names == ["cat", "dog"]
    x, y = loaded.arrays["x_train"], loaded.arrays["y_train"]
    assert x.shape == (5, 3, 4, 4) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1])
    # A solid colour stays exactly that colour through the resize.
    np.testing.assert_array_equal(x[0], np.broadcast_to(np.array(COLORS["cat"], np.uint8)[:, None, None], (3, 4, 4)))
    np.testing.assert_array_equal(loaded.arrays["x_test"][1, :, 0, 0], COLORS["dog"])


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="image folder root not found"):
        load_imagefolder(tmp_path / "absent")
    _write_folder(tmp_path / "train", {"cat": 1, "dog": 1})
    with pytest.raises(DatasetError, match="test folder not found"):
        load_imagefolder(tmp_path)
    _write_folder(tmp_path / "test", {"cat": 1})
    with pytest.raises(DatasetError, match="different class folders"):
        load_imagefolder(tmp_path)


def _labelled(n_per_class: list[int]) -> Loaded:
    y = np.concatenate([np.full(n, c, np.int64) for c, n in enumerate(n_per_class)])
    x = np.arange(len(y), dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 2, 2), np.uint8)
    return Loaded({"x_train": x, "y_train": y, "x_test": x[::2], "y_test": y[::2]}, ["a", "b", "c"])


def test_subset_is_balanced_seeded_and_consistent() -> None:
    data = _labelled([10, 12, 8])
    s = subset(data, 7, 6, seed=3)
    counts = np.bincount(s.arrays["y_train"], minlength=3)
    assert sorted(counts) == [2, 2, 3]
    np.testing.assert_array_equal(np.bincount(s.arrays["y_test"], minlength=3), [2, 2, 2])
    # x rows travel with their labels (x encodes the original row), in the original order.
    rows = s.arrays["x_train"][:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(data.arrays["y_train"][rows], s.arrays["y_train"])
    assert (np.diff(rows) > 0).all()
    again = subset(data, 7, 6, seed=3)
    np.testing.assert_array_equal(again.arrays["x_train"], s.arrays["x_train"])
    other = subset(data, 7, 6, seed=4)
    assert not np.array_equal(other.arrays["x_train"], s.arrays["x_train"])


def test_subset_limits() -> None:
    data = _labelled([10, 12, 8])
    assert len(subset(data, None, 3).arrays["y_train"]) == 30
    with pytest.raises(DatasetError, match="class 2 has 8 rows"):
        subset(data, 27, None)
    with pytest.raises(DatasetError, match="n_test=0"):
        subset(data, None, 0)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    _write_npz(tmp_path / "train.npz", 30, ["a", "b", "c"])
    _write_npz(tmp_path / "test.npz", 9, ["a", "b", "c"])
    loaded = load_dataset("npz", tmp_path, n_train=6, n_test=3, seed=0)
    np.testing.assert_array_equal(np.bincount(loaded.arrays["y_train"]), [2, 2, 2])
    with pytest.raises(DatasetError, match="unknown dataset source 'svhn'"):
        load_dataset("svhn", tmp_path)
