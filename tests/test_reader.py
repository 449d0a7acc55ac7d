"""CachedTargets: rows keyed by dataset index, refusals of unusable stores, and pickling for loader workers."""

from __future__ import annotations

import inspect
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import MARKER, LogitStore
from pipeline.core.errors import CorruptStoreError, ForeignStoreError, IncompleteStoreError, StoreNotFoundError
from pipeline.data.prepared import IndexedDataset
from pipeline.losses import Probs, soften


@pytest.fixture(autouse=True, params=["in-memory", "streaming"])
def read_path(request, monkeypatch):
    """Run every reader test on both read paths: the split loaded into memory, and streamed by chunk through
    a cache smaller than the store (3 of its 8 chunks, 1 prefetched)."""
    if request.param == "streaming":
        names = list(inspect.signature(CachedTargets.__init__).parameters)[1:]
        defaults = dict(
            zip(names[-len(CachedTargets.__init__.__defaults__) :], CachedTargets.__init__.__defaults__, strict=True)
        )
        defaults.update(max_memory_bytes=0, cache_chunks=3, prefetch_chunks=1)  # 0: never load into memory
        monkeypatch.setattr(CachedTargets.__init__, "__defaults__", tuple(defaults.values()))
    return request.param


FP = "ab" * 32
N, V, C, CHUNK = 37, 2, 4, 5  # rows 0-4, 5-9, ..., 35-36: 8 chunks, the last one partial


def table(n: int = N, views: int = V, classes: int = C) -> np.ndarray:
    """Logits that name their own position: row r, view v, class c holds r + v / 10 + c / 100."""
    r, v, c = np.meshgrid(np.arange(n), np.arange(views), np.arange(classes), indexing="ij")
    return (r + v / 10 + c / 100).astype(np.float32)


def write_store(path: Path, data: np.ndarray, chunk_rows: int = CHUNK, dtype: str = "float32", seal: bool = True):
    n, views, classes = data.shape
    store = LogitStore.create(
        path,
        {"train": n},
        classes,
        views,
        dtype,
        chunk_rows,
        {
            "generation": 0,
            "arch": "tiny",
            "seed": 0,
            "temperature": 1.0,
            "checkpoint_sha256": "cd" * 32,
            "dataset_fingerprint": FP,
            "class_names": [str(i) for i in range(classes)],
        },
    )
    store.write("train", 0, data)
    if seal:
        store.seal()
    return store


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("reader") / "gen-0"
    data = table()
    write_store(path, data)
    return path, data


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A store of this test's own, free to damage."""
    path = tmp_path / "gen-0"
    data = table()
    write_store(path, data)
    return path, data


def targets(path: Path, view: int = 0, **kw) -> CachedTargets:
    args = {"fingerprint": FP, "num_rows": N, "num_classes": C, **kw}
    return CachedTargets(path, "train", view=view, **args)


# -- rows keyed by index ---------------------------------------------------------------------------------


@pytest.mark.parametrize("view", [0, 1])
@pytest.mark.parametrize(
    "index",
    [
        [0],
        [36, 0, 5, 4, 35, 9, 10],  # unsorted, across chunk boundaries and into the partial last chunk
        [7, 7, 3, 7, 30, 3],  # repeats
        list(range(N))[::-1],  # every row, reversed
        [],
    ],
)
def test_rows_match_indices(stored, view: int, index: list[int]) -> None:
    path, data = stored
    got = targets(path, view=view).rows(np.array(index, dtype=np.int64))
    assert got.dtype == torch.float32 and got.shape == (len(index), C)
    np.testing.assert_array_equal(got.numpy(), data[index, view].reshape(len(index), C))


def test_rows_accepts_tensors(stored) -> None:
    path, data = stored
    index = torch.tensor([12, 2, 33, 2])
    np.testing.assert_array_equal(targets(path).rows(index).numpy(), data[[12, 2, 33, 2], 0])


