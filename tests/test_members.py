"""Ensemble teachers (pipeline/cache/members.py) and label-trained members: the target is the mean of the
members' softmax at T computed by hand (dense, top-k and multi-view members), or the softmax of the mean of
their logits; members that do not describe the same rows are refused with one line each; params accept a
list of earlier generations and `loss: ce` without a teacher, and refuse the inconsistent combinations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.api import open_targets
from pipeline.cache.device import DeviceEnsemble, device_targets, resident_bytes
from pipeline.cache.members import EnsembleTargets
from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import LogitStore
from pipeline.core.errors import ForeignStoreError, ParamsError
from pipeline.params import GenParams, parse_chain, parse_generation

FP = "ab" * 32
N, C, K = 12, 5, 2  # rows, classes, kept logits of the top-k member
AUG = {"kind": "crop+flip", "pad": 4, "size": 8, "seed": 0}


def _attrs(fingerprint: str = FP, classes: int = C) -> dict:
    return {
        "generation": 0,
        "arch": "tiny",
        "seed": 0,
        "temperature": 1.0,
        "checkpoint_sha256": "cd" * 32,
        "dataset_fingerprint": fingerprint,
        "class_names": [str(i) for i in range(classes)],
    }


def dense(path: Path, logits: np.ndarray, fingerprint: str = FP, aug: np.ndarray | None = None) -> Path:
    """A sealed float32 dense store of `logits` (N, V, C) (with `aug` (N, V, 3) crops and flips if V > 1)."""
    n, v, c = logits.shape
    s = LogitStore.create(
        path, {"train": n}, c, v, "float32", 4, _attrs(fingerprint, c), augmentation=AUG if v > 1 else None
    )
    s.write("train", 0, logits, aug=aug)
    s.seal()
    return path


def topk(path: Path, logits: np.ndarray) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """A sealed top-k store of `logits` (N, C), one view: its kept values, classes and mass (at T = 1)."""
    idx = np.argsort(-logits, axis=1)[:, :K]
    vals = np.take_along_axis(logits, idx, 1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    mass = np.take_along_axis(p, idx, 1).sum(1).astype(np.float32)
    s = LogitStore.create(
        path, {"train": len(logits)}, C, 1, "float32", 4, {**_attrs(), "topk_rest": "uniform"}, "topk", K
    )
    s.write("train", 0, vals[:, None], idx=idx[:, None].astype(np.int16), mass=mass[:, None])
    s.seal()
    return path, vals, idx, mass


def reader(path: Path, fingerprint: str = FP, classes: int = C) -> CachedTargets:
    return CachedTargets(path, "train", fingerprint, N, classes)


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp(z / t - (z / t).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def members(tmp_path: Path) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(0, 2, (N, 1, C)).astype(np.float32) for _ in range(3)]


def test_probs_target_is_the_mean_of_the_members_softmax_at_t(tmp_path: Path, members) -> None:
    paths = [dense(tmp_path / f"gen-{j}", z) for j, z in enumerate(members)]
    ens = EnsembleTargets([reader(p) for p in paths], "probs", [0, 1, 2])
    rows = np.array([7, 0, 3, 3, 11])
    t = 2.5
    want = sum(softmax(z[rows, 0], t) for z in members) / 3
    np.testing.assert_allclose(ens.target(torch.from_numpy(rows), temperature=t).p.numpy(), want, rtol=1e-5, atol=1e-7)
    # what training reads is that same distribution (a Probs), and so is the API's open_targets of a list
    np.testing.assert_allclose(ens.teacher(rows, temperature=t).p.numpy(), want, rtol=1e-5, atol=1e-7)
    api = open_targets([str(p) for p in paths], "train")
    np.testing.assert_allclose(api.target(rows, temperature=t).p.numpy(), want, rtol=1e-5, atol=1e-7)
    assert ens.checkpoint_sha256 == ["cd" * 32] * 3 and len(ens) == N


def test_logits_target_is_the_softmax_of_the_mean_logits(tmp_path: Path, members) -> None:
    ens = EnsembleTargets([reader(dense(tmp_path / f"gen-{j}", z)) for j, z in enumerate(members)], "logits")
    rows = np.arange(N)
    mean = sum(z[rows, 0] for z in members) / 3
    raw = ens.teacher(rows, temperature=3.0)
    assert isinstance(raw, torch.Tensor)  # raw mean logits: the loss softens them at its T
    np.testing.assert_allclose(raw.numpy(), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ens.target(rows, temperature=3.0).p.numpy(), softmax(mean, 3.0), rtol=1e-5, atol=1e-7)
    # differs from the probs mean: the option changes the target
    probs = sum(softmax(z[rows, 0], 3.0) for z in members) / 3
    assert not np.allclose(softmax(mean, 3.0), probs, atol=1e-4)


def test_dense_and_topk_members_mix_the_sparse_row_expanded_first(tmp_path: Path, members) -> None:
    z_dense, z_top = members[0], members[1][:, 0]
    path, vals, idx, mass = topk(tmp_path / "gen-1", z_top)
    ens = EnsembleTargets([reader(dense(tmp_path / "gen-0", z_dense)), reader(path)], "probs", [0, 1])
    t = 2.0
    rebuilt = np.tile(((1 - mass) / (C - K))[:, None], (1, C))  # topk_rest uniform, by hand
    kept = softmax(vals, t) * mass[:, None]
    np.put_along_axis(rebuilt, idx, kept, 1)
    want = (softmax(z_dense[:, 0], t) + rebuilt) / 2
    np.testing.assert_allclose(ens.target(np.arange(N), temperature=t).p.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(
        ParamsError, match=r"^ensemble = 'logits' averages every member's C logits, but member generation 1 "
    ):
        EnsembleTargets([reader(dense(tmp_path / "gen-2", z_dense)), reader(path)], "logits", [0, 1])


def _views(n: int, v: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tlf = rng.integers(0, 9, (n, v, 3)).astype(np.int16)
    tlf[..., 2] %= 2
    tlf[:, 0] = (4, 4, 0)  # view 0 is the clean image
    return tlf


def test_multi_view_members_are_read_at_each_rows_view(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    zs = [rng.normal(0, 2, (N, 3, C)).astype(np.float32) for _ in range(2)]
    aug = _views(N, 3, 0)
    ens = EnsembleTargets([reader(dense(tmp_path / f"gen-{j}", z, aug=aug)) for j, z in enumerate(zs)], "probs")
    rows, views = np.array([0, 5, 5, 9]), np.array([2, 0, 1, 2])
    want = sum(softmax(z[rows, views], 1.5) for z in zs) / 2
    np.testing.assert_allclose(ens.target(rows, views=views, temperature=1.5).p.numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ens.aug(rows, views).top.numpy(), aug[rows, views, 0])
    # other crops and flips in one member: refused, saying how to re-export
    other = dense(tmp_path / "gen-9", zs[0], aug=_views(N, 3, 1))
    with pytest.raises(ForeignStoreError, match=r"hold different views .*re-export the members with the same export"):
        EnsembleTargets([reader(tmp_path / "gen-0"), reader(other)])
    one_view = dense(tmp_path / "gen-8", zs[0][:, :1])
    with pytest.raises(ForeignStoreError, match=r"hold different views \(views 3 vs 1"):
        EnsembleTargets([reader(tmp_path / "gen-0"), reader(one_view)])


def test_members_of_other_datasets_or_class_counts_are_refused(tmp_path: Path, members) -> None:
    a = dense(tmp_path / "gen-0", members[0])
    b = dense(tmp_path / "gen-1", members[1], fingerprint="ef" * 32)
    with pytest.raises(ForeignStoreError, match=r"^ensemble members .* were exported from different datasets"):
        open_targets([a, b], "train")  # the API without data: the members are checked against each other
    c = dense(tmp_path / "gen-2", np.zeros((N, 1, C + 1), np.float32))
    with pytest.raises(ForeignStoreError, match=r"have 5 and 6 classes; re-export every member"):
        open_targets([a, c], "train")
    with pytest.raises(ForeignStoreError, match="exported from another dataset"):  # with the data: each member
        EnsembleTargets([reader(a), reader(b)])


def test_device_ensemble_serves_the_host_readers_targets(tmp_path: Path, members) -> None:
    ens = EnsembleTargets([reader(dense(tmp_path / f"gen-{j}", z)) for j, z in enumerate(members)], "probs")
    dev = device_targets(ens, torch.device("cpu"), np.arange(N), all_views=False)
    assert isinstance(dev, DeviceEnsemble)
    rows = torch.tensor([3, 1, 4, 1, 5])
    host = ens.teacher(rows, temperature=2.0)
    got = dev.teacher(rows, views=None, temperature=2.0)
    assert isinstance(got, type(host))
    torch.testing.assert_close(got.p, host.p, rtol=0, atol=0)  # type: ignore[union-attr]


def test_the_memory_budget_counts_every_member(tmp_path: Path, members) -> None:
    from types import SimpleNamespace

    data = SimpleNamespace(x_train=np.zeros((N, 1, 3), np.float32), y_train=np.zeros(N, np.int64))
    readers = [reader(dense(tmp_path / f"gen-{j}", z)) for j, z in enumerate(members)]
    base = data.x_train.nbytes + data.y_train.nbytes
    one = resident_bytes(data, readers[0], False) - base  # type: ignore[arg-type]
    assert one == N * C * 4  # float32 rows of one member
    assert resident_bytes(data, EnsembleTargets(readers), False) - base == 3 * one  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ params


def test_params_accept_ensemble_teachers_and_label_trained_members() -> None:
    gp = parse_generation(4, {"teacher": [0, 3, 2], "loss": "kd", "ensemble": "logits"})
    assert gp.members == (0, 3, 2) and gp.ensemble == "logits"
    member = parse_generation(2, {"teacher": None, "loss": "ce"})
    assert member.members == () and member.loss == "ce"
    chain = parse_chain({}, {"1": {"loss": "ce"}, "2": {"loss": "ce", "seed": 9}, "3": {"teacher": [0, 1, 2]}})
    assert chain.gens[3].members == (0, 1, 2) and chain.gens[1].teacher is None
    assert GenParams(teacher=1).members == (1,)


@pytest.mark.parametrize(
    ("gen", "raw", "line"),
    [
        (3, {"teacher": [0, 3]}, r"^students\.3\.teacher = \[0, 3\]: member 3 is not an earlier generation; every "),
        (3, {"teacher": [0, 1, 0]}, r"^students\.3\.teacher = \[0, 1, 0\]: generation 0 is listed more than once"),
        (3, {"teacher": []}, r"^students\.3\.teacher = \[\]: an ensemble teacher needs at least one member"),
        (3, {"teacher": [0, "x"]}, r"^students\.3\.teacher = \[0, 'x'\]: expected int or a list of int or null$"),
        (2, {"teacher": 0, "loss": "ce"}, r"^students\.2\.loss = 'ce' ignores the teacher 0: use one of ban, "),
        (2, {"teacher": [0, 1], "loss": "ce"}, r"ignores the teacher \[0, 1\].*or set teacher: null to train"),
        (2, {"loss": "kd"}, r"^students\.2\.teacher: unset, but loss 'kd' learns from a teacher\. .*set loss: ce"),
        (2, {"teacher": [0, 1], "ensemble": "median"}, r"^students\.2\.ensemble = 'median': allowed values are probs"),
    ],
)
def test_inconsistent_teachers_are_refused_with_one_line(gen: int, raw: dict, line: str) -> None:
    with pytest.raises(ParamsError, match=line) as e:
        parse_generation(gen, raw)
    assert "\n" not in str(e.value)


def test_a_member_missing_from_the_chain_is_named() -> None:
    with pytest.raises(ParamsError, match=r"^students\.3\.teacher = \[0, 2\]: no such generation 2\. Generations"):
        parse_chain({}, {"1": {"loss": "ce"}, "3": {"teacher": [0, 2]}})


# ------------------------------------------------------------------------------------------------ a chain


def test_a_chain_of_label_trained_members_and_an_ensemble_student(project, monkeypatch) -> None:
    """gen 1 trains from labels with its own seed (train.seed + 1); gen 2 learns from [0, 1]; its checkpoint
    and its own store record both members; the resident and streaming paths train it bit-identically."""
    from pipeline.models.checkpoint import load_checkpoint
    from stages import control, export, teachers, train
    from stages.common import ParamsFile
    from tests.conftest import tiny_params

    students = {"1": {"loss": "ce", "teacher": None}, "2": {"teacher": [0, 1], "loss": "ban", "temperature": 2.0}}
    params = ParamsFile(tiny_params(students=students))
    for g in (0, 1):
        train.run(params, project, g)
        export.run(params, project, g)
    m0, m1 = (load_checkpoint(project.model(g)) for g in (0, 1))
    assert (m1["meta"]["seed"], m1["meta"]["loss"], m1["meta"]["teacher"]) == (1, "ce", None)
    assert not torch.equal(
        m0["state_dict"][next(iter(m0["state_dict"]))], m1["state_dict"][next(iter(m1["state_dict"]))]
    )
    train.run(params, project, 2)
    meta = load_checkpoint(project.model(2))["meta"]
    shas = [LogitStore.open(project.store(g)).attrs["checkpoint_sha256"] for g in (0, 1)]
    assert meta["teacher"] == [0, 1] and meta["teacher_store_checkpoint_sha256"] == shas
    assert meta["ensemble"] == "probs"
    export.run(params, project, 2)
    attrs = LogitStore.open(project.store(2)).attrs
    assert attrs["teacher"] == [0, 1] and attrs["trained_with"]["teacher"] == [0, 1]
    # teachers_2's record: the marker hash of each member (what dvc.yaml's train@2 depends on)
    record = teachers.run(params, project, 2)
    assert record["teacher"] == [0, 1] and set(record["stores"]) == {"0", "1"}
    assert teachers.run(params, project, 1)["stores"] == {}
    # the streaming path (budget 0) trains the same weights, read in the same epoch order
    monkeypatch.setattr("pipeline.train.inputs.epoch_sampler", lambda *a, **k: None)
    resident = load_checkpoint(project.model(2))["state_dict"]
    raw = tiny_params(students=students)
    raw["train"] = {**raw["train"], "memory_budget_mib": 0}
    train.run(ParamsFile(raw), project, 2)
    streamed = load_checkpoint(project.model(2))["state_dict"]
    assert all(torch.equal(resident[k], streamed[k]) for k in resident)
    # inspect --against teacher compares generation 2 with its ensemble's mean (T = inspect.temperature = 1)
    from stages import audit

    m = audit.run(params, project, 2, "teacher")
    test = [LogitStore.open(project.store(g)).array("test")[:, 0, :].astype(np.float64) for g in (0, 1, 2)]
    mean = (softmax(test[0], 1.0) + softmax(test[1], 1.0)) / 2
    assert m["against"] == "ensemble 0+1"
    assert m["test"]["agreement"] == pytest.approx(float((test[2].argmax(1) == mean.argmax(1)).mean()))
    kl = (mean * (np.log(mean) - np.log(softmax(test[2], 1.0)))).sum(1).mean()
    assert m["test"]["kl_mean"] == pytest.approx(kl, rel=1e-3)
    # a label-trained member has no teacher: it is compared with generation 0
    assert audit.run(params, project, 1, "teacher")["against"] == 0
    # the report names the label-trained member (its BAN-1 column is not a born-again student)
    from stages import ensemble, report

    export.run(params, project, 2)  # the last training above was the streamed one: same weights
    ensemble.run(params, project)
    text = report.run(project)
    assert "| 1 | cnn1d | ce | labels |" in text and "| 2 | cnn1d | ban | generations 0, 1 |" in text
    assert "Generations 1 train from labels (loss ce, no teacher): their BAN-k columns are label-trained" in text
    # a label-trained member's control is itself retrained: it runs like any control
    assert (
        control.run(ParamsFile({**tiny_params(students=students), "train_controls": True}), project, 1)["loss"] == "ce"
    )
