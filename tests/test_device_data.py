"""The device-resident training path (pipeline/train/resident.py) on the CPU: the same batches, targets and
trained weights as the streaming path (DataLoader + CachedTargets), both taking each epoch's order and crops
from pipeline/train/epochs.py, and the fallback beyond the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.train.inputs as inputs
import pipeline.train.loop
import pipeline.train.loop as lib
from pipeline.cache.device import DeviceTargets, resident_bytes
from pipeline.cache.reader import CachedTargets
from pipeline.cache.stream import BlockShuffleSampler
from pipeline.core.distributed import SINGLE_PROCESS
from pipeline.core.errors import CorruptStoreError
from pipeline.data.augment import AugParams, apply_params, mix64
from pipeline.data.prepared import PreparedData, load_prepared, write_prepared
from pipeline.losses import Probs
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.registry import build_model
from pipeline.params import ExportParams, GenParams, TrainParams
from pipeline.teachers.export import export_logits
from pipeline.train import inputs as train_input
from pipeline.train.epochs import LiveAugment, ViewPolicy, batch_aug, epoch_aug, epoch_order, pick_views
from pipeline.train.loop import train_generation

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (50, 3, 16, 16), dtype=np.uint8),
        "y_train": (np.arange(50) % 5).astype(np.int64),
        "x_test": rng.integers(0, 256, (10, 3, 16, 16), dtype=np.uint8),
        "y_test": (np.arange(10) % 5).astype(np.int64),
    }
    path = tmp_path_factory.mktemp("images") / "d.h5"
    write_prepared(path, arrays, list("abcde"), "npz", 0.2, 0)
    return load_prepared(path)


STORES = {
    "dense": {},
    "dense-views": {"views": 3},
    "topk-views": {"views": 3, "layout": "topk", "topk": 2},
    "topk-renorm": {"layout": "topk", "topk": 3, "topk_rest": "renorm"},
    "sampled-views": {"views": 2, "layout": "sampled", "samples": 16},
}


@pytest.fixture(scope="module")
def stores(images: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One generation-0 store of `images` per layout in STORES, exported by the library."""
    root = tmp_path_factory.mktemp("stores")
    torch.manual_seed(0)
    model = build_model("cnn3", images.input_shape, images.num_classes)
    model.set_stats(images.channel_mean, images.channel_std)
    meta = {
        "arch": "cnn3",
        "input_shape": list(images.input_shape),
        "num_classes": images.num_classes,
        "generation": 0,
        "seed": 0,
        "dataset_fingerprint": images.fingerprint,
    }
    save_checkpoint(root / "m.pt", model, meta)
    out = {}
    for name, kw in STORES.items():
        params = ExportParams(device="cpu", chunk_rows=16, **kw)
        export_logits(root / "m.pt", images, root / name, params, CPU)
        out[name] = root / name
    return out


def _source(images: PreparedData, store: Path, verify: bool = True) -> CachedTargets:
    return CachedTargets(store, "train", images.fingerprint, len(images.y_train), images.num_classes, verify=verify)


def _same(a, b) -> None:
    a, b = (x.p if isinstance(x, Probs) else x for x in (a, b))
    assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("name", list(STORES))
def test_device_targets_serve_what_cached_targets_serve(images, stores, name) -> None:
    src = _source(images, stores[name])
    views_n = src.attrs["views"]
    temperature = 1.0 if "sampled" in name else 2.5
    rng = np.random.default_rng(1)
    rows = rng.integers(0, len(images.y_train), 40)  # any order, with repeats
    fit = images.fit_index()
    one_view = DeviceTargets(src, CPU, fit, all_views=False)
    _same(
        one_view.teacher(torch.from_numpy(rows), views=None, temperature=temperature),
        src.teacher(rows, views=None, temperature=temperature),
    )
    if views_n > 1:
        every = DeviceTargets(src, CPU, fit, all_views=True)
        views = rng.integers(0, views_n, len(rows))
        r, v = torch.from_numpy(rows), torch.from_numpy(views)
        _same(
            every.teacher(r, views=v, temperature=temperature), src.teacher(rows, views=views, temperature=temperature)
        )
        got, want = every.aug(r, v), src.aug(rows, views)
        for field in ("top", "left", "flip"):
            assert torch.equal(getattr(got, field), getattr(want, field))
        x = torch.from_numpy(images.x_train[rows])
        assert torch.equal(apply_params(x, got), apply_params(x, want))