@settings(max_examples=25, deadline=None)
@given(index=st.lists(st.integers(0, N - 1), min_size=1, max_size=20))
def test_rows_match_any_index_batch(stored, index: list[int]) -> None:
    path, data = stored
    got = targets(path).rows(torch.tensor(index)).numpy()
    np.testing.assert_array_equal(got, data[index, 0])
    np.testing.assert_array_equal(got[:, 0], np.asarray(index, dtype=np.float32))  # row r starts with r


def test_float16_store_reads_as_float32(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(0, 3, size=(12, 1, 3))
    write_store(tmp_path / "s", data, chunk_rows=5, dtype="float16")
    got = targets(tmp_path / "s", num_rows=12, num_classes=3).rows([11, 0, 5, 4])
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), data[[11, 0, 5, 4], 0].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("bad", [[-1], [N], [3, N + 5, -2]])
def test_rows_refuses_indices_outside_the_split(stored, bad: list[int]) -> None:
    path, _ = stored
    with pytest.raises(IndexError, match="outside rows 0..36") as e:
        targets(path).rows(np.array(bad))
    assert str(path) in str(e.value)


def test_shuffled_loader_gets_the_rows_of_its_indices(stored) -> None:
    """Simulate training: a shuffled DataLoader over a subset of rows; targets are looked up by index."""
    path, data = stored
    fit = np.random.default_rng(1).permutation(N)[:29]  # like fit_index(): dataset position != row
    x = np.repeat(np.arange(N, dtype=np.float32)[:, None], 3, axis=1)  # x[r] == r, to check the loader too
    y = np.arange(N) % C
    loader = DataLoader(
        IndexedDataset(x, y, rows=fit), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    t = targets(path)
    seen: list[int] = []
    for xb, yb, index in loader:
        np.testing.assert_array_equal(xb[:, 0].numpy(), index.numpy())
        np.testing.assert_array_equal(yb.numpy(), y[index.numpy()])
        teacher = t.rows(index)
        np.testing.assert_array_equal(teacher.numpy(), data[index.numpy(), 0])
        seen += index.tolist()
    assert sorted(seen) == sorted(fit.tolist())
    positional = np.concatenate([data[i : i + 6, 0] for i in range(0, len(seen), 6)])
    assert not np.array_equal(data[seen, 0], positional), "the loader did not shuffle; the test proves nothing"


# -- refusals ------------------------------------------------------------------------------------------


def test_refuses_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError) as e:
        targets(tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(e.value) and "export-logits" in str(e.value)


def test_refuses_an_unsealed_store(tmp_path: Path) -> None:
    path = tmp_path / "gen-0"
    write_store(path, table(), seal=False)
    with pytest.raises(IncompleteStoreError) as e:
        targets(path)
    assert str(path) in str(e.value) and MARKER in str(e.value) and "export-logits" in str(e.value)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"fingerprint": "ef" * 32}, "another dataset"),
        ({"num_classes": C + 1}, f"has {C} classes, the dataset has {C + 1}"),
        ({"num_rows": N - 1}, f"'train' has {N} rows, the dataset has {N - 1}"),
    ],
)
def test_refuses_a_foreign_store(stored, kw: dict, reason: str) -> None:
    path, _ = stored
    with pytest.raises(ForeignStoreError) as e:
        targets(path, **kw)
    msg = str(e.value)
    assert str(path) in msg and reason in msg and "Re-export" in msg


def test_refuses_a_chunk_overwritten_with_nan_after_sealing(fresh) -> None:
    path, data = fresh
    t = targets(path, verify=False)  # trusted: damaged rows are still refused when a batch asks for them
    zarr.open_array(str(path / "train"), mode="r+")[10:15] = np.nan  # the third chunk
    np.testing.assert_array_equal(t.rows([0, 36, 9, 15]).numpy(), data[[0, 36, 9, 15], 0])  # other chunks fine
    with pytest.raises(CorruptStoreError) as e:
        t.rows([3, 12, 11, 12])
    msg = str(e.value)
    assert str(path) in msg and "rows [11, 12]" in msg and "not finite" in msg and "re-export" in msg


