"""Transfer sets (`data.n_unlabelled`): train rows without labels that a teacher exports logits for and a
student learns from, while label-only training, controls, checkpoint selection and fitness see the
labelled rows only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

import pipeline.train.inputs
import pipeline.train.loop
from pipeline.api import prepare_data
from pipeline.cache.store import LogitStore
from pipeline.core.errors import DatasetError, ParamsError
from pipeline.core.labels import UNLABELLED
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import load_prepared
from pipeline.losses import ban_l_loss, ce_loss, dkd_loss, kd_loss
from pipeline.params import DataParams, TrainParams, parse_generation, parse_section
from pipeline.train.controls import train_control
from pipeline.train.loop import train_generation
from stages import export, train
from stages.cli import main
from stages.common import ParamsFile
from tests.conftest import tiny_params

N_LABELLED, N_UNLABELLED = 150, 200  # of the 400 train rows of 500 MNIST-1D samples


def transfer_data(**kw: Any) -> dict[str, Any]:
    return {"dataset": "mnist1d", "num_samples": 500, "val_fraction": 0.1, "split_seed": 0, **kw}


@pytest.fixture(scope="module")
def transfer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with a transfer set: 150 labelled + 200 unlabelled train rows; generation 0 trained on the
    labelled rows and exported over all 350 (read-only: copy it)."""
    from stages import prepare

    root = tmp_path_factory.mktemp("transfer")
    raw = tiny_params(data=transfer_data(n_train=N_LABELLED, n_unlabelled=N_UNLABELLED))
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params, layout = ParamsFile(raw), ProjectPaths(root)
    prepare.run(params, layout)
    train.run(params, layout, 0)
    export.run(params, layout, 0)
    return root


def test_prepare_keeps_the_left_out_rows_without_labels(tmp_path: Path) -> None:
    data = prepare_data(tmp_path / "t.h5", params=DataParams(**transfer_data(n_train=150, n_unlabelled=200)))
    plain = prepare_data(tmp_path / "p.h5", params=DataParams(**transfer_data(n_train=150)))
    y = data.y_train
    assert len(y) == 350 and data.num_unlabelled == 200 and plain.num_unlabelled == 0
    assert (y[:150] >= 0).all() and (y[150:] == UNLABELLED).all()
    # the labelled rows are the subset drawn without unlabelled rows, and so is the validation split
    np.testing.assert_array_equal(data.x_train[:150], plain.x_train)
    np.testing.assert_array_equal(y[:150], plain.y_train)
    np.testing.assert_array_equal(data.val_index, plain.val_index)
    assert len(data.val_index) == 15 and (y[data.val_index] >= 0).all()
    # the unlabelled rows are other train rows of the full dataset: distinct source rows, none labelled
    src = data.source_index["train"]  # type: ignore[index]
    assert len(set(src.tolist())) == 350
    full = prepare_data(tmp_path / "f.h5", params=DataParams(**transfer_data()))
    np.testing.assert_array_equal(full.x_train[src], data.x_train)
    assert set(data.fit_index().tolist()) == set(range(150)) - set(data.val_index.tolist())
    assert set(data.fit_index(unlabelled=True).tolist()) == set(range(350)) - set(data.val_index.tolist())
    assert "200 of the train rows unlabelled" in data.description


def test_unlabelled_rows_need_a_labelled_subset_and_enough_rows(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="set data.n_train"):
        parse_section(DataParams, "data", transfer_data(n_unlabelled=10))
    with pytest.raises(ParamsError, match="n_unlabelled"):
        parse_section(DataParams, "data", transfer_data(n_train=10, n_unlabelled=0))
    with pytest.raises(DatasetError, match="of the 400 train rows, 250 are outside the 150-row labelled subset"):
        prepare_data(tmp_path / "t.h5", params=DataParams(**transfer_data(n_train=150, n_unlabelled=251)))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_kd_label_term_skips_unlabelled_rows_by_hand() -> None:
    """kd on a mixed batch: (1/B) [alpha * sum over labelled b of -log q_b,y_b] + (1 - alpha) T^2 (1/B)
    sum over every b of KL(p_T,b || q_T,b), computed here with numpy."""
    s = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, -2.0, 0.5]])
    t = np.array([[3.0, 0.0, -1.0], [0.0, 2.0, 1.0], [1.0, 1.0, -3.0], [-1.0, 0.0, 2.5]])
    y = np.array([0, UNLABELLED, 1, UNLABELLED])
    temp, alpha = 2.0, 0.3
    log_q1, log_qt, log_pt = _log_softmax(s), _log_softmax(s / temp), _log_softmax(t / temp)
    ce = -(log_q1[0, 0] + log_q1[2, 1]) / 4  # rows 1 and 3 have no label
    kl = (np.exp(log_pt) * (log_pt - log_qt)).sum(axis=-1).mean()
    want = alpha * ce + (1 - alpha) * temp**2 * kl
    st, tt, yt = torch.tensor(s), torch.tensor(t), torch.tensor(y)
    assert float(kd_loss(st, tt, yt, temp, alpha)) == pytest.approx(want, rel=1e-6)
    assert float(ce_loss(st, yt)) == pytest.approx(ce, rel=1e-6)
    # an all-unlabelled batch has no label term at all, and kd is then its soft term alone
    none = torch.full((4,), UNLABELLED)
    assert float(kd_loss(st, tt, none, temp, alpha)) == pytest.approx((1 - alpha) * temp**2 * kl, rel=1e-6)
    # ban+l: the BAN term over every row plus the same skipped label term
    ban = -(np.exp(log_pt) * log_qt).sum(axis=-1).mean() * temp**2
    assert float(ban_l_loss(st, tt, yt, temp)) == pytest.approx(ban + ce, rel=1e-6)


