"""Export of augmented views and sparse layouts: exact replay of every cached view, the stored crop/flip
arrays, top-k and sampled targets (retained mass, the k = C identity, unbiasedness)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.teachers.export as export_lib
from pipeline.cache.formats import LAYOUTS
from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import MARKER, LogitStore
from pipeline.core.errors import ParamsError
from pipeline.core.paths import ProjectPaths
from pipeline.data.augment import apply_params
from pipeline.data.prepared import PreparedData, load_prepared, write_prepared
from pipeline.losses import Probs, ban_loss, kd_loss, soften
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.models.registry import build_model
from pipeline.params import ExportParams
from pipeline.teachers.export import ChunkWriter, export_logits, format_options

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, Path]:
    """20 + 7 random 3x16x16 uint8 images of 4 classes and an untrained cnn3 checkpoint on them."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 3, 16, 16), dtype=np.uint8),
        "y_train": (np.arange(20) % 4).astype(np.int64),
        "x_test": rng.integers(0, 256, (7, 3, 16, 16), dtype=np.uint8),
        "y_test": (np.arange(7) % 4).astype(np.int64),
    }
    write_prepared(root / "d.h5", arrays, ["a", "b", "c", "d"], "npz", 0.25, 0)
    data = load_prepared(root / "d.h5")
    torch.manual_seed(0)
    model = build_model("cnn3", data.input_shape, data.num_classes)
    model.set_stats(data.channel_mean, data.channel_std)
    meta = {
        "arch": "cnn3",
        "input_shape": list(data.input_shape),
        "num_classes": 4,
        "generation": 0,
        "seed": 0,
        "dataset_fingerprint": data.fingerprint,
    }
    save_checkpoint(root / "m.pt", model, meta)
    return data, root / "m.pt"


def _targets(path: Path, data: PreparedData, split: str = "train") -> CachedTargets:
    n = len(data.split(split)[1])
    return CachedTargets(path, split, data.fingerprint, n, data.num_classes)


# -- augmented views -------------------------------------------------------------------------------------


def test_every_cached_view_replays_bit_for_bit(images, tmp_path: Path, monkeypatch) -> None:
    """Spy on the teacher's input at export; the stored crop/flip must rebuild exactly those images."""
    data, ckpt = images
    fed: list[np.ndarray] = []
    real = export_lib.predict_logits

    def spy(model, x, batch_size, device):
        fed.append(np.array(x, copy=True))
        return real(model, x, batch_size, device)

    monkeypatch.setattr(export_lib, "predict_logits", spy)
    views, chunk = 4, 8
    out = tmp_path / "gen-0"
    attrs = export_logits(ckpt, data, out, ExportParams(views=views, chunk_rows=chunk, device="cpu", seed=5), CPU)
    assert attrs["views"] == views and attrs["layout"] == "dense"
    assert attrs["augmentation"]["kind"] == "crop+flip" and attrs["augmentation"]["pad"] == 4
    assert attrs["augmentation"]["size"] == 16 and attrs["augmentation"]["seed"] == 5
    assert attrs["split_views"] == {"train": views, "test": 1}
    calls = iter(fed)  # one call per (chunk, view), splits in order; test has view 0 only
    model = model_from_checkpoint(load_checkpoint(ckpt))
    for split, split_views in (("train", views), ("test", 1)):
        x = data.split(split)[0]
        t = _targets(out, data, split)
        stored = LogitStore.open(out).array(split)[:]
        assert stored.shape == (len(x), split_views, 4)
        for start in range(0, len(x), chunk):
            rows = np.arange(start, min(start + chunk, len(x)))
            for v in range(split_views):
                seen = next(calls)
                if split == "train":
                    rebuilt = apply_params(torch.from_numpy(x[rows]), t.aug(rows, np.full(len(rows), v))).numpy()
                    np.testing.assert_array_equal(rebuilt, seen)  # replay is exact
                if v == 0:
                    np.testing.assert_array_equal(seen, x[rows])  # view 0 is the clean image
                z = real(model, seen, 100, CPU)  # the stored logits are the teacher's on that image,
                z = z - z.max(axis=-1, keepdims=True)  # float16 rows minus their max (logit_shift row_max)
                np.testing.assert_array_equal(stored[rows, v], z.astype(np.float16))
    assert next(calls, None) is None
    aug = LogitStore.open(out).array("train_aug")[:]
    assert aug.shape == (20, views, 3) and aug.dtype == np.int16
    assert (aug[:, 1:, :2] != 4).any() and aug[:, 1:, 2].any() and not aug[:, 1:, 2].all()  # really augmented
    np.testing.assert_array_equal(aug[:, 0], np.tile([4, 4, 0], (20, 1)))


