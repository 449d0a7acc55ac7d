"""Image datasets: uint8 inputs normalised inside the model, augmentation only in training, and the
CUDA-only step options (autocast, channels_last) exercised through the same functions on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data.prepared import IndexedDataset, PreparedData, load_prepared, write_prepared
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.models.predict import predict_logits
from pipeline.models.registry import ImageInput, build_model
from pipeline.params import GenParams, TrainParams
from pipeline.train.inputs import loader_batches
from pipeline.train.loop import StepOptions, make_criterion, step_options, train_generation, train_one_epoch


@pytest.fixture
def images(tmp_path) -> PreparedData:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (40, 3, 16, 16), dtype=np.uint8),
        "y_train": (np.arange(40) % 4).astype(np.int64),
        "x_test": rng.integers(0, 256, (12, 3, 16, 16), dtype=np.uint8),
        "y_test": (np.arange(12) % 4).astype(np.int64),
    }
    write_prepared(tmp_path / "d.h5", arrays, ["a", "b", "c", "d"], "npz", 0.25, 0)
    return load_prepared(tmp_path / "d.h5")


def test_prepared_images_carry_channel_stats(images: PreparedData) -> None:
    x = images.x_train.astype(np.float64) / 255
    np.testing.assert_allclose(images.channel_mean, x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(images.channel_std, x.std(axis=(0, 2, 3)), rtol=1e-4)


def test_image_model_normalises_uint8_and_checkpoint_keeps_stats(images: PreparedData, tmp_path) -> None:
    model = build_model("cnn3", images.input_shape, images.num_classes)
    assert isinstance(model, ImageInput)
    model.set_stats(images.channel_mean, images.channel_std)
    x = torch.from_numpy(images.x_test[:3])
    manual = (x.float() / 255 - model.mean) / model.std
    model.eval()
    torch.testing.assert_close(model(x), model.net(manual))
    meta = {
        "arch": "cnn3",
        "input_shape": list(images.input_shape),
        "num_classes": 4,
        "generation": 0,
        "seed": 0,
        "dataset_fingerprint": images.fingerprint,
    }
    save_checkpoint(tmp_path / "m.pt", model, meta)
    again = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    again.eval()
    torch.testing.assert_close(again(x), model(x))


def test_training_augments_but_evaluation_does_not(images: PreparedData, monkeypatch) -> None:
    seen = []
    import pipeline.train.inputs as inputs

    real = inputs.apply_params

    def spy(x, params):
        seen.append(x.shape)
        return real(x, params)

    monkeypatch.setattr(inputs, "apply_params", spy)
    recipe = TrainParams(
        arch="cnn3", epochs=1, batch_size=10, device="cpu", optimizer="sgd", lr=0.01, memory_budget_mib=0
    )
    result = train_generation(images, recipe, 0, GenParams(loss="ce"), None)
    assert len(seen) == 3  # 30 fit rows / batch 10: every training batch, and nothing else
    n = len(seen)
    predict_logits(result.model, images.x_test, 8, torch.device("cpu"))
    assert len(seen) == n
    off = TrainParams(arch="cnn3", epochs=1, batch_size=10, device="cpu", augment=False, memory_budget_mib=0)
    train_generation(images, off, 0, GenParams(loss="ce"), None)
    assert len(seen) == n


def test_cuda_step_options_are_derived_from_params(images: PreparedData, monkeypatch) -> None:
    monkeypatch.setattr("pipeline.train.loop._bf16_ok", lambda: True)
    gen = torch.Generator().manual_seed(0)
    cuda = torch.device("cuda")
    opts = step_options(TrainParams(arch="cnn3"), images, cuda, gen)
    assert opts.amp_dtype == torch.bfloat16 and opts.channels_last and opts.augment is not None
    assert step_options(TrainParams(arch="cnn3", amp="fp16"), images, cuda, gen).amp_dtype == torch.float16
    off = step_options(TrainParams(arch="cnn3", amp="off", channels_last=False), images, cuda, gen)
    assert off.amp_dtype is None and not off.channels_last
    cpu = step_options(TrainParams(arch="cnn3"), images, torch.device("cpu"), gen)
    assert cpu.amp_dtype is None and not cpu.channels_last


def test_autocast_and_channels_last_step_runs_on_cpu(images: PreparedData) -> None:
    """The CUDA step (autocast + channels_last) through the same function, with CPU bf16 autocast."""
    model = build_model("cnn3", images.input_shape, 4).to(memory_format=torch.channels_last)
    loader = DataLoader(IndexedDataset(images.x_train, images.y_train), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    opts = StepOptions(amp_dtype=torch.bfloat16, channels_last=True)
    batches = loader_batches(loader, torch.device("cpu"))
    loss = train_one_epoch(model, batches, opt, make_criterion(GenParams(loss="ce")), opts)
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# -- students on cached augmented views ----------------------------------------------------------------


@pytest.fixture
def viewed(images: PreparedData, tmp_path, monkeypatch) -> tuple[PreparedData, object, list[np.ndarray]]:
    """A 3-view teacher store of `images`, and the train images the teacher saw, per view (spied at export)."""
    import pipeline.teachers.export as export_lib
    from pipeline.params import ExportParams
    from pipeline.teachers.export import export_logits

    torch.manual_seed(0)
    model = build_model("cnn3", images.input_shape, 4)
    model.set_stats(images.channel_mean, images.channel_std)
    meta = {
        "arch": "cnn3",
        "input_shape": list(images.input_shape),
        "num_classes": 4,
        "generation": 0,
        "seed": 0,
        "dataset_fingerprint": images.fingerprint,
    }
    save_checkpoint(tmp_path / "m.pt", model, meta)
    fed: list[np.ndarray] = []
    real = export_lib.predict_logits
    monkeypatch.setattr(export_lib, "predict_logits", lambda m, x, b, d: (fed.append(np.array(x)), real(m, x, b, d))[1])
    params = ExportParams(views=3, chunk_rows=64, device="cpu", dtype="float32")
    export_logits(tmp_path / "m.pt", images, tmp_path / "gen-0", params, torch.device("cpu"))
    monkeypatch.undo()
    return images, tmp_path / "gen-0", fed[:3]  # one call per view on the 40 train rows, then the test split


def _spy_student(monkeypatch) -> dict[str, list]:
    import pipeline.train.inputs as inputs
    from pipeline.cache.reader import CachedTargets

    seen: dict[str, list] = {"target": [], "image": [], "live": []}
    real_target, real_apply, real_aug = CachedTargets.teacher, inputs.apply_params, inputs.epoch_aug

    def target(self, index, *, views=None, temperature=1.0):
        out = real_target(self, index, views=views, temperature=temperature)
        seen["target"].append((np.asarray(index).copy(), None if views is None else views.copy(), out.clone()))
        return out

    def apply(x, params):
        out = real_apply(x, params)
        seen["image"].append(out.clone())
        return out

    monkeypatch.setattr(CachedTargets, "teacher", target)
    monkeypatch.setattr(inputs, "apply_params", apply)
    monkeypatch.setattr(inputs, "epoch_aug", lambda *a, **k: seen["live"].append(1) or real_aug(*a, **k))
    return seen


def test_cycle_student_trains_on_the_teachers_exact_views(viewed, monkeypatch) -> None:
    data, store, teacher_saw = viewed
    seen = _spy_student(monkeypatch)
    recipe = TrainParams(
        arch="cnn3", epochs=4, batch_size=10, device="cpu", optimizer="sgd", lr=0.01, memory_budget_mib=0
    )
    train_generation(data, recipe, 1, GenParams(loss="ban", teacher=0, view_policy="cycle"), store)
    stored = zarr_array(store, "train")
    assert len(seen["target"]) == 4 * 3 and len(seen["image"]) == 4 * 3 and not seen["live"]
    for step, ((index, views, target), image) in enumerate(zip(seen["target"], seen["image"], strict=True)):
        epoch = step // 3 + 1
        np.testing.assert_array_equal(views, np.full(len(index), epoch % 3))  # view = epoch % V
        np.testing.assert_array_equal(target.numpy(), stored[index, views])  # that view's logits
        for b, (row, v) in enumerate(zip(index, views, strict=True)):  # the very image the teacher saw
            np.testing.assert_array_equal(image[b].numpy(), teacher_saw[v][row])
    assert {int(v) for _, views, _ in seen["target"] for v in views} == {0, 1, 2}


def test_random_student_views_are_seeded_per_epoch_and_row(viewed, monkeypatch) -> None:
    data, store, teacher_saw = viewed
    recipe = TrainParams(
        arch="cnn3", epochs=2, batch_size=10, device="cpu", optimizer="sgd", lr=0.01, memory_budget_mib=0
    )
    runs = []
    for _ in range(2):
        seen = _spy_student(monkeypatch)
        train_generation(data, recipe, 1, GenParams(loss="ban", teacher=0, view_policy="random"), store)
        runs.append(seen)
        monkeypatch.undo()
    picks = [
        {
            (step // 3, int(r)): int(v)
            for step, (idx, vs, _) in enumerate(s["target"])
            for r, v in zip(idx, vs, strict=True)
        }
        for s in runs
    ]
    assert picks[0] == picks[1] and set(picks[0].values()) == {0, 1, 2}
    assert any(picks[0][(0, r)] != picks[0][(1, r)] for _, r in picks[0])  # redrawn each epoch
    (index, views, _), image = runs[0]["target"][0], runs[0]["image"][0]
    np.testing.assert_array_equal(
        image.numpy(), np.stack([teacher_saw[v][r] for r, v in zip(index, views, strict=True)])
    )


def test_clean_student_keeps_live_augmentation_and_view_0(viewed, monkeypatch) -> None:
    data, store, _ = viewed
    seen = _spy_student(monkeypatch)
    recipe = TrainParams(
        arch="cnn3", epochs=1, batch_size=10, device="cpu", optimizer="sgd", lr=0.01, memory_budget_mib=0
    )
    train_generation(data, recipe, 1, GenParams(loss="ban", teacher=0), store)
    assert len(seen["live"]) == 1 and len(seen["image"]) == 3  # one epoch's fresh crops, applied per batch
    index, views, target = seen["target"][0]
    assert views is None
    np.testing.assert_array_equal(target.numpy(), zarr_array(store, "train")[index, 0])


def test_view_policy_needs_a_multi_view_store(images, tmp_path) -> None:
    from pipeline.core.errors import ParamsError
    from pipeline.params import ExportParams
    from pipeline.teachers.export import export_logits

    model = build_model("cnn3", images.input_shape, 4)
    meta = {
        "arch": "cnn3",
        "input_shape": list(images.input_shape),
        "num_classes": 4,
        "generation": 0,
        "seed": 0,
        "dataset_fingerprint": images.fingerprint,
    }
    save_checkpoint(tmp_path / "m.pt", model, meta)
    export_logits(tmp_path / "m.pt", images, tmp_path / "g", ExportParams(device="cpu"), torch.device("cpu"))
    recipe = TrainParams(arch="cnn3", epochs=1, device="cpu")
    with pytest.raises(
        ParamsError, match=r"students.1.view_policy = 'cycle': the teacher's store .* has 1 un-augmented"
    ):
        train_generation(images, recipe, 1, GenParams(loss="ban", teacher=0, view_policy="cycle"), tmp_path / "g")


def zarr_array(store, name: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(store / name), mode="r")[:])
