"""LogitStore: round trips across chunk boundaries, the completion marker, and refusals of unusable stores."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache.store import COMPRESSORS, MARKER, LogitStore, _marker_digest, check_temperature
from pipeline.core.errors import (
    CorruptStoreError,
    ForeignStoreError,
    IncompleteStoreError,
    ParamsError,
    StoreError,
    StoreNotFoundError,
)
from pipeline.core.files import atomic_path

FP = "ab" * 32  # dataset fingerprint (sha256 hex)


def provenance(num_classes: int, fingerprint: str = FP) -> dict:
    return {
        "generation": 1,
        "arch": "tiny",
        "seed": 3,
        "temperature": 1.0,
        "checkpoint_sha256": "cd" * 32,
        "dataset_fingerprint": fingerprint,
        "class_names": [f"c{i}" for i in range(num_classes)],
    }


def logits_for(rows: int, views: int, classes: int, seed: int = 0) -> np.ndarray:
    """Distinct, finite, float16-representable-range logits."""
    return np.random.default_rng(seed).normal(0, 4, size=(rows, views, classes))


def make_store(
    path: Path,
    data: dict[str, np.ndarray],
    chunk_rows: int = 4,
    dtype: str = "float32",
    seal: bool = True,
) -> LogitStore:
    first = next(iter(data.values()))
    views, classes = first.shape[1:]
    store = LogitStore.create(
        path, {s: len(a) for s, a in data.items()}, classes, views, dtype, chunk_rows, provenance(classes)
    )
    for split, a in data.items():
        if len(a):
            store.write(split, 0, a)
    if seal:
        store.seal()
    return store


@pytest.fixture
def sealed(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A sealed float32 store: train 10 rows (chunks of 4: rows 0-3, 4-7, 8-9), test 5 rows, 1 view, 3 classes."""
    data = {"train": logits_for(10, 1, 3, seed=1), "test": logits_for(5, 1, 3, seed=2)}
    path = tmp_path / "gen-1"
    make_store(path, data)
    return path, data


# -- round trips -----------------------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    rows = draw(st.integers(1, 40))
    cuts = draw(st.lists(st.integers(1, max(rows - 1, 1)), max_size=5, unique=True)) if rows > 1 else []
    views = draw(st.integers(1, 3))
    return {
        "rows": rows,
        "test_rows": draw(st.integers(0, 9)),
        "views": views,
        "test_views": draw(st.integers(1, views)),  # the export gives test 1
        "classes": draw(st.integers(1, 6)),
        "chunk_rows": draw(st.integers(1, 16)),
        "dtype": draw(st.sampled_from(["float16", "float32"])),
        "bounds": [0, *sorted(cuts), rows],  # writes [bounds[i], bounds[i+1]), straddling chunks at random
        "order": draw(st.permutations(range(len(cuts) + 1))),  # pieces written out of order
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=25, deadline=None)
@given(layout=layouts())
def test_round_trip_across_chunk_boundaries(layout: dict) -> None:
    views, classes, dtype = layout["views"], layout["classes"], layout["dtype"]
    train = logits_for(layout["rows"], views, classes, layout["seed"])
    test = logits_for(layout["test_rows"], layout["test_views"], classes, layout["seed"] + 1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "store"
        store = LogitStore.create(
            path,
            {"train": len(train), "test": len(test)},
            classes,
            views,
            dtype,
            layout["chunk_rows"],
            provenance(classes),
            split_views={"test": layout["test_views"]},
        )
        bounds = layout["bounds"]
        for i in layout["order"]:
            piece = train[bounds[i] : bounds[i + 1]]
            # (B, C) is accepted for single-view stores
            store.write("train", bounds[i], piece[:, 0] if views == 1 and i % 2 else piece)
        if len(test):
            store.write("test", 0, test)
        marker = store.seal()
        assert (path / MARKER).exists()
        assert marker["rows"] == {"train": len(train), "test": len(test)}

        opened = LogitStore.open(path, fingerprint=FP, rows=marker["rows"], num_classes=classes)
        for split, want in (("train", train), ("test", test)):
            got = opened.array(split)[:]
            assert got.dtype == np.dtype(dtype)
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want.astype(dtype))
        attrs = opened.attrs
        assert attrs["views"] == views and attrs["num_classes"] == classes and attrs["dtype"] == dtype
        assert attrs["split_views"] == {"train": views, "test": layout["test_views"]}
        assert attrs["class_names"] == [f"c{i}" for i in range(classes)]
        opened.verify()