def test_views_depend_on_row_and_view_only(images, tmp_path: Path) -> None:
    """A row's views are the same whatever the chunking (so ranks and reruns agree), and change with the seed."""
    data, ckpt = images
    a = export_logits(ckpt, data, tmp_path / "a", ExportParams(views=3, chunk_rows=8, device="cpu"), CPU)
    export_logits(ckpt, data, tmp_path / "b", ExportParams(views=3, chunk_rows=5, batch_size=3, device="cpu"), CPU)
    export_logits(ckpt, data, tmp_path / "c", ExportParams(views=3, chunk_rows=8, device="cpu", seed=1), CPU)
    read = {k: LogitStore.open(tmp_path / k).array("train_aug")[:] for k in "abc"}
    np.testing.assert_array_equal(read["a"], read["b"])
    assert not np.array_equal(read["a"], read["c"])
    assert a["retained_mass"] == {"train": 1.0, "test": 1.0}


@pytest.mark.parametrize("layout", [{}, {"layout": "sampled", "samples": 5}], ids=["dense", "sampled"])
def test_test_split_is_exported_with_its_clean_view_only(images, tmp_path: Path, layout: dict) -> None:
    """V = 4 exports the test split as V = 1 does, bit for bit (view 0 only, no test_aug); train keeps V views."""
    data, ckpt = images
    for views in (1, 4):
        export_logits(
            ckpt, data, tmp_path / f"v{views}", ExportParams(views=views, chunk_rows=8, device="cpu", **layout), CPU
        )
    one, four = LogitStore.open(tmp_path / "v1"), LogitStore.open(tmp_path / "v4")
    assert four.attrs["views"] == 4 and four.attrs["split_views"] == {"train": 4, "test": 1}
    assert one.attrs["split_views"] == {"train": 1, "test": 1}
    names = four.array_names()
    assert "train_aug" in names and "test_aug" not in names and not (tmp_path / "v4" / "test_aug").exists()
    assert four.array("train").shape[:2] == (20, 4) and four.array("train_aug").shape == (20, 4, 3)
    assert four.array("test").shape[:2] == (7, 1)
    test_arrays = [n for n in names if n.startswith("test") and n not in ("test_labels", "test_source_index")]
    assert test_arrays == (["test"] if not layout else ["test", "test_idx", "test_mass"])
    for name in test_arrays:
        a, b = four.array(name)[:], one.array(name)[:]
        assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert four.marker is not None and one.marker is not None
    assert {n: four.marker["sha256"][n] for n in test_arrays} == {n: one.marker["sha256"][n] for n in test_arrays}
    if not layout:  # dense: train view 0 is the clean image's logits as well
        assert four.array("train")[:, :1].tobytes() == one.array("train")[:].tobytes()


def test_views_are_refused_for_non_image_data(prepared_root: Path, tmp_path: Path) -> None:
    data = load_prepared(ProjectPaths(prepared_root).dataset)
    model = build_model("cnn1d", data.input_shape, data.num_classes)
    meta = {
        "arch": "cnn1d",
        "input_shape": list(data.input_shape),
        "num_classes": 10,
        "generation": 0,
        "seed": 0,
        "dataset_fingerprint": data.fingerprint,
    }
    save_checkpoint(tmp_path / "m.pt", model, meta)
    with pytest.raises(ParamsError, match=r"export.views = 2: augmented views need square uint8 images") as e:
        export_logits(tmp_path / "m.pt", data, tmp_path / "gen-0", ExportParams(views=2, device="cpu"), CPU)
    assert "export.views: 1" in str(e.value)
    assert not (tmp_path / "gen-0").exists()


def test_topk_larger_than_the_class_count_is_refused(images, tmp_path: Path) -> None:
    data, ckpt = images
    with pytest.raises(ParamsError, match=r"export.topk = 5: the dataset has only 4 classes"):
        export_logits(ckpt, data, tmp_path / "s", ExportParams(layout="topk", topk=5, device="cpu"), CPU)