def test_refuses_a_chunk_deleted_after_sealing(fresh) -> None:
    path, _ = fresh
    t = targets(path, verify=False)
    chunk = path / "train" / "c" / "7" / "0" / "0"  # rows 35-36
    assert chunk.is_file()
    chunk.unlink()  # reads back as the NaN fill value, not as an error
    with pytest.raises(CorruptStoreError, match=r"rows \[36\]"):
        t.rows([36])


def test_verifies_the_store_on_first_read_by_default(fresh) -> None:
    path, data = fresh
    zarr.open_array(str(path / "train"), mode="r+")[10:15] = data[10:15] + 0.5  # finite, plausible, wrong
    t = targets(path)
    with pytest.raises(CorruptStoreError, match="'train' content differs from its marker") as e:
        t.rows([0])  # a row of an undamaged chunk: the whole array is refused
    assert str(path) in str(e.value) and "re-export" in str(e.value)
    np.testing.assert_array_equal(targets(path, verify=False).rows([0]).numpy(), data[[0], 0])


# -- pickling for DataLoader workers -------------------------------------------------------------------


def test_pickles_without_the_open_store_and_reopens_lazily(fresh) -> None:
    path, data = fresh
    t = targets(path)
    assert t._store is not None  # validated and opened at construction
    clone = pickle.loads(pickle.dumps(t))
    assert clone._store is None  # only the path and expectations travel
    np.testing.assert_array_equal(clone.rows([20, 1]).numpy(), data[[20, 1], 0])
    assert clone._store is not None and clone._store is not t._store


def test_reopen_after_unpickling_validates_the_store(fresh) -> None:
    path, _ = fresh
    blob = pickle.dumps(targets(path))
    (path / MARKER).unlink()  # the store changed between pickling and the worker's first read
    clone = pickle.loads(blob)  # no I/O yet
    with pytest.raises(IncompleteStoreError):
        clone.rows([0])


def test_reopens_in_a_forked_process(stored) -> None:
    path, _ = stored
    t = targets(path)
    before = t._store
    t._pid = -1  # as seen from a forked worker, whose pid differs from the opener's
    t.rows([0])
    assert t._store is not before


class _TeacherRows(Dataset):
    """A dataset that reads teacher rows inside each DataLoader worker."""

    def __init__(self, t: CachedTargets) -> None:
        self.t = t

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool]:
        row = self.t.rows([i])[0]
        return i, row, self.t._pid == os.getpid()  # the worker opened its own handle


def test_works_in_forked_dataloader_workers(stored) -> None:
    path, data = stored
    loader = DataLoader(
        _TeacherRows(targets(path)),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        multiprocessing_context="fork",
        generator=torch.Generator().manual_seed(0),
    )
    for index, rows, own_handle in loader:
        np.testing.assert_array_equal(rows.numpy(), data[index.numpy(), 0])
        assert own_handle.all()


# -- a view per row --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, N - 1), st.integers(0, V - 1)), max_size=20))
def test_rows_take_a_view_per_row(stored, pairs: list[tuple[int, int]]) -> None:
    path, data = stored
    index = np.array([p[0] for p in pairs], dtype=np.int64)
    views = np.array([p[1] for p in pairs], dtype=np.int64)
    t = targets(path, view=1)  # the per-row views override the default view
    got = t.rows(torch.from_numpy(index), torch.from_numpy(views)).numpy()
    np.testing.assert_array_equal(got, data[index, views].reshape(len(pairs), C))
    np.testing.assert_array_equal(got[:, 0], np.round(index + views / 10, 4).astype(np.float32))
    assert torch.equal(t.teacher(index, views=views), t.rows(index, views))  # training reads a dense store's logits
    for temperature in (1.0, 2.5):  # the distribution the losses would soften those logits into, exactly
        want = torch.softmax(t.rows(index, views) / temperature, dim=-1)
        got_p = t.target(index, views=views, temperature=temperature)
        assert isinstance(got_p, Probs) and torch.equal(got_p.p, want)
        assert torch.equal(soften(got_p, temperature), soften(t.rows(index, views), temperature))


