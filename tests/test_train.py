"""Training a generation: students learn from the cache alone, never from the teacher's model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipeline.models.checkpoint
import pipeline.models.registry
from pipeline.cache.store import LogitStore
from pipeline.core.paths import ProjectPaths
from pipeline.models.checkpoint import load_checkpoint
from stages import export, train
from stages.common import ParamsFile
from tests.conftest import tiny_params


def _teacher(project: ProjectPaths, params: ParamsFile) -> None:
    train.run(params, project, 0)
    export.run(params, project, 0)


def test_student_trains_with_teacher_checkpoint_destroyed(project: ProjectPaths) -> None:
    params = ParamsFile(tiny_params())
    _teacher(project, params)
    # Corrupt, then delete, generation 0's model: the student must not need it.
    project.model(0).write_bytes(b"not a checkpoint")
    train.run(params, project, 1)
    assert project.model(1).exists() and load_checkpoint(project.model(1))["meta"]["generation"] == 1
    for p in project.model_dir(0).iterdir():
        p.unlink()
    project.model_dir(0).rmdir()
    train.run(params, project, 1)
    ckpt = load_checkpoint(project.model(1))
    assert ckpt["meta"]["teacher"] == 0
    # The student records which teacher checkpoint produced its targets (from the store's attributes).
    assert (
        ckpt["meta"]["teacher_store_checkpoint_sha256"] == LogitStore.open(project.store(0)).attrs["checkpoint_sha256"]
    )


def test_student_builds_exactly_one_model_and_loads_no_checkpoint(project: ProjectPaths, monkeypatch) -> None:
    params = ParamsFile(tiny_params())
    _teacher(project, params)
    built = []
    real_build = pipeline.models.registry.build_model

    def counting_build(*args, **kwargs):
        built.append(args[0])
        return real_build(*args, **kwargs)

    def no_load(*args, **kwargs):
        raise AssertionError("a student must not load any checkpoint")

    monkeypatch.setattr("pipeline.train.loop.build_model", counting_build)
    monkeypatch.setattr(pipeline.models.checkpoint, "load_checkpoint", no_load)
    monkeypatch.setattr(torch, "load", no_load)
    train.run(params, project, 1)
    assert built == ["cnn1d"]


@pytest.mark.parametrize("budget", [0, 4096], ids=["streaming", "resident"])
def test_student_targets_follow_dataset_index_under_shuffling(project: ProjectPaths, monkeypatch, budget: int) -> None:
    """Every batch's teacher rows are the stored rows of that batch's dataset indices, and the criterion
    gets exactly them: on the streaming path (budget 0) and on the device-resident path."""
    raw = tiny_params()
    raw["train"] = {**raw["train"], "memory_budget_mib": budget}
    params = ParamsFile(raw)
    _teacher(project, params)
    stored = np.asarray(LogitStore.open(project.store(0)).array("train")[:, 0, :], dtype=np.float32)
    from pipeline.cache.device import DeviceTargets
    from pipeline.cache.reader import CachedTargets
    from pipeline.train import loop as lib

    cls = CachedTargets if budget == 0 else DeviceTargets
    batches, seen = [], []
    real_target, real_make = cls.teacher, lib.make_criterion

    training = []  # targets read inside train_one_epoch (the teacher-fitness check reads rows in order before it)
    real_epoch = lib.train_one_epoch

    def epoch_spy(*args, **kw):
        training.append(True)
        try:
            return real_epoch(*args, **kw)
        finally:
            training.pop()

    def target_spy(self, index, *, views=None, temperature=1.0):
        out = real_target(self, index, views=views, temperature=temperature)
        if training:
            batches.append((torch.as_tensor(index).clone(), out.clone()))
        return out

    def make_spy(gp, generator=None):
        criterion = real_make(gp, generator)

        def spy(student, teacher, labels):
            seen.append(teacher.clone())
            return criterion(student, teacher, labels)

        return spy

    monkeypatch.setattr(lib, "train_one_epoch", epoch_spy)
    monkeypatch.setattr(cls, "teacher", target_spy)
    monkeypatch.setattr(lib, "make_criterion", make_spy)
    train.run(params, project, 1)
    assert batches and len(seen) == len(batches)
    for (index, out), teacher in zip(batches, seen, strict=True):
        np.testing.assert_array_equal(out.numpy(), stored[index.numpy()])
        assert torch.equal(teacher, out)
    # Shuffled: the first batch is not rows 0..B-1 in order.
    assert not np.array_equal(batches[0][0].numpy(), np.sort(batches[0][0].numpy()))


def test_training_is_deterministic_on_cpu(project: ProjectPaths, tmp_path) -> None:
    params = ParamsFile(tiny_params())
    train.run(params, project, 0)
    first = load_checkpoint(project.model(0))["state_dict"]
    train.run(params, project, 0)
    second = load_checkpoint(project.model(0))["state_dict"]
    for k in first:
        torch.testing.assert_close(first[k], second[k], rtol=0, atol=0)


def test_students_get_new_seeds_and_metrics_are_written(project: ProjectPaths) -> None:
    params = ParamsFile(tiny_params())
    _teacher(project, params)
    train.run(params, project, 1)
    s0 = load_checkpoint(project.model(0))["meta"]["seed"]
    s1 = load_checkpoint(project.model(1))["meta"]["seed"]
    assert s0 != s1
    metrics = json.loads(project.train_metrics(1).read_text())
    assert 0.0 <= metrics["test_acc"] <= 1.0 and load_checkpoint(project.model(1))["meta"]["loss"] == "ban"
    # metrics only (for dvc metrics): generation, teacher and loss are in the checkpoint's meta
    # a label-free student also records its teacher's fitness (accuracy on its fit rows, entropy at T)
    # the names every metrics file shares (README, "DVC tables"), and the machine that made it
    assert set(metrics) == {"epoch", "train_loss", "val_acc", "test_acc", "teacher", "machine"}
    assert set(metrics["teacher"]) == {"fit_acc", "entropy", "warnings"} and metrics["teacher"]["fit_acc"] >= 0.0
    rows = project.train_plot(1).read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 1 + 2


def test_student_refuses_a_missing_teacher_store(project: ProjectPaths) -> None:
    from pipeline.core.errors import StoreNotFoundError

    with pytest.raises(StoreNotFoundError, match="export-logits"):
        train.run(ParamsFile(tiny_params()), project, 1)


def test_best_val_selection_uses_validation_not_test(project: ProjectPaths, monkeypatch) -> None:
    """select: best_val keeps the weights of the epoch with the highest validation accuracy: at lr 0.05 the
    tiny run's best epoch (3 of 4) is not its last, so a run that ignored `select` would keep other weights."""
    from pipeline.train import loop as lib

    raw = tiny_params()
    raw["train"] = {**raw["train"], "select": "best_val", "epochs": 4, "lr": 0.05}
    after_epoch = []  # the model's weights after each epoch (validation does not change them)
    real_epoch = lib.train_one_epoch

    def epoch_spy(model, *args, **kw):
        loss = real_epoch(model, *args, **kw)
        after_epoch.append({k: v.clone() for k, v in model.state_dict().items()})
        return loss

    monkeypatch.setattr(lib, "train_one_epoch", epoch_spy)
    m = train.run(ParamsFile(raw), project, 0)
    val = [float(row.split(",")[2]) for row in project.train_plot(0).read_text().splitlines()[1:]]
    best = 1 + val.index(max(val))  # the first epoch reaching the highest validation accuracy
    assert len(val) == len(after_epoch) == 4 and best != 4, f"the test needs a best epoch before the last: {val}"
    assert m["epoch"] == best
    ckpt = load_checkpoint(project.model(0))
    assert ckpt["meta"]["selected_epoch"] == best
    for k, v in ckpt["state_dict"].items():
        torch.testing.assert_close(v, after_epoch[best - 1][k], rtol=0, atol=0)
    assert any(not torch.equal(v, after_epoch[-1][k]) for k, v in ckpt["state_dict"].items())