# -- sparse layouts --------------------------------------------------------------------------------------


def _store_from_logits(path: Path, logits: np.ndarray, params: ExportParams, seed: int = 0) -> CachedTargets:
    """A sealed train-only store of hand-made float32 logits (N, C), encoded as `params` says."""
    n, c = logits.shape
    fmt, options = LAYOUTS[params.layout], format_options(params)
    slots = fmt.slots(c, options)
    g = torch.Generator().manual_seed(seed)
    values, sparse = fmt.encode(torch.from_numpy(logits[:, None, :]), params.dtype, slots, options, g)
    attrs = {
        "generation": 0,
        "arch": "x",
        "seed": 0,
        "temperature": 1.0,
        "checkpoint_sha256": "0" * 64,
        "dataset_fingerprint": "f" * 64,
        "class_names": [str(i) for i in range(c)],
        "topk_rest": params.topk_rest,
        "samples": params.samples,
    }
    store = LogitStore.create(
        path, {"train": n}, c, 1, params.dtype, params.chunk_rows, attrs, layout=params.layout, slots=slots
    )
    store.write("train", 0, values, **sparse)
    store.seal()
    return CachedTargets(path, "train", "f" * 64, n, c)


HAND = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))


@pytest.mark.parametrize(("k", "mass"), [(1, (0.5 + 0.4 + 0.25) / 3), (2, (0.8 + 0.7 + 0.5) / 3), (4, 1.0)])
def test_topk_records_the_retained_mass(tmp_path: Path, k: int, mass: float) -> None:
    t = _store_from_logits(tmp_path / "s", HAND, ExportParams(layout="topk", topk=k, dtype="float32"))
    assert t.attrs["layout"] == "topk" and t.attrs["slots"] == k
    assert t.attrs["retained_mass"]["train"] == pytest.approx(mass, abs=1e-6)
    per_row = np.sort(np.exp(HAND))[:, ::-1][:, :k].sum(axis=1)
    np.testing.assert_allclose(LogitStore.open(tmp_path / "s").array("train_mass")[:, 0], per_row, rtol=1e-6)