def test_dkd_splits_an_unlabelled_row_at_the_teacher_argmax() -> None:
    """An unlabelled row's DKD is the labelled formula with the teacher's argmax as target, minus its CE."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    y = torch.tensor([1, UNLABELLED, 4])
    pseudo = torch.where(y == UNLABELLED, t.argmax(-1), y)
    mixed = dkd_loss(s, t, y, 2.0, 1.0, 8.0)
    # per row: the labelled formula on that row alone, then the CE of the unlabelled row taken out
    rows = [dkd_loss(s[i : i + 1], t[i : i + 1], pseudo[i : i + 1], 2.0, 1.0, 8.0) for i in range(3)]
    ce_row1 = F.cross_entropy(s[1:2].float(), pseudo[1:2])
    assert float(mixed) == pytest.approx(float((sum(rows) - ce_row1) / 3), rel=1e-5)


def test_label_losses_are_the_same_bits_without_unlabelled_rows() -> None:
    """The masked CE is bit-identical to torch's default mean (value and gradient) on a labelled batch, so
    labelled datasets train exactly as before transfer sets existed."""
    torch.manual_seed(1)
    s = torch.randn(128, 10, requires_grad=True)
    y = torch.randint(0, 10, (128,))
    a, b = ce_loss(s, y), F.cross_entropy(s, y)
    (ga,) = torch.autograd.grad(a, s)
    (gb,) = torch.autograd.grad(b, s)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_export_covers_labelled_and_unlabelled_rows(transfer_root: Path) -> None:
    data = load_prepared(ProjectPaths(transfer_root).dataset)
    store = LogitStore.open(ProjectPaths(transfer_root).store(0), fingerprint=data.fingerprint)
    assert store.attrs["splits"]["train"] == 350
    assert store.attrs["unlabelled_rows"] == {"train": N_UNLABELLED}
    labels = np.asarray(store.group["train_labels"][:])
    np.testing.assert_array_equal(labels, data.y_train)
    assert int((labels == UNLABELLED).sum()) == N_UNLABELLED
    logits = np.asarray(store.array("train")[:])  # (rows, views, classes), float16
    assert logits.shape[0] >= 350 and np.isfinite(logits[:350].astype(np.float32)).all()


class _LabelSpy:
    """Every training batch's labels per run (a run starts at make_criterion) and every label set a
    validation sees."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs: list[list[int]] = []
        self.validated: list[list[int]] = []
        real_epoch, real_make = pipeline.train.loop.train_one_epoch, pipeline.train.loop.make_criterion
        real_dev, real_host = pipeline.train.inputs.device_accuracy, pipeline.train.inputs.predict_accuracy

        def make(*a: Any, **k: Any) -> Any:
            self.runs.append([])
            return real_make(*a, **k)

        def epoch(model: Any, batches: Any, *a: Any, **k: Any) -> float:
            def recording() -> Any:
                for x, y, teacher in batches:
                    self.runs[-1].extend(y.tolist())
                    yield x, y, teacher

            return real_epoch(model, recording(), *a, **k)

        def dev(model: Any, x: Any, y: Any, *a: Any, **k: Any) -> float:
            self.validated.append(torch.as_tensor(y).tolist())
            return real_dev(model, x, y, *a, **k)

        def host(model: Any, x: Any, y: Any, *a: Any, **k: Any) -> Any:
            self.validated.append(np.asarray(y).tolist())
            return real_host(model, x, y, *a, **k)

        monkeypatch.setattr(pipeline.train.loop, "make_criterion", make)
        monkeypatch.setattr(pipeline.train.loop, "train_one_epoch", epoch)
        monkeypatch.setattr(pipeline.train.inputs, "device_accuracy", dev)
        monkeypatch.setattr(pipeline.train.inputs, "predict_accuracy", host)


