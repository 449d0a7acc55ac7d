"""Store formats (pipeline/cache/formats.py): a fourth format added in one place (the registry) goes through
the export, the store, the host reader and the device reader; names the registry does not hold are refused
with the ones it does."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.device import DeviceTargets, resident_bytes
from pipeline.cache.formats import LAYOUTS, ExtraArray, FormatOptions, StoreFormat, index_dtype
from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import LogitStore, check_temperature
from pipeline.core.errors import CorruptStoreError, ParamsError, StoreError
from pipeline.data.prepared import PreparedData, load_prepared, write_prepared
from pipeline.losses import Probs, Teacher
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.registry import build_model
from pipeline.params import ExportParams, parse_section
from pipeline.teachers.export import export_logits

CPU = torch.device("cpu")


class Argmax(StoreFormat):
    """A toy format: each (row, view) keeps only its top class (count 1) and that class's probability; the
    target is the one-hot distribution of the top class at any temperature."""

    name = "argmax"
    logit_values = False  # the values are counts
    read = ("idx",)

    def extra_arrays(self, num_classes: int) -> tuple[ExtraArray, ...]:
        return (ExtraArray("idx", True, index_dtype(num_classes), -1), ExtraArray("mass", False, "float32", np.nan))

    def slots(self, num_classes: int, options: FormatOptions) -> int:
        return 1

    def attributes(self, options: FormatOptions) -> dict[str, Any]:
        return {"argmax_of": "softmax"}

    def _encode(
        self, logits: torch.Tensor, slots: int, options: FormatOptions, generator: torch.Generator
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        p = torch.softmax(logits.double(), dim=-1)
        mass, idx = p.max(dim=-1, keepdim=True)
        return np.ones(idx.shape, np.float32), {"idx": idx.numpy().astype(np.int16), "mass": mass[..., 0].numpy()}

    def expand(
        self,
        path: str | os.PathLike[str],
        attrs: Mapping[str, Any],
        values: torch.Tensor,
        arrays: dict[str, torch.Tensor],
        temperature: float,
    ) -> Teacher:
        b, c = len(values), attrs["num_classes"]
        return Probs(torch.zeros(b, c, device=values.device).scatter_(1, arrays["idx"].long(), values.float()))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, Path]:
    """24 + 6 random 3x8x8 uint8 images of 5 classes and an untrained cnn3 checkpoint on them."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (24, 3, 8, 8), dtype=np.uint8),
        "y_train": (np.arange(24) % 5).astype(np.int64),
        "x_test": rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8),
        "y_test": (np.arange(6) % 5).astype(np.int64),
    }
    write_prepared(root / "d.h5", arrays, list("abcde"), "npz", 0.25, 0)
    data = load_prepared(root / "d.h5")
    torch.manual_seed(0)
    model = build_model("cnn3", data.input_shape, data.num_classes)
    model.set_stats(data.channel_mean, data.channel_std)
    meta = {
        "arch": "cnn3",
        "input_shape": list(data.input_shape),
        "num_classes": 5,
        "generation": 0,
        "seed": 0,
        "dataset_fingerprint": data.fingerprint,
    }
    save_checkpoint(root / "m.pt", model, meta)
    return data, root / "m.pt"


@pytest.fixture
def argmax(monkeypatch: pytest.MonkeyPatch) -> StoreFormat:
    """The toy format, registered for one test: the only change a fourth format needs."""
    fmt = Argmax()
    monkeypatch.setitem(LAYOUTS, fmt.name, fmt)
    return fmt