def test_device_augmentation_equals_apply_params_on_random_params(images) -> None:
    """The resident path applies crops and flips to device tensors; apply_params on the host gives the same
    bytes for any parameters (tensor params on x's device: pure index arithmetic)."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(images.x_train[:20])
    for pad in (0, 1, 4, 7):
        arrays = {"top": rng.integers(0, 2 * pad + 1, 20), "left": rng.integers(0, 2 * pad + 1, 20)}
        params = AugParams.from_numpy({**arrays, "flip": rng.random(20) < 0.5}, pad=pad, size=16)
        on_device = AugParams(params.top.to(CPU), params.left.to(CPU), params.flip.to(CPU), pad, 16)
        ref = torch.stack([_one(x[i], params, i) for i in range(20)])
        assert torch.equal(apply_params(x, on_device), ref)


def _one(img: torch.Tensor, p: AugParams, i: int) -> torch.Tensor:
    """Reference crop + flip of one image, by slicing."""
    padded = torch.nn.functional.pad(img, (p.pad,) * 4)
    top, left = int(p.top[i]), int(p.left[i])
    crop = padded[:, top : top + p.size, left : left + p.size]
    return crop.flip(-1) if bool(p.flip[i]) else crop


def _pair(
    data: PreparedData,
    batch_size: int,
    seed: int,
    augment: bool,
    targets: CachedTargets | None = None,
    views: ViewPolicy | None = None,
    temperature: float = 1.0,
):
    """The resident and the streaming input of `make_input` (budget 4096 MiB, then 0) for the same data,
    targets, view policy and temperature, each with its own identically seeded (shuffle, crop) generators."""
    out = []
    for budget in (4096, 0):
        gens = (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))
        live = LiveAugment(gens[1], data.x_train.shape[-1]) if augment else None
        recipe, gp = _recipe(batch_size=batch_size, memory_budget_mib=budget), GenParams(temperature=temperature)
        out.append(inputs.make_input(data, recipe, gp, CPU, SINGLE_PROCESS, targets, views, gens, live, seed))
    return out


def _tiny(n: int) -> PreparedData:
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1)  # each row's input is its own index
    return PreparedData(x, np.zeros(n, np.int64), x[:2], np.zeros(2, np.int64), np.array([3, 9]), ["a"], "fp", "t")


def test_both_paths_visit_every_fit_row_once_in_epoch_order() -> None:
    data = _tiny(23)
    res, stream = _pair(data, 5, 7, augment=False)
    fresh = torch.Generator().manual_seed(7)
    orders = []
    for epoch in range(1, 4):
        got = [list(res.batches(epoch)), list(stream.batches(epoch))]
        want = torch.from_numpy(data.fit_index())[epoch_order(len(data.fit_index()), fresh)]
        for batches in got:
            assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 1]
            order = torch.cat([b[0] for b in batches]).flatten().long()
            assert sorted(order.tolist()) == data.fit_index().tolist()  # every fit row once, no validation row
            assert torch.equal(order, want)  # bancache's epoch order, drawn from the shuffling generator
        orders.append(want)
    assert not torch.equal(orders[0], orders[1])


def test_streaming_loader_draws_only_the_epoch_order() -> None:
    """The streaming loader's shuffling generator advances exactly as `epoch_order` advances a twin, and the
    loader takes nothing from torch's global RNG (its workers' seeds come from a generator of its own)."""
    data = _tiny(23)
    gens = (torch.Generator().manual_seed(7), torch.Generator().manual_seed(8))
    stream = inputs.make_input(
        data, _recipe(batch_size=5, memory_budget_mib=0), GenParams(), CPU, SINGLE_PROCESS, None, None, gens, None, 7
    )
    twin = torch.Generator().manual_seed(7)
    for epoch in (1, 2):
        global_rng = torch.get_rng_state()
        list(stream.batches(epoch))
        epoch_order(len(data.fit_index()), twin)
        assert torch.equal(gens[0].get_state(), twin.get_state())
        assert torch.equal(torch.get_rng_state(), global_rng)


@pytest.mark.parametrize("name", ["dense", "topk-views", "sampled-views"])
def test_resident_batches_equal_streaming_batches(images, stores, name) -> None:
    """Images (live crops, or stored views), labels and teacher targets, batch for batch, bit for bit."""
    src = _source(images, stores[name])
    temperature = 1.0 if "sampled" in name else 2.0
    n_views = src.attrs["views"]
    policies = [None] if n_views == 1 else [None, ViewPolicy("cycle", n_views, 5), ViewPolicy("random", n_views, 5)]
    for views in policies:
        res, stream = _pair(images, 8, 3, True, src, views, temperature)
        for epoch in (1, 2):
            got, want = list(res.batches(epoch)), list(stream.batches(epoch))
            assert len(got) == len(want) == 5
            for (x1, y1, t1), (x2, y2, t2) in zip(got, want, strict=True):
                assert torch.equal(x1, x2) and torch.equal(y1, y2)
                _same(t1, t2)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the steps are spied, not run
@pytest.mark.parametrize("budget", [4096, 0], ids=["resident", "streaming"])
def test_training_sees_epoch_order_and_epoch_aug_of_fresh_generators(images, budget, monkeypatch) -> None:
    """What train_generation feeds the steps, on either path, over 2 epochs: the fit rows in the order
    `epoch_order` draws from a fresh generator seeded like the run's shuffling one, each cropped and flipped
    as `epoch_aug` draws from a fresh twin of the crop generator."""
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    monkeypatch.setattr(lib, "train_one_epoch", lambda _net, batches, *_a: seen.append([b[:2] for b in batches]) or 0.0)
    recipe = _recipe(memory_budget_mib=budget, seed=11)
    train_generation(images, recipe, 0, GenParams(loss="ce"), None)
    shuffle, crops, _ = lib._generators(11, recipe, CPU)
    fit, bs = torch.from_numpy(images.fit_index()), recipe.batch_size
    assert len(seen) == recipe.epochs == 2
    for batches in seen:
        rows = fit[epoch_order(len(fit), shuffle)]
        table = epoch_aug(len(fit), bs, crops, 16)
        assert len(batches) == 5
        for b, (x, y) in enumerate(batches):
            r = rows[b * bs : (b + 1) * bs]
            want = apply_params(torch.from_numpy(images.x_train)[r], batch_aug(table[b * bs : (b + 1) * bs], 16))
            assert torch.equal(x, want) and torch.equal(y, torch.from_numpy(images.y_train)[r])


def test_random_views_vectorised_equal_mix64() -> None:
    rows = np.array([0, 1, 7, 40, 2**40 + 3])
    views = pick_views(ViewPolicy("random", 5, -3), 4, rows)
    assert views.tolist() == [mix64(-3, 4, int(r)) % 5 for r in rows]
    assert pick_views(ViewPolicy("cycle", 5, 0), 7, rows).tolist() == [2] * 5


def _recipe(**kw) -> TrainParams:
    base = {"arch": "cnn3", "epochs": 2, "batch_size": 8, "device": "cpu", "optimizer": "sgd", "lr": 0.05}
    return TrainParams(**{**base, **kw})


def _equal_runs(a, b) -> None:
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    assert [h.val_acc for h in a.history] == [h.val_acc for h in b.history]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "gp",
    [
        GenParams(loss="ce"),
        GenParams(loss="kd", teacher=0, temperature=2.0),
        GenParams(loss="ban", teacher=0, view_policy="random"),
    ],
    ids=["teacher-augmented", "kd-topk", "ban-random-views"],
)
def test_resident_training_is_bit_identical_to_streaming(images, stores, gp, monkeypatch) -> None:
    store = None if gp.loss == "ce" else stores["topk-views" if gp.loss == "kd" else "dense-views"]
    gen = 0 if gp.loss == "ce" else 1
    # Budget 0 streams the store by chunk, which reads in block-shuffled order (tested below): compare the
    # two paths on the loader's own uniform order.
    monkeypatch.setattr(train_input, "epoch_sampler", lambda *a, **k: None)
    runs = [train_generation(images, _recipe(memory_budget_mib=b), gen, gp, store) for b in (4096, 0)]
    _equal_runs(*runs)


def test_streamed_store_trains_in_block_shuffled_order(images, stores, monkeypatch) -> None:
    made = []
    real = train_input.make_input

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pipeline.train.loop, "make_input", spy)
    gp = GenParams(loss="ban", teacher=0)
    train_generation(images, _recipe(memory_budget_mib=0), 1, gp, stores["dense"])
    sampler = made[0].sampler
    assert isinstance(sampler, BlockShuffleSampler)
    for epoch in (1, 2):  # every fit row once per epoch, in another order each epoch
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(len(images.fit_index())))
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first


def test_over_budget_falls_back_to_streaming(images, stores, monkeypatch) -> None:
    """Budget in bytes here (MIB patched to 1): the resident path needs the images, labels and the store's
    served arrays; one byte short of that, training streams, and trains the same weights."""
    monkeypatch.setattr(lib, "MIB", 1)
    monkeypatch.setattr(inputs, "MIB", 1)
    src = _source(images, stores["dense-views"])
    need = resident_bytes(images, src, all_views=True)
    data_only = images.x_train.nbytes + images.y_train.nbytes
    assert need == data_only + len(images.y_train) * 3 * (images.num_classes * 2 + 3 * 2)  # fp16, int16 aug
    built = []
    real = inputs.ResidentInput

    def spy(*a, **k):
        built.append(1)
        return real(*a, **k)

    monkeypatch.setattr(inputs, "ResidentInput", spy)
    gp = GenParams(loss="ban", teacher=0, view_policy="cycle")
    runs = {}
    for budget in (need, need - 1, data_only + 1, 0):
        built.clear()
        runs[budget] = train_generation(
            images, _recipe(memory_budget_mib=budget, epochs=1), 1, gp, stores["dense-views"]
        )
        assert built == ([1] if budget == need else []), budget
    _equal_runs(runs[need], runs[need - 1])


def test_resident_targets_refuse_damaged_fit_rows(images, stores, tmp_path) -> None:
    import shutil

    import zarr

    store = tmp_path / "s"
    shutil.copytree(stores["dense"], store)
    arr = zarr.open_array(str(store / "train"), mode="r+")
    fit = images.fit_index()
    arr[int(fit[3])] = np.nan
    with pytest.raises(CorruptStoreError, match="'train' content differs from its marker"):  # verified by default
        DeviceTargets(_source(images, store), CPU, fit, all_views=False)
    with pytest.raises(CorruptStoreError, match=rf"rows \[{fit[3]}\] of 'train' are not finite"):  # trusted store
        DeviceTargets(_source(images, store, verify=False), CPU, fit, all_views=False)