@pytest.mark.parametrize("budget", [4096, 0], ids=["resident", "streaming"])
def test_controls_and_selection_never_see_an_unlabelled_row(
    transfer_root: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    """A kd student trains on every fit row, its control (and a cwtm student, whose loss has only a label
    term) on the labelled fit rows only; best_val selection validates on labelled rows only. Both input
    paths."""
    data = load_prepared(ProjectPaths(transfer_root).dataset)
    store = ProjectPaths(transfer_root).store(0)
    recipe = parse_section(
        TrainParams, "train", {**tiny_params()["train"], "select": "best_val", "memory_budget_mib": budget}
    )
    spy = _LabelSpy(monkeypatch)
    kd = parse_generation(1, {"teacher": 0, "loss": "kd", "temperature": 2.0})
    train_generation(data, recipe, 1, kd, store)
    train_control(data, recipe, 1, kd)
    train_generation(data, recipe, 1, parse_generation(1, {"teacher": 0, "loss": "cwtm"}), store)
    student, control, cwtm = spy.runs
    fit_labelled, val = len(data.fit_index()), len(data.val_index)
    assert student.count(UNLABELLED) == N_UNLABELLED * recipe.epochs
    assert len(student) == (fit_labelled + N_UNLABELLED) * recipe.epochs
    for label_only in (control, cwtm):
        assert UNLABELLED not in label_only and len(label_only) == fit_labelled * recipe.epochs
    assert len(spy.validated) == 3 * recipe.epochs
    assert all(len(v) == val and UNLABELLED not in v for v in spy.validated)


def test_inspect_reports_fitness_on_labelled_rows_only(transfer_root: Path, tmp_path: Path) -> None:
    """`bancache inspect`: accuracy and fitness over the labelled rows (fitness: the labelled fit rows),
    the label-free statistics (entropy) over all 350 rows, and the unlabelled count; each by hand here."""
    import shutil

    root = tmp_path / "p"
    shutil.copytree(transfer_root, root)
    args = ["--root", str(root), "--params", str(root / "params.yaml"), "inspect", "--gen", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    layout = ProjectPaths(root)
    stats = json.loads((layout.inspect(0) / "statistics.json").read_text())
    metrics = json.loads((layout.inspect(0) / "metrics.json").read_text())
    data = load_prepared(layout.dataset)
    store = LogitStore.open(layout.store(0), fingerprint=data.fingerprint)
    z = np.asarray(store.array("train")[:350, 0, :]).astype(np.float64)
    logp = _log_softmax(z)
    pred, y, fit = z.argmax(-1), data.y_train, data.fit_index()
    labelled = y != UNLABELLED

    def entropy(rows: np.ndarray) -> float:
        return float(-(np.exp(logp[rows]) * logp[rows]).sum(-1).mean())

    assert stats["train"]["rows_unlabelled"] == N_UNLABELLED
    assert stats["train"]["accuracy"] == pytest.approx(float((pred[labelled] == y[labelled]).mean()), abs=1e-12)
    want_fit = float((pred[fit] == y[fit]).mean())
    assert stats["fitness"]["fit_accuracy"] == pytest.approx(want_fit, abs=1e-12)
    assert stats["train"]["accuracy_fit"] == pytest.approx(want_fit, abs=1e-12)
    assert metrics["fit_acc"] == pytest.approx(want_fit, abs=1e-12)
    assert stats["fitness"]["entropy_mean"] == pytest.approx(entropy(fit), rel=1e-5)  # labelled fit rows
    assert stats["train"]["entropy_mean"] == pytest.approx(entropy(np.arange(350)), rel=1e-5)  # every row


def test_a_chain_trains_on_a_transfer_set_through_the_cli(transfer_root: Path, tmp_path: Path) -> None:
    """`bancache train/export-logits` on a transfer set: a ban student of generation 0 trains on all 350
    rows' teacher targets, is exported over them, and a kd student learns from it in turn."""
    import shutil

    root = tmp_path / "p"
    shutil.copytree(transfer_root, root)
    base = ["--root", str(root), "--params", str(root / "params.yaml")]
    for args in (["train", "--gen", "1"], ["export-logits", "--gen", "1"], ["train", "--gen", "2"]):
        result = CliRunner().invoke(main, [*base, *args])
        assert result.exit_code == 0, result.output
    store = LogitStore.open(ProjectPaths(root).store(1))
    assert store.attrs["unlabelled_rows"] == {"train": N_UNLABELLED} and store.attrs["splits"]["train"] == 350
    assert ProjectPaths(root).model(2).exists()


def test_files_storage_keeps_unlabelled_files(tmp_path: Path) -> None:
    """An on-disk ImageFolder (data.storage: files) as a transfer set: the index lists the left-out files
    after the labelled ones, with label -1, and loads back checked."""
    from tests.test_files_dataset import files_params, make_folder

    make_folder(tmp_path / "imgs", {"train": 6, "test": 3})  # 18 train files, 6 per class
    data = prepare_data(tmp_path / "d.h5", params=files_params(tmp_path / "imgs", n_train=6, n_unlabelled=9))
    assert len(data.y_train) == 15 and data.num_unlabelled == 9 and (data.y_train[6:] == UNLABELLED).all()
    assert (data.y_train[data.val_index] != UNLABELLED).all()
    again = load_prepared(tmp_path / "d.h5")  # the fingerprint covers the labels, -1 included
    assert again.fingerprint == data.fingerprint and again.num_unlabelled == 9
    files = again.x_train.files.paths  # type: ignore[attr-defined]
    assert len(set(files)) == 15
    assert again.x_train[14:15].shape == (1, 3, 16, 16)  # an unlabelled file decodes like any other