def test_float16_is_stored_as_float16(tmp_path: Path) -> None:
    data = logits_for(7, 2, 3)
    make_store(tmp_path / "s", {"train": data}, chunk_rows=3, dtype="float16")
    arr = zarr.open_array(str(tmp_path / "s" / "train"), mode="r")
    assert arr.dtype == np.float16 and arr.chunks == (3, 2, 3)
    np.testing.assert_array_equal(arr[:], data.astype(np.float16))


@pytest.mark.parametrize(
    ("start", "shape", "why"),
    [
        (0, (2, 1, 4), "wrong class count"),
        (8, (4, 1, 3), "past the last row"),
        (-2, (2, 1, 3), "negative start"),
        (10, (1, 1, 3), "start at the end"),
        (0, (2, 2, 3), "wrong view count"),
    ],
)
def test_write_rejects_mismatched_shapes(tmp_path: Path, start: int, shape: tuple, why: str) -> None:
    store = LogitStore.create(tmp_path / "s", {"train": 10}, 3, 1, "float32", 4, provenance(3))
    with pytest.raises(ValueError, match="cannot write logits"):
        store.write("train", start, np.ones(shape))
    assert np.isnan(store.array("train")[:]).all(), f"{why}: nothing may be written"


def test_write_2d_into_multi_view_store_is_refused(tmp_path: Path) -> None:
    store = LogitStore.create(tmp_path / "s", {"train": 4}, 3, 2, "float32", 4, provenance(3))
    with pytest.raises(ValueError, match=r"expected \(4, 2, 3\)"):
        store.write("train", 0, np.ones((4, 3)))  # would otherwise be copied into every view


# -- completion marker and refusals ----------------------------------------------------------------------


def test_unsealed_store_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "gen-1"
    make_store(path, {"train": logits_for(10, 1, 3)}, seal=False)
    assert not (path / MARKER).exists()
    with pytest.raises(IncompleteStoreError) as e:
        LogitStore.open(path)
    msg = str(e.value)
    assert str(path) in msg and MARKER in msg and "export-logits" in msg


def test_deleted_marker_is_incomplete(sealed) -> None:
    path, _ = sealed
    LogitStore.open(path)  # complete before
    (path / MARKER).unlink()
    with pytest.raises(IncompleteStoreError, match="incomplete store") as e:
        LogitStore.open(path)
    assert str(path) in str(e.value)


def test_recreating_over_a_sealed_store_drops_its_marker(sealed) -> None:
    path, data = sealed
    store = LogitStore.create(path, {"train": 10, "test": 5}, 3, 1, "float32", 4, provenance(3))
    store.write("train", 0, data["train"])  # interrupted before 'test'
    with pytest.raises(IncompleteStoreError):
        LogitStore.open(path)


def test_damaged_marker(sealed) -> None:
    path, _ = sealed
    (path / MARKER).write_text("{not json")
    with pytest.raises(StoreError, match="damaged completion marker") as e:
        LogitStore.open(path)
    assert str(path) in str(e.value)


def test_no_store(tmp_path: Path) -> None:
    path = tmp_path / "gen-9"
    with pytest.raises(StoreNotFoundError) as e:
        LogitStore.open(path)
    assert isinstance(e.value, FileNotFoundError)
    assert str(path) in str(e.value) and "export-logits" in str(e.value)


def test_open_checks_against_the_dataset(sealed) -> None:
    path, _ = sealed
    ok = LogitStore.open(path, fingerprint=FP, rows={"train": 10, "test": 5}, num_classes=3)
    assert ok.attrs["dataset_fingerprint"] == FP

    with pytest.raises(ForeignStoreError, match="another dataset") as e:
        LogitStore.open(path, fingerprint="ef" * 32)
    assert str(path) in str(e.value) and "Re-export" in str(e.value)

    with pytest.raises(ForeignStoreError, match="has 3 classes, the dataset has 10") as e:
        LogitStore.open(path, fingerprint=FP, num_classes=10)
    assert str(path) in str(e.value) and "Re-export" in str(e.value)

    with pytest.raises(ForeignStoreError, match="'train' has 10 rows, the dataset has 11") as e:
        LogitStore.open(path, fingerprint=FP, rows={"train": 11})
    assert str(path) in str(e.value) and "Re-export" in str(e.value)

    with pytest.raises(ForeignStoreError, match="has no 'val' split") as e:
        LogitStore.open(path, rows={"val": 3})
    assert str(path) in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_seal_refuses_non_finite_rows(tmp_path: Path, bad: float) -> None:
    path = tmp_path / "gen-1"
    data = logits_for(10, 2, 3)
    data[6, 1, 2] = bad
    data[9, 0, 0] = bad
    store = make_store(path, {"train": data}, seal=False)
    with pytest.raises(CorruptStoreError) as e:
        store.seal()
    msg = str(e.value)
    assert str(path) in msg and "2 non-finite rows in 'train' (first: row 6)" in msg
    assert "not marked complete" in msg
    assert not (path / MARKER).exists()
    with pytest.raises(IncompleteStoreError):
        LogitStore.open(path)