def test_topk_targets_keep_the_kept_probabilities(tmp_path: Path) -> None:
    p = np.exp(HAND)
    uni = _store_from_logits(tmp_path / "u", HAND, ExportParams(layout="topk", topk=2, dtype="float32")).target([0, 1])
    assert isinstance(uni, Probs)
    want = np.array([[0.5, 0.3, 0.1, 0.1], [0.15, 0.15, 0.3, 0.4]])  # dropped mass shared by the other classes
    np.testing.assert_allclose(uni.p.numpy(), want, atol=1e-6)
    ren = _store_from_logits(
        tmp_path / "r", HAND, ExportParams(layout="topk", topk=2, topk_rest="renorm", dtype="float32")
    ).target([0, 1])
    np.testing.assert_allclose(ren.p.numpy(), [[0.625, 0.375, 0, 0], [0, 0, 3 / 7, 4 / 7]], atol=1e-6)
    hot = _store_from_logits(tmp_path / "h", HAND, ExportParams(layout="topk", topk=2, dtype="float32")).target(
        [0, 1], temperature=2.0
    )
    q = np.sqrt(p[0, :2]) / np.sqrt(p[0, :2]).sum()  # softmax(z_K / 2) over the kept pair, times m = 0.8
    np.testing.assert_allclose(hot.p.numpy()[0], [*(0.8 * q), 0.1, 0.1], atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_with_every_class_gives_the_dense_loss_exactly(tmp_path: Path, dtype: str, temperature: float) -> None:
    logits = np.random.default_rng(0).normal(0, 3, size=(33, 7)).astype(np.float32)
    dense = _store_from_logits(tmp_path / "d", logits, ExportParams(dtype=dtype, chunk_rows=8))
    full = _store_from_logits(tmp_path / "t", logits, ExportParams(layout="topk", topk=7, dtype=dtype, chunk_rows=8))
    index = np.array([32, 0, 5, 5, 17, 8])
    t_dense, t_full = dense.teacher(index, temperature=temperature), full.teacher(index, temperature=temperature)
    assert isinstance(t_full, Probs) and not isinstance(t_dense, Probs)  # training reads a dense store's logits
    assert torch.equal(dense.target(index, temperature=temperature).p, full.target(index, temperature=temperature).p)
    student = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    assert torch.equal(soften(t_dense, temperature), soften(t_full, temperature))
    assert torch.equal(ban_loss(student, t_dense, temperature), ban_loss(student, t_full, temperature))
    assert torch.equal(kd_loss(student, t_dense, labels, temperature), kd_loss(student, t_full, labels, temperature))
    assert full.attrs["retained_mass"]["train"] == pytest.approx(1.0, abs=1e-6)


def test_sampled_targets_are_unbiased(tmp_path: Path) -> None:
    """counts / S over many rows of one teacher distribution averages to p (Anshumann et al. 2025)."""
    rows, samples = 6000, 8
    logits = np.tile(np.log(np.array([0.55, 0.25, 0.1, 0.06, 0.03, 0.01])), (rows, 1)).astype(np.float32)
    t = _store_from_logits(tmp_path / "s", logits, ExportParams(layout="sampled", samples=samples, chunk_rows=1000))
    assert t.attrs["layout"] == "sampled" and t.attrs["slots"] == 6 and t.attrs["samples"] == samples
    target = t.target(np.arange(rows))
    assert isinstance(target, Probs)
    p = target.p.numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(np.isin(np.round(p * samples, 6), np.arange(samples + 1)))  # each row is counts / S
    want = np.exp(logits[0])
    se = np.sqrt(want * (1 - want) / (rows * samples))
    assert np.all(np.abs(p.mean(axis=0) - want) < 5 * se + 1e-6), (p.mean(axis=0), want)
    # retained mass: the teacher probability of the classes a row drew, averaged over rows
    kept = (p > 0) * want
    assert t.attrs["retained_mass"]["train"] == pytest.approx(kept.sum(axis=1).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="T = 1 only"):
        t.target([0], temperature=2.0)


def test_sampled_store_with_fewer_samples_than_classes(tmp_path: Path) -> None:
    logits = np.random.default_rng(2).normal(0, 1, size=(50, 9)).astype(np.float32)
    t = _store_from_logits(tmp_path / "s", logits, ExportParams(layout="sampled", samples=3))
    assert t.attrs["slots"] == 3
    p = t.target(np.arange(50)).p.numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert ((p > 0).sum(axis=1) <= 3).all()


def test_sparse_export_end_to_end(images, tmp_path: Path) -> None:
    """export_logits with topk over augmented views: the kept logits are the dense store's largest ones."""
    data, ckpt = images
    export_logits(ckpt, data, tmp_path / "d", ExportParams(views=2, dtype="float32", device="cpu"), CPU)
    attrs = export_logits(
        ckpt, data, tmp_path / "k", ExportParams(views=2, dtype="float32", device="cpu", layout="topk", topk=2), CPU
    )
    dense = LogitStore.open(tmp_path / "d").array("train")[:]
    top = LogitStore.open(tmp_path / "k")
    np.testing.assert_array_equal(top.array("train")[:], -np.sort(-dense, axis=-1)[..., :2])
    p = torch.softmax(torch.from_numpy(dense).double(), -1).numpy()
    want = -np.sort(-p, axis=-1)[..., :2].sum(-1)
    assert attrs["retained_mass"]["train"] == pytest.approx(want.mean(), rel=1e-5)
    np.testing.assert_array_equal(top.array("train_aug")[:], LogitStore.open(tmp_path / "d").array("train_aug")[:])


def test_ensemble_refuses_a_sparse_store(images, tmp_path: Path) -> None:
    from pipeline.core.errors import StoreError
    from pipeline.results.ensemble import evaluate_chain

    data, ckpt = images
    export_logits(ckpt, data, tmp_path / "k", ExportParams(layout="topk", topk=2, device="cpu"), CPU)
    with pytest.raises(StoreError, match=r"layout 'topk' keeps only part of each row's logits") as e:
        evaluate_chain({0: tmp_path / "k"}, data)
    assert "export.layout: dense" in str(e.value)


# -- inference overlapped with the writes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        ExportParams(views=3, chunk_rows=6, device="cpu"),
        ExportParams(views=2, chunk_rows=4, device="cpu", layout="sampled", samples=5),
    ],
    ids=["dense-views", "sampled"],
)
def test_overlapped_export_writes_the_same_store_as_sequential(images, tmp_path: Path, params) -> None:
    data, ckpt = images
    export_logits(ckpt, data, tmp_path / "seq", params, CPU, write_ahead=0)
    export_logits(ckpt, data, tmp_path / "ovl", params, CPU, write_ahead=2)
    seq, ovl = LogitStore.open(tmp_path / "seq"), LogitStore.open(tmp_path / "ovl")
    assert seq.array_names() == ovl.array_names()
    for name in seq.array_names():
        np.testing.assert_array_equal(seq.array(name)[:], ovl.array(name)[:])
    assert json.loads((tmp_path / "seq" / MARKER).read_text()) == json.loads((tmp_path / "ovl" / MARKER).read_text())