def test_len_is_the_split_rows(stored) -> None:
    path, data = stored
    assert len(targets(path)) == len(data) == N


def test_rows_refuse_bad_views(stored) -> None:
    path, _ = stored
    t = targets(path)
    with pytest.raises(ValueError, match="2 views for 3 rows"):
        t.rows([0, 1, 2], [0, 1])
    with pytest.raises(IndexError, match=r"views \[2\] outside 0..1"):
        t.rows([0, 1], [1, 2])
    with pytest.raises(ValueError, match="no augmentation parameters"):
        t.aug([0], [1])


def test_aug_reads_each_rows_stored_view(tmp_path: Path) -> None:
    path = tmp_path / "s"
    n, views = 11, 3
    tlf = np.stack(np.meshgrid(np.arange(n), np.arange(views), indexing="ij"), axis=-1)  # top = row, left = view
    aug = np.concatenate([tlf, ((tlf[..., :1] + tlf[..., 1:]) % 2)], axis=-1).astype(np.int16)  # flip = parity
    store = LogitStore.create(
        path,
        {"train": n},
        2,
        views,
        "float32",
        4,
        {
            "generation": 0,
            "arch": "tiny",
            "seed": 0,
            "temperature": 1.0,
            "checkpoint_sha256": "cd" * 32,
            "dataset_fingerprint": FP,
            "class_names": ["a", "b"],
        },
        augmentation={"kind": "crop+flip", "pad": 6, "size": 8, "seed": 0},
    )
    store.write("train", 0, np.zeros((n, views, 2)), aug=aug)
    store.seal()
    t = CachedTargets(path, "train", FP, n, 2)
    index, v = np.array([10, 0, 4, 4, 7]), np.array([2, 1, 0, 2, 1])
    ap = t.aug(index, v)
    assert ap.pad == 6 and ap.size == 8
    np.testing.assert_array_equal(ap.top.numpy(), index)
    np.testing.assert_array_equal(ap.left.numpy(), v)
    np.testing.assert_array_equal(ap.flip.numpy(), (index + v) % 2 == 1)


@pytest.mark.parametrize("test_views", [1, 3], ids=["test-view-0", "test-views"])
def test_the_test_split_reads_its_views(tmp_path: Path, test_views: int) -> None:
    """An export's test split has view 0 only; a store whose `split_views` give test every view has its
    crops/flips there too. Either way the default view is view 0."""
    from tests.test_store import two_split_store

    path = tmp_path / "s"
    _, arrays = two_split_store(path, test_views=test_views, rows=(11, 7))
    t = CachedTargets(path, "test", FP, 7, 5)
    index = np.array([6, 0, 3, 3])
    np.testing.assert_array_equal(t.rows(index).numpy(), arrays["test"]["logits"][index, 0].astype(np.float32))
    if test_views > 1:
        v = np.array([2, 1, 0, 2])
        np.testing.assert_array_equal(t.rows(index, v).numpy(), arrays["test"]["logits"][index, v].astype(np.float32))
        np.testing.assert_array_equal(t.aug(index, v).top.numpy(), arrays["test"]["aug"][index, v, 0])
    else:
        with pytest.raises(IndexError, match=r"views \[1\] outside 0..0 of 'test'"):
            t.rows(index, np.array([1, 0, 0, 0]))
        with pytest.raises(ValueError, match="'test' has only its clean view 0 and no augmentation parameters"):
            t.aug(index, np.zeros(4, np.int64))
    train = CachedTargets(path, "train", FP, 11, 5)
    np.testing.assert_array_equal(train.aug([10, 4], [2, 1]).left.numpy(), arrays["train"]["aug"][[10, 4], [2, 1], 1])