def test_a_fourth_format_goes_through_export_store_and_both_readers(images, argmax, tmp_path: Path) -> None:
    data, ckpt = images
    export_logits(ckpt, data, tmp_path / "d", ExportParams(views=2, dtype="float32", chunk_rows=8, device="cpu"), CPU)
    params = parse_section(ExportParams, "export", {"layout": "argmax", "views": 2, "chunk_rows": 8, "device": "cpu"})
    attrs = export_logits(ckpt, data, tmp_path / "a", params, CPU)
    assert attrs["layout"] == "argmax" and attrs["slots"] == 1 and attrs["argmax_of"] == "softmax"
    assert attrs["logit_shift"] == "none"  # counts are not logits: float16 values are stored as they are
    store = LogitStore.open(tmp_path / "a")
    assert store.format is argmax
    train_arrays = [n for n in store.array_names() if n.startswith("train")]
    assert train_arrays == ["train", "train_idx", "train_mass", "train_aug", "train_labels"]
    store.verify()
    dense = LogitStore.open(tmp_path / "d").array("train")[:]  # (24, 2, 5) float32 logits of the same views
    top = dense.argmax(axis=-1)
    np.testing.assert_array_equal(store.array("train_idx")[:][..., 0], top)
    np.testing.assert_array_equal(store.array("train")[:], np.ones((24, 2, 1), np.float16))
    p = torch.softmax(torch.from_numpy(dense).double(), -1).numpy()
    assert attrs["retained_mass"]["train"] == pytest.approx(p.max(-1).mean(), rel=1e-6)
    with pytest.raises(StoreError, match=r"layout 'argmax' keeps only part of each row's logits"):
        store.require_dense("the ensemble")

    rows, views = np.array([23, 0, 7, 7, 12]), np.array([1, 0, 1, 0, 1])
    host = CachedTargets(tmp_path / "a", "train", data.fingerprint, 24, 5)
    want = np.eye(5, dtype=np.float32)[top[rows, views]]
    got = host.teacher(rows, views=views, temperature=3.0)
    assert isinstance(got, Probs)
    np.testing.assert_array_equal(got.p.numpy(), want)
    device = DeviceTargets(host, CPU, data.fit_index(), all_views=True)
    on_device = device.teacher(torch.from_numpy(rows), views=torch.from_numpy(views), temperature=3.0)
    assert isinstance(on_device, Probs) and torch.equal(on_device.p, got.p)
    default_view = DeviceTargets(host, CPU, data.fit_index(), all_views=False)
    first = default_view.teacher(torch.from_numpy(rows), views=None, temperature=1.0)
    np.testing.assert_array_equal(first.p.numpy(), np.eye(5, dtype=np.float32)[top[rows, 0]])
    # the device holds what the format reads (values and idx, and the crops/flips), not its mass array
    need = resident_bytes(data, host, all_views=True) - data.x_train.nbytes - data.y_train.nbytes
    assert need == 24 * 2 * (1 * 2 + 1 * 2 + 3 * 2)  # float16 counts, int16 classes, int16 (top, left, flip)


def test_unknown_layout_names_are_refused_with_the_known_ones(images, argmax, tmp_path: Path) -> None:
    data, ckpt = images
    export_logits(ckpt, data, tmp_path / "a", ExportParams(layout="argmax", device="cpu"), CPU)
    del LAYOUTS["argmax"]  # a version that does not know the format (monkeypatch restores it afterwards)
    with pytest.raises(ParamsError, match=r"export.layout = 'argmax': allowed values are dense, topk, sampled"):
        parse_section(ExportParams, "export", {"layout": "argmax"})
    with pytest.raises(
        CorruptStoreError, match=r"store layout 'argmax' is not one this version reads \(known: dense, topk, sampled\)"
    ) as e:
        LogitStore.open(tmp_path / "a")
    assert str(tmp_path / "a") in str(e.value) and "re-export the store with this version" in str(e.value)
    with pytest.raises(ValueError, match=r"layout 'argmax': allowed values are dense, topk, sampled"):
        LogitStore.create(tmp_path / "b", {"train": 2}, 5, 1, "float32", 4, {}, layout="argmax")


def test_an_edited_layout_attribute_is_refused(images, tmp_path: Path) -> None:
    data, ckpt = images
    export_logits(ckpt, data, tmp_path / "s", ExportParams(device="cpu"), CPU)
    group = zarr.open_group(str(tmp_path / "s"), mode="r+")
    group.attrs["layout"] = "Dense"
    with pytest.raises(CorruptStoreError, match=r"store layout 'Dense' is not one this version reads"):
        CachedTargets(tmp_path / "s", "train", data.fingerprint, 24, 5)


def test_only_formats_with_a_t1_reason_refuse_other_temperatures(argmax) -> None:
    """The sampled format's refusal names the formats that serve any temperature, from the registry."""
    check_temperature("cache/gen-0", argmax, 4.0, "students.1.temperature")
    with pytest.raises(ParamsError, match=r"Use temperature: 1.0 or a dense or topk or argmax store"):
        check_temperature("cache/gen-0", "sampled", 4.0, "students.1.temperature")