def test_seal_refuses_a_chunk_never_written(tmp_path: Path) -> None:
    path = tmp_path / "gen-1"
    data = logits_for(10, 1, 3)
    store = LogitStore.create(path, {"train": 10}, 3, 1, "float32", 4, provenance(3))
    store.write("train", 0, data[:4])
    store.write("train", 8, data[8:])  # rows 4-7 (the second chunk) never written
    with pytest.raises(CorruptStoreError, match=r"4 non-finite rows in 'train' \(first: row 4\)") as e:
        store.seal()
    assert str(path) in str(e.value)
    assert not (path / MARKER).exists()


def test_seal_refuses_a_split_never_written(tmp_path: Path) -> None:
    path = tmp_path / "gen-1"
    store = LogitStore.create(path, {"train": 4, "test": 3}, 3, 1, "float32", 4, provenance(3))
    store.write("train", 0, logits_for(4, 1, 3))  # export killed before 'test'
    with pytest.raises(CorruptStoreError, match=r"3 non-finite rows in 'test' \(first: row 0\)"):
        store.seal()
    assert not (path / MARKER).exists()


def test_verify_detects_content_changed_after_sealing(sealed) -> None:
    path, data = sealed
    store = LogitStore.open(path)
    store.verify()
    arr = zarr.open_array(str(path / "train"), mode="r+")
    arr[5, 0, 1] = data["train"][5, 0, 1] + 1.0  # still finite: only the hash can tell
    with pytest.raises(CorruptStoreError, match="'train' content differs from its marker") as e:
        LogitStore.open(path).verify()
    assert str(path) in str(e.value)


def test_verify_detects_a_deleted_chunk(sealed) -> None:
    path, _ = sealed
    chunk = path / "train" / "c" / "1" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    with pytest.raises(CorruptStoreError, match="differs from its marker"):
        LogitStore.open(path).verify()


def test_shape_disagreeing_with_marker_is_corrupt(sealed) -> None:
    path, _ = sealed
    marker = json.loads((path / MARKER).read_text())
    marker["attributes"]["rows"]["train"] = 9
    marker["attributes"]["marker_sha256"] = _marker_digest(marker["attributes"])  # consistent, for another reason wrong
    (path / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CorruptStoreError, match="array 'train' has shape") as e:
        LogitStore.open(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["dataset_fingerprint", "layout", "slots", "split_views", "augmentation"])
def test_a_store_missing_a_required_attribute_is_refused(sealed, name: str) -> None:
    """Provenance, and the format attributes every store of this version has: nothing falls back to a
    default for a store written by another tool or an unreleased version."""
    path, _ = sealed
    edit_attrs(path, drop=name)
    with pytest.raises(CorruptStoreError, match=rf"missing attributes \['{name}'\]") as e:
        LogitStore.open(path)
    assert str(path) in str(e.value) and "re-export it with this version" in str(e.value)


def test_a_store_of_another_format_tag_is_refused(sealed) -> None:
    path, _ = sealed
    edit_attrs(path, format="bancache-logits-v0")
    with pytest.raises(CorruptStoreError, match=r"not a bancache logit store \(format 'bancache-logits-v0'\)"):
        LogitStore.open(path)


# -- atomic writes -------------------------------------------------------------------------------------


def test_atomic_path_keeps_the_old_file_when_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    target.write_text("old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_text("half-written")
            raise Boom
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["m.json"]


def test_atomic_path_on_a_new_file_leaves_nothing_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "sub" / "new.json") as tmp:
            tmp.write_text("x")
            raise RuntimeError
    assert os.listdir(tmp_path / "sub") == []


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible until the body finishes
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["m.json"]


# -- augmented views and sparse layouts -------------------------------------------------------------------

AUG = {"kind": "crop+flip", "pad": 4, "size": 32, "seed": 0}