def test_the_next_chunk_is_inferred_while_the_previous_one_is_written(images, tmp_path: Path, monkeypatch) -> None:
    """The first chunk's write waits until inference of the second chunk has started: only an export that
    runs them at the same time finishes (a sequential one would deadlock, caught by the timeout)."""
    data, ckpt = images
    second_inference = threading.Event()
    calls = {"infer": 0, "write_threads": set()}
    real_predict, real_write = export_lib.predict_logits, LogitStore.write

    def predict(model, x, batch_size, device):
        calls["infer"] += 1
        if calls["infer"] == 2:
            second_inference.set()
        return real_predict(model, x, batch_size, device)

    def write(self, split, start, **arrays):
        calls["write_threads"].add(threading.current_thread().name)
        if start == 0 and split == "train":
            assert second_inference.wait(timeout=120), "chunk 1 was not inferred while chunk 0 was written"
        return real_write(self, split, start, **arrays)

    monkeypatch.setattr(export_lib, "predict_logits", predict)
    monkeypatch.setattr(LogitStore, "write", write)
    export_logits(ckpt, data, tmp_path / "gen-0", ExportParams(chunk_rows=8, device="cpu"), CPU)
    assert calls["write_threads"] == {"bancache-export-writer"}
    assert LogitStore.open(tmp_path / "gen-0").attrs["splits"] == {"train": 20, "test": 7}


@pytest.mark.parametrize("write_ahead", [0, 2])
def test_a_failed_write_is_raised_in_the_caller_and_nothing_is_sealed(
    images, tmp_path: Path, monkeypatch, write_ahead: int
) -> None:
    data, ckpt = images
    out = tmp_path / "gen-0"
    params = ExportParams(chunk_rows=4, device="cpu")
    export_logits(ckpt, data, out, params, CPU)
    before = LogitStore.open(out).array("train")[:]
    real_write, calls = LogitStore.write, []

    def failing(self, split, start, **arrays):
        calls.append(start)
        if len(calls) == 2:
            raise RuntimeError("codec exploded")
        return real_write(self, split, start, **arrays)

    monkeypatch.setattr(LogitStore, "write", failing)
    with pytest.raises(RuntimeError, match="codec exploded"):
        export_logits(ckpt, data, out, ExportParams(chunk_rows=4, device="cpu", seed=9), CPU, write_ahead=write_ahead)
    assert calls == [0, 4]  # no write after the failed one
    np.testing.assert_array_equal(LogitStore.open(out).array("train")[:], before)  # previous store untouched
    assert not list(tmp_path.glob(".gen-0.*"))  # the partial temporary store is gone, never sealed


def test_chunk_writer_runs_jobs_in_order_and_drops_them_after_a_failure() -> None:
    done: list[int] = []

    def job(i: int):
        def run() -> None:
            if i == 3:
                raise ValueError("job 3 failed")
            done.append(i)

        return run

    with ChunkWriter(ahead=2) as w:
        for i in range(3):
            w.submit(job(i))
    assert done == [0, 1, 2]
    with pytest.raises(ValueError, match="job 3 failed"):
        with ChunkWriter(ahead=2) as w:
            for i in range(3, 50):
                w.submit(job(i))
    assert done == [0, 1, 2]  # jobs after the failed one never ran

    def until_the_caller_failed() -> None:  # holds the writer until __exit__ has seen the caller's error
        while not w._stop:
            threading.Event().wait(0.01)

    with pytest.raises(KeyError):
        with ChunkWriter(ahead=2) as w:
            w.submit(until_the_caller_failed)
            w.submit(job(100))
            raise KeyError("the caller failed")
    assert done == [0, 1, 2]  # the job queued behind was dropped, not run after the caller failed