def sparse_store(path: Path, rows: int = 10, views: int = 3, slots: int = 2, chunk_rows: int = 4) -> tuple:
    """A topk store of 5 classes with augmented views: values, class indices, kept mass and crop/flips."""
    rng = np.random.default_rng(0)
    arrays = {
        "logits": rng.normal(0, 3, size=(rows, views, slots)),
        "idx": rng.integers(0, 5, size=(rows, views, slots)).astype(np.int16),
        "mass": rng.uniform(0, 1, size=(rows, views)).astype(np.float32),
        "aug": np.stack(
            [rng.integers(0, 9, (rows, views)), rng.integers(0, 9, (rows, views)), rng.integers(0, 2, (rows, views))],
            axis=-1,
        ).astype(np.int16),
    }
    store = LogitStore.create(
        path,
        {"train": rows},
        5,
        views,
        "float32",
        chunk_rows,
        provenance(5),
        layout="topk",
        slots=slots,
        augmentation=AUG,
    )
    return store, arrays


def test_multi_view_sparse_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store, arrays = sparse_store(path)
    store.write("train", 0, arrays["logits"][:6], **{k: v[:6] for k, v in arrays.items() if k != "logits"})
    store.write("train", 6, arrays["logits"][6:], **{k: v[6:] for k, v in arrays.items() if k != "logits"})
    marker = store.seal()
    assert set(marker["sha256"]) == {"train", "train_idx", "train_mass", "train_aug"}
    assert marker["rows"] == {"train": 10}
    opened = LogitStore.open(path, fingerprint=FP, rows={"train": 10}, num_classes=5)
    attrs = opened.attrs
    assert attrs["layout"] == "topk" and attrs["slots"] == 2 and attrs["views"] == 3 and attrs["augmentation"] == AUG
    assert attrs["retained_mass"] == {"train": pytest.approx(float(arrays["mass"].astype(np.float64).mean()))}
    for name, key in (("train", "logits"), ("train_idx", "idx"), ("train_mass", "mass"), ("train_aug", "aug")):
        np.testing.assert_array_equal(
            zarr.open_array(str(path / name), mode="r")[:], arrays[key].astype(opened.array(name).dtype)
        )
    opened.verify()
    zarr.open_array(str(path / "train_aug"), mode="r+")[3, 1, 0] = arrays["aug"][3, 1, 0] ^ 1
    with pytest.raises(CorruptStoreError, match="'train_aug' content differs from its marker"):
        LogitStore.open(path).verify()


def test_dense_single_view_store_has_no_extra_arrays(sealed) -> None:
    path, _ = sealed
    attrs = LogitStore.open(path).attrs
    assert attrs["layout"] == "dense" and attrs["slots"] == 3 and attrs["augmentation"] is None
    assert attrs["retained_mass"] == {"train": 1.0, "test": 1.0}
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == [
        "complete",
        "test",
        "train",
    ]  # complete: the marker group


def test_seal_refuses_an_unwritten_aug_chunk(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store, arrays = sparse_store(path)
    store.write("train", 0, arrays["logits"], idx=arrays["idx"], mass=arrays["mass"], aug=arrays["aug"])
    zarr.open_array(str(path / "train_aug"), mode="r+")[4:8] = -1  # as if the chunk were never written
    with pytest.raises(CorruptStoreError, match=r"4 non-finite rows in 'train_aug' \(first: row 4\)"):
        store.seal()
    assert not (path / MARKER).exists()


def test_write_needs_every_array_of_the_store_and_checks_all_shapes_first(tmp_path: Path) -> None:
    store, arrays = sparse_store(tmp_path / "s")
    with pytest.raises(ValueError, match="'train_aug' is missing"):
        store.write("train", 0, arrays["logits"], idx=arrays["idx"], mass=arrays["mass"])
    with pytest.raises(ValueError, match=r"cannot write logits of shape \(10, 3\) at row 0 of 'train_aug'"):
        store.write("train", 0, arrays["logits"], idx=arrays["idx"], mass=arrays["mass"], aug=arrays["aug"][:, :, 0])
    assert np.isnan(store.array("train")[:]).all(), "nothing may be written when one array does not fit"
    dense = LogitStore.create(tmp_path / "d", {"train": 4}, 3, 1, "float32", 4, provenance(3))
    with pytest.raises(ValueError, match="'train_aug' is not an array of this store"):
        dense.write("train", 0, np.ones((4, 3)), aug=np.zeros((4, 1, 3)))


def two_split_store(path: Path, test_views: int, rows: tuple[int, int] = (10, 5)) -> tuple[LogitStore, dict]:
    """A sealed topk store of 3 train views with their crops/flips and `test_views` test views, every array
    written from `arrays[split][key]` (keys as `LogitStore.write` takes them)."""
    rng = np.random.default_rng(1)
    store = LogitStore.create(
        path,
        dict(zip(("train", "test"), rows, strict=True)),
        5,
        3,
        "float32",
        4,
        provenance(5),
        layout="topk",
        slots=2,
        augmentation=AUG,
        split_views={"test": test_views},
    )
    arrays = {}
    for split, n in zip(("train", "test"), rows, strict=True):
        v = 3 if split == "train" else test_views
        arrays[split] = {
            "logits": rng.normal(0, 3, size=(n, v, 2)),
            "idx": rng.integers(0, 5, size=(n, v, 2)).astype(np.int16),
            "mass": rng.uniform(0, 1, size=(n, v)).astype(np.float32),
            **({"aug": rng.integers(0, 9, size=(n, v, 3)).astype(np.int16)} if v > 1 else {}),
        }
        store.write(split, 0, **arrays[split])
    store.seal()
    return store, arrays


def edit_attrs(path: Path, drop: str | None = None, **changes) -> None:
    """Remove attribute `drop` and set `changes` in the store's attributes (they are not hashed into the
    marker, so the store stays sealed)."""
    group = zarr.open_group(str(path), mode="r+")
    attrs = group.attrs.asdict() | changes
    if drop is not None:
        del attrs[drop]
    group.attrs.clear()
    group.attrs.update(attrs)


def test_a_split_with_one_view_has_one_view_arrays_and_no_aug(tmp_path: Path) -> None:
    store, arrays = two_split_store(tmp_path / "s", test_views=1)
    assert store.attrs["split_views"] == {"train": 3, "test": 1} and store.attrs["views"] == 3
    names = ["train", "train_idx", "train_mass", "train_aug", "test", "test_idx", "test_mass"]
    assert store.array_names() == names
    assert not (tmp_path / "s" / "test_aug").exists()
    shapes = {n: tuple(store.array(n).shape) for n in names}
    assert shapes["test"] == (5, 1, 2) and shapes["test_idx"] == (5, 1, 2) and shapes["test_mass"] == (5, 1)
    with pytest.raises(ValueError, match="'test_aug' is not an array of this store"):
        store.write("test", 0, **arrays["test"], aug=np.zeros((5, 1, 3), np.int16))
    opened = LogitStore.open(tmp_path / "s", fingerprint=FP, rows={"train": 10, "test": 5}, num_classes=5)
    assert set(opened.marker["sha256"]) == set(names)
    opened.verify()
    np.testing.assert_array_equal(opened.array("test_idx")[:], arrays["test"]["idx"])
    mass = arrays["test"]["mass"].astype(np.float64).mean()
    assert opened.attrs["retained_mass"]["test"] == pytest.approx(float(mass))


def test_a_store_without_split_views_is_refused_not_read_as_every_view_in_every_split(tmp_path: Path) -> None:
    """No released version wrote a store without `split_views`: it is not read with a guessed view count."""
    path = tmp_path / "old"
    two_split_store(path, test_views=3)
    edit_attrs(path, drop="split_views")
    with pytest.raises(CorruptStoreError, match=r"missing attributes \['split_views'\]\); re-export it with this"):
        LogitStore.open(path, fingerprint=FP, rows={"train": 10, "test": 5}, num_classes=5)


@pytest.mark.parametrize("split_views", [{"test": 0}, {"test": 4}, {"val": 1}])
def test_create_refuses_impossible_split_views(tmp_path: Path, split_views: dict) -> None:
    with pytest.raises(ValueError, match=r"split_views .*: give splits of \['train', 'test'\] 1..3 views each"):
        LogitStore.create(
            tmp_path / "s", {"train": 2, "test": 2}, 3, 3, "float32", 4, provenance(3), split_views=split_views
        )


def test_split_views_disagreeing_with_the_arrays_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "s"
    data = {"train": logits_for(6, 2, 3), "test": logits_for(5, 1, 3)}
    store = LogitStore.create(path, {"train": 6, "test": 5}, 3, 2, "float32", 4, provenance(3), split_views={"test": 1})
    for split, a in data.items():
        store.write(split, 0, a)
    store.seal()
    LogitStore.open(path)
    edit_attrs(path, split_views={"train": 2, "test": 2})  # now the attributes say test has 2 views
    with pytest.raises(
        CorruptStoreError, match=r"array 'test' has shape \(5, 1, 3\), attributes and marker say \(5, 2, 3\)"
    ):
        LogitStore.open(path)


def test_only_a_sampled_store_refuses_a_temperature_other_than_1() -> None:
    for layout in ("dense", "topk"):
        check_temperature("cache/gen-0", layout, 2.0, "students.1.temperature")
    check_temperature("cache/gen-0", "sampled", 1.0, "students.1.temperature")
    with pytest.raises(ParamsError, match=r"students.1.temperature = 2.0: .*cache/gen-0 holds sampled .* T = 1 only"):
        check_temperature("cache/gen-0", "sampled", 2.0, "students.1.temperature")


# -- verification on read ------------------------------------------------------------------------------


def test_new_stores_have_zstd_checksums(sealed) -> None:
    path, _ = sealed
    meta = json.loads((path / "train" / "zarr.json").read_text())
    zstd = [c for c in meta["codecs"] if c["name"] == "zstd"]
    assert zstd and zstd[0]["configuration"]["checksum"] is True
    assert COMPRESSORS[0].checksum


def test_flipped_bit_in_a_chunk_fails_its_zstd_checksum(sealed) -> None:
    path, _ = sealed
    chunk = path / "train" / "c" / "1" / "0" / "0"
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0x10  # inside the compressed payload
    chunk.write_bytes(bytes(blob))
    store = LogitStore.open(path, verify=False)  # even unverified, a damaged chunk cannot decode silently
    with pytest.raises(CorruptStoreError, match="rows 4..7 are unreadable"):
        store.read("train", 4, 8)


def test_sequential_reads_are_verified_against_the_marker(sealed) -> None:
    path, data = sealed
    zarr.open_array(str(path / "train"), mode="r+")[5] = data["train"][5] + 1.0  # finite, wrong, decodes fine
    store = LogitStore.open(path)
    blocks = store.blocks("train")
    start, first = next(blocks)  # rows before the end are handed out; the last read raises
    assert start == 0 and np.array_equal(first, data["train"][:4].astype(np.float32))
    with pytest.raises(CorruptStoreError, match="'train' content differs from its marker") as e:
        list(blocks)
    assert str(path) in str(e.value) and "re-export" in str(e.value)
    np.testing.assert_array_equal(store.read("test", 0, 5), data["test"].astype(np.float32))  # another array: fine
    trusted = LogitStore.open(path, verify=False)  # the documented way to skip the hashing
    assert sum(len(b) for _, b in trusted.blocks("train")) == 10


def test_unchanged_store_reads_and_rereads_cleanly(sealed) -> None:
    path, data = sealed
    store = LogitStore.open(path)
    for _ in range(2):  # a second pass starts a new hash
        got = np.concatenate([b for _, b in store.blocks("train")])
        np.testing.assert_array_equal(got, data["train"].astype(np.float32))
    np.testing.assert_array_equal(store.read("train", 3, 9), data["train"][3:9].astype(np.float32))  # not hashed


@pytest.mark.parametrize("split", ["train", "test"])
def test_edited_sha256_in_the_marker_is_refused(sealed, split: str) -> None:
    path, _ = sealed
    meta = json.loads((path / MARKER).read_text())  # the marker group's zarr.json
    marker = meta["attributes"]
    marker["sha256"][split] = "0" * 64
    (path / MARKER).write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match="differs from its own marker_sha256") as e:
        LogitStore.open(path, verify=False)  # refused at open, whichever array the reader wants
    assert str(path) in str(e.value)


def test_marker_without_self_hash_is_refused(sealed) -> None:
    """Every marker this version writes has its self-hash; one without it is not checked by the arrays alone."""
    path, _ = sealed
    meta = json.loads((path / MARKER).read_text())  # the marker group's zarr.json
    del meta["attributes"]["marker_sha256"]
    (path / MARKER).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"damaged completion marker \(missing entries \['marker_sha256'\]\)"):
        LogitStore.open(path, verify=False)


def test_marker_listing_other_arrays_is_refused(sealed) -> None:
    path, _ = sealed
    meta = json.loads((path / MARKER).read_text())  # the marker group's zarr.json
    marker = meta["attributes"]
    marker["sha256"]["trian"] = marker["sha256"].pop("train")
    marker["marker_sha256"] = _marker_digest(marker)
    (path / MARKER).write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match=r"lists arrays \['test', 'trian'\]"):
        LogitStore.open(path)
