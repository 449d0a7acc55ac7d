"""`bancache inspect` and `convert`: each statistic on hand-made logits, streamed results equal to the
whole-array ones, one chunk read at a time, and the CLI end to end on a tiny trained chain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner
from matplotlib.image import imread

import pipeline.audit.statistics as ins
from pipeline.cache.convert import convert_store
from pipeline.cache.store import LogitStore
from pipeline.core.errors import ParamsError, StoreError
from pipeline.data.prepared import DatasetLabels, load_prepared
from pipeline.params import InspectParams, parse_section
from stages.cli import main
from stages.common import ParamsFile
from tests.conftest import tiny_params

FP = "ef" * 32


def make_store(path: Path, train: np.ndarray, test: np.ndarray, chunk_rows: int, dtype: str = "float32") -> LogitStore:
    c = train.shape[-1]
    attrs = {
        "generation": 0,
        "arch": "tiny",
        "seed": 0,
        "temperature": 1.0,
        "checkpoint_sha256": "00" * 32,
        "dataset_fingerprint": FP,
        "class_names": [f"c{i}" for i in range(c)],
    }
    store = LogitStore.create(path, {"train": len(train), "test": len(test)}, c, 1, dtype, chunk_rows, attrs)
    store.write("train", 0, train)
    store.write("test", 0, test)
    store.seal()
    return LogitStore.open(path)


def labels_of(y_train: np.ndarray, y_test: np.ndarray, c: int, val_index=None) -> DatasetLabels:
    return DatasetLabels(y_train, y_test, [f"c{i}" for i in range(c)], FP, val_index)


def binary_logits(p: float) -> list[float]:
    """Logits whose softmax is [p, 1 - p]."""
    return [math.log(p), math.log(1 - p)]


# -- statistics on hand-made logits --------------------------------------------------------------------
@pytest.mark.parametrize("c", [2, 10, 100])
def test_uniform_rows(c: int) -> None:
    logp = ins.log_softmax(np.full((3, c), 7.0))
    np.testing.assert_allclose(ins.entropy(logp), math.log(c))
    np.testing.assert_allclose(ins.max_prob(logp), 1 / c)
    np.testing.assert_allclose(ins.dark_mass(logp), (c - 1) / c)


def test_one_hot_like_row_and_temperature() -> None:
    z = np.zeros((1, 10))
    z[0, 4] = 60.0
    logp = ins.log_softmax(z)
    assert ins.entropy(logp)[0] == pytest.approx(0.0, abs=1e-20)
    assert ins.max_prob(logp)[0] == pytest.approx(1.0) and ins.dark_mass(logp)[0] < 1e-20
    # softmax(z / T): logits [2, 0] at T = 2 are logits [1, 0] at T = 1.
    np.testing.assert_allclose(ins.log_softmax(np.array([[2.0, 0.0]]), 2.0), ins.log_softmax(np.array([[1.0, 0.0]])))
    p = 1 / (1 + math.exp(-1))
    assert ins.entropy(ins.log_softmax(np.array([[2.0, 0.0]]), 2.0))[0] == pytest.approx(
        -(p * math.log(p) + (1 - p) * math.log(1 - p))
    )


def test_similarity_on_a_constructed_case() -> None:
    # Class 0: non-target logits log 3, log 1 -> [0, 0.75, 0.25], exact even with a huge target logit
    # (where 1 - p_y is 0 in floating point). Class 1: [0.5, 0, 0.5] and [0.9, 0, 0.1] -> mean [0.7, 0, 0.3].
    logits = np.array(
        [
            [5.0, math.log(3), 0.0],
            [1000.0, math.log(3), 0.0],
            [0.0, 10.0, 0.0],
            [math.log(0.9), 3.0, math.log(0.1)],
        ]
    )
    stats = ins.TargetStats(3)
    stats.update(0, logits, np.array([0, 0, 1, 1]))
    sim = stats.similarity()
    np.testing.assert_allclose(sim[:2], [[0.0, 0.75, 0.25], [0.7, 0.0, 0.3]], atol=1e-12)
    assert np.isnan(sim[2]).all()  # class 2 has no sample


def test_ece_of_calibrated_data_is_zero() -> None:
    # conf 0.6 with 6/10 right and conf 0.9 with 9/10 right: every bin's accuracy equals its confidence.
    logits = np.array([binary_logits(0.6)] * 10 + [binary_logits(0.9)] * 10)
    labels = np.array([0] * 6 + [1] * 4 + [0] * 9 + [1])
    cal = ins.Calibration(bins=10)
    cal.update(0, logits, labels)
    assert cal.metrics()["ece"] == pytest.approx(0.0, abs=1e-12)
    # Labels drawn from the predicted distribution are calibrated in expectation.
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(200_000, 5))
    p = np.exp(ins.log_softmax(z))
    y = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    cal = ins.Calibration(bins=15)
    cal.update(0, z, y)
    assert cal.metrics()["ece"] < 0.01


def test_ece_of_an_overconfident_case() -> None:
    # 10 samples at conf 0.9 with 5 right (gap 0.4), 10 at conf 0.6 with 6 right (gap 0):
    # ECE = 10/20 * 0.4 + 10/20 * 0 = 0.2.
    logits = np.array([binary_logits(0.9)] * 10 + [binary_logits(0.6)] * 10)
    labels = np.array([0] * 5 + [1] * 5 + [0] * 6 + [1] * 4)
    cal = ins.Calibration(bins=10)
    cal.update(0, logits, labels)
    m = cal.metrics()
    assert m["ece"] == pytest.approx(0.2) and m["accuracy"] == pytest.approx(0.55)
    assert [(r["count"], round(r["confidence"], 6), r["accuracy"]) for r in cal.reliability()] == [
        (10, 0.6, 0.6),
        (10, 0.9, 0.5),
    ]


def test_kl_and_agreement() -> None:
    ref, other = np.log([[0.8, 0.2]]), np.log([[0.4, 0.6]])
    kl = ins.kl_divergence(ins.log_softmax(ref), ins.log_softmax(other))
    assert kl[0] == pytest.approx(0.8 * math.log(2) + 0.2 * math.log(1 / 3))
    acc = ins.Agreement(2)
    acc.update(0, np.vstack([other, ref]), np.vstack([ref, ref]), np.array([1, 0]))
    kl_c, agree_c = acc.per_class()
    assert kl_c[1] == pytest.approx(kl[0]) and kl_c[0] == pytest.approx(0.0)
    assert agree_c.tolist() == [1.0, 0.0] and acc.metrics()["agreement"] == 0.5


def test_kl_between_identical_stores_is_zero(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tr, te = rng.normal(0, 3, (300, 6)), rng.normal(0, 3, (50, 6))
    a = make_store(tmp_path / "a", tr, te, chunk_rows=64, dtype="float16")
    b = make_store(tmp_path / "b", tr, te, chunk_rows=100, dtype="float16")
    labels = labels_of(rng.integers(0, 6, 300), rng.integers(0, 6, 50), 6)
    for acc in ins.compare_stores(a, b, labels, temperature=2.0).values():
        assert acc.metrics()["kl_mean"] == pytest.approx(0.0, abs=1e-12) and acc.metrics()["agreement"] == 1.0
        kl_c, agree_c = acc.per_class()
        assert np.allclose(kl_c, 0.0) and (agree_c == 1.0).all()
    shifted = make_store(tmp_path / "c", np.roll(tr, 1, axis=1), te, chunk_rows=64)
    assert ins.compare_stores(shifted, a, labels, 1.0)["train"].metrics()["agreement"] < 0.5


def test_noise_list_finds_the_planted_sample() -> None:
    c, n = 5, 400
    y = np.arange(n) % c
    logits = np.eye(c)[y] * 4.0  # right, max p = e^4 / (e^4 + 4) ~ 0.93
    logits[137] = np.eye(c)[(y[137] + 2) % c] * 12.0  # planted: wrong with max p ~ 1
    logits[250] = np.eye(c)[(y[250] + 1) % c] * 1.0  # wrong but unsure: not listed
    val = np.zeros(n, bool)
    val[[137, 300, 301]] = True  # validation rows: the teacher never fitted them
    stats = ins.TargetStats(c, noise_confidence=0.99, max_listed=50)
    stats.update(0, logits, y, val)
    rows = stats.noisy_rows([f"c{i}" for i in range(c)])
    assert [r["index"] for r in rows] == [137] and stats.noisy_count == 1
    assert rows[0]["label"] == y[137] and rows[0]["predicted"] == (y[137] + 2) % c
    assert rows[0]["predicted_name"] == f"c{(y[137] + 2) % c}" and rows[0]["confidence"] > 0.99
    assert rows[0]["validation_row"] is True
    m = stats.metrics()
    assert m["accuracy"] == pytest.approx((n - 2) / n) and m["likely_noisy_in_val"] == 1
    assert m["accuracy_val"] == pytest.approx(2 / 3) and m["accuracy_fit"] == pytest.approx((n - 4) / (n - 3))


HEADING = "## Likely label noise: "


@pytest.mark.parametrize(
    ("planted", "max_listed", "heading", "in_table"),
    [
        (14, 50, "14 samples (the 10 most confident here, all 14 in [noisy.csv](noisy.csv))", 10),
        (14, 12, "14 samples (the 10 most confident here, the 12 most confident in [noisy.csv](noisy.csv))", 10),
        (3, 50, "3 samples (all 3 here, all 3 in [noisy.csv](noisy.csv))", 3),
        (0, 50, "none found", 0),
    ],
)
def test_summary_noise_heading_says_what_its_table_and_noisy_csv_hold(
    tmp_path: Path, planted: int, max_listed: int, heading: str, in_table: int
) -> None:
    """summary.md's likely-noise heading counts exactly the rows of the table under it and of noisy.csv;
    both list the most confident samples first."""
    from pipeline.audit.files import write_store_audit

    c, n = 5, 200
    y = np.arange(n) % c
    logits = np.eye(c)[y] * 1.0  # right, max p = e / (e + 4) ~ 0.40: never listed
    planted_rows = [7 + 13 * k for k in range(planted)]  # wrong, confidence falling with k, all >= 0.99
    for k, i in enumerate(planted_rows):
        logits[i] = np.eye(c)[(y[i] + 1) % c] * (10.0 - 0.3 * k)
    store = make_store(tmp_path / "s", logits, logits[:50], chunk_rows=64)
    p = InspectParams(noise_confidence=0.99, max_listed=max_listed)
    stats, calib = ins.audit_store(store, labels_of(y, y[:50], c), p)
    out = tmp_path / "out"
    write_store_audit(out, 0, store.attrs, [f"c{i}" for i in range(c)], stats, calib, p)

    lines = (out / "summary.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(HEADING))
    assert lines[at] == HEADING + heading
    table = [line for line in lines[at + 1 :] if line.startswith("| ")][1:] if planted else []  # minus the header
    assert [int(row.split(" | ")[0].strip("| ")) for row in table] == planted_rows[:in_table]
    listed = (out / "noisy.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in listed] == planted_rows[:max_listed]
    assert "learned from labels" in lines[2]  # generation 0's store has no teacher (attribute None)


# -- streaming -----------------------------------------------------------------------------------------
def _summary(stats: ins.TargetStats, calib: ins.Calibration) -> dict:
    return {
        "metrics": stats.metrics(),
        "calib": calib.metrics(),
        "reliability": calib.reliability(),
        "ent": stats.entropy_hist.tolist(),
        "mp": stats.max_prob_hist.tolist(),
        "sim": np.nan_to_num(stats.similarity()),
        "noisy": stats.noisy_rows([f"c{i}" for i in range(7)]),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["ent"] == b["ent"] and a["mp"] == b["mp"]
    rel_a, rel_b = ([list(r.values()) for r in x["reliability"]] for x in (a, b))
    np.testing.assert_allclose(rel_a, rel_b, rtol=1e-9)
    for key in ("metrics", "calib"):
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(a["sim"], b["sim"], rtol=1e-9, atol=1e-12)
    assert [(r["index"], r["validation_row"]) for r in a["noisy"]] == [
        (r["index"], r["validation_row"]) for r in b["noisy"]
    ]
    np.testing.assert_allclose([r["confidence"] for r in a["noisy"]], [r["confidence"] for r in b["noisy"]], rtol=1e-12)


@pytest.mark.parametrize("chunk_rows", [1, 7, 128, 999, 1000, 5000])
def test_chunked_store_audit_equals_whole_array(tmp_path: Path, chunk_rows: int) -> None:
    rng = np.random.default_rng(chunk_rows)
    tr, te = rng.normal(0, 4, (1000, 7)).astype(np.float16), rng.normal(0, 4, (300, 7)).astype(np.float16)
    ytr, yte = rng.integers(0, 7, 1000), rng.integers(0, 7, 300)
    p = InspectParams(temperature=1.5, ece_bins=10, noise_confidence=0.8, max_listed=20)
    val_index = np.sort(rng.choice(1000, 100, replace=False))
    val = np.isin(np.arange(1000), val_index)
    whole = ins.TargetStats(7, p.temperature, p.noise_confidence, p.max_listed)
    whole.update(0, tr.astype(np.float64), ytr, val)
    whole_cal = ins.Calibration(p.ece_bins, p.temperature)
    whole_cal.update(0, te.astype(np.float64), yte)
    assert whole.noisy_count > p.max_listed  # the list is truncated, so the merge order matters

    store = make_store(tmp_path / "s", tr, te, chunk_rows, dtype="float16")
    stats, calib = ins.audit_store(store, labels_of(ytr, yte, 7, val_index), p)
    _assert_same(_summary(stats, calib), _summary(whole, whole_cal))


class RecordingArray:
    """A zarr array stand-in that records the rows each read asks for."""

    def __init__(self, arr, reads: list[tuple[int, int, int]]) -> None:
        self.arr, self.reads = arr, reads
        self.chunks, self.shape, self.dtype = arr.chunks, arr.shape, arr.dtype

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        assert isinstance(rows, slice), f"read of rows {rows!r}"
        start, stop, _ = rows.indices(self.shape[0])
        self.reads.append((start, stop, self.chunks[0]))
        return self.arr[key]


def test_inspector_reads_one_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    tr, te = rng.normal(0, 3, (1000, 4)), rng.normal(0, 3, (250, 4))
    a = make_store(tmp_path / "a", tr, te, chunk_rows=96)
    b = make_store(tmp_path / "b", tr + 1, te, chunk_rows=64)
    reads: list[tuple[int, int, int]] = []
    monkeypatch.setattr(LogitStore, "array", lambda self, split: RecordingArray(self.group[split], reads))
    labels = labels_of(rng.integers(0, 4, 1000), rng.integers(0, 4, 250), 4)

    ins.audit_store(a, labels, InspectParams())
    assert sum(stop - start for start, stop, _ in reads) == 1250  # every row, once
    assert all(stop - start <= chunk and start % chunk == 0 for start, stop, chunk in reads)
    reads.clear()
    ins.compare_stores(a, b, labels, 1.0)
    assert sum(stop - start for start, stop, _ in reads) == 2 * 1250
    assert max(stop - start for start, stop, _ in reads) <= 96  # one chunk of `a`, under two of `b`


# -- params, convert -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"temperature": 0}, "inspect.temperature = 0.0: must be > 0.0"),
        ({"ece_bins": 0}, "inspect.ece_bins = 0: must be >= 1"),
        ({"noise_confidence": 1.5}, "inspect.noise_confidence = 1.5: must be >= 0.0 and <= 1.0"),
        ({"max_listed": -1}, "inspect.max_listed = -1: must be >= 0"),
        ({"bins": 3}, "inspect.bins: unknown key"),
    ],
)
def test_bad_inspect_params(raw: dict, needle: str) -> None:
    with pytest.raises(ParamsError) as e:
        parse_section(InspectParams, "inspect", raw)
    assert needle in str(e.value)


def test_params_file_validates_the_inspect_section() -> None:
    assert parse_section(InspectParams, "inspect", yaml.safe_load(open("params.yaml"))["inspect"]) == (
        InspectParams(temperature=1.0, ece_bins=15, noise_confidence=0.9, max_listed=50)
    )
    with pytest.raises(ParamsError, match="inspect.ece_bins"):
        ParamsFile(tiny_params(inspect={"ece_bins": 0})).validate()


@pytest.mark.parametrize("fmt", ["h5", "npz"])
def test_convert_round_trip(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(4)
    tr, te = rng.normal(0, 3, (130, 5)), rng.normal(0, 3, (20, 5))
    store = make_store(tmp_path / "s", tr, te, chunk_rows=32, dtype="float16")
    out = convert_store(store, tmp_path / "out" / f"gen.{fmt}", fmt)
    if fmt == "npz":
        with np.load(out) as f:
            arrays = {k: f[k] for k in ("train", "test")}
            attrs = json.loads(str(f["attributes"]))
    else:
        with h5py.File(out, "r") as f:
            arrays = {k: f[k][()] for k in ("train", "test")}
            attrs = json.loads(f.attrs["attributes"])
    for split in ("train", "test"):
        assert arrays[split].dtype == np.float16
        np.testing.assert_array_equal(arrays[split], store.array(split)[:])
    assert attrs["dataset_fingerprint"] == FP and attrs["splits"] == {"train": 130, "test": 20}
    assert sorted(p.name for p in out.parent.iterdir()) == [f"gen.{fmt}"]  # no temporary left behind
    with pytest.raises(ParamsError, match="is a directory"):
        convert_store(store, tmp_path, fmt)


def test_convert_keeps_every_array_and_inspect_refuses_sparse_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = make_store(tmp_path / "s", rng.normal(0, 3, (40, 4)), rng.normal(0, 3, (10, 4)), chunk_rows=16)
    group = zarr.open_group(str(tmp_path / "s"), mode="r+")
    mass = group.create_array("train_mass", shape=(40, 1), chunks=(16, 1), dtype="float32")
    mass[:] = rng.random((40, 1))
    # train_mass was added after sealing: only a trusted (unverified) store converts with it
    out = convert_store(LogitStore.open(tmp_path / "s", verify=False), tmp_path / "all.npz", "npz")
    with np.load(out) as f:
        assert set(f.files) == {"train", "test", "train_mass", "attributes"}
        np.testing.assert_array_equal(f["train_mass"], mass[:])
    attrs = {k: v for k, v in store.attrs.items() if k in ("generation", "arch", "seed", "temperature")}
    attrs |= {k: store.attrs[k] for k in ("checkpoint_sha256", "dataset_fingerprint", "class_names")}
    topk = LogitStore.create(tmp_path / "k", {"train": 40, "test": 10}, 4, 1, "float32", 16, attrs, "topk", 2)
    for split, n in (("train", 40), ("test", 10)):
        idx = np.tile([0, 1], (n, 1)).astype(np.int16)
        topk.write(split, 0, rng.normal(0, 3, (n, 2)), idx=idx[:, None], mass=np.full((n, 1), 0.5))
    topk.seal()
    with pytest.raises(StoreError, match="layout 'topk'"):
        ins.open_checked(topk.path, labels_of(np.zeros(40, int), np.zeros(10, int), 4))


# -- end to end through the CLI ------------------------------------------------------------------------
def _cli(layout, *args):
    params = layout.root / "params.yaml"
    if not params.exists():
        params.write_text(yaml.safe_dump(tiny_params()))
    return CliRunner().invoke(main, ["--params", str(params), "--root", str(layout.root), *args])


def _dvc_paths(stage: str, gen: int) -> list[str]:
    """Every output path dvc.yaml declares for an inspect stage of generation `gen`."""
    st = yaml.safe_load(open("dvc.yaml"))["stages"][stage]
    st = st.get("do", st)
    paths = [next(iter(e)) if isinstance(e, dict) else e for k in ("metrics", "plots", "outs") for e in st.get(k, [])]
    return [p.replace("${key}", str(gen)) for p in paths]


def test_cli_inspect_compare_convert(project) -> None:
    from stages import export, train

    for gen in (0, 1, 2):
        train.run(ParamsFile(tiny_params()), project, gen)
        export.run(ParamsFile(tiny_params()), project, gen)
    root = project.root

    r = _cli(project, "inspect", "--gen", "0")
    assert r.exit_code == 0, r.output
    out = root / "inspect" / "gen-0"
    for rel in _dvc_paths("inspect_teacher", 0):
        assert (root / rel).exists(), rel
    figs = {p.name: imread(p) for p in (out / "figures").glob("*.png")}
    assert set(figs) == {"entropy.png", "max_prob.png", "similarity.png", "reliability.png"}
    assert all(img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 for img in figs.values())
    m = json.loads((out / "statistics.json").read_text())
    head = json.loads((out / "metrics.json").read_text())  # the headline, under the names every file shares
    assert {k: v for k, v in head.items() if k != "machine"} == {
        "test_acc": m["test"]["accuracy"],
        "val_acc": m["train"]["accuracy_val"],
        "ece": m["test"]["ece"],
        "noisy": m["train"]["likely_noisy"],
        "fit_acc": m["fitness"]["fit_accuracy"],
        "entropy": m["fitness"]["entropy_mean"],
    }
    y_train = load_prepared(project.dataset).y_train
    stored = LogitStore.open(project.store(0)).array("train")[:, 0, :]  # tiny: read whole, independently
    assert m["train"]["accuracy"] == pytest.approx(float((stored.argmax(-1) == y_train).mean()))
    assert 0.0 < m["train"]["entropy_mean"] < math.log(10) and 0.0 <= m["test"]["ece"] <= 1.0
    summary = (out / "summary.md").read_text()
    for name in figs:
        assert f"(figures/{name})" in summary
    header = (out / "similarity.csv").read_text().splitlines()[0]
    assert header == "class," + ",".join(str(i) for i in range(10))

    # The stage reads only the params section its dvc.yaml stage declares.
    from stages import audit as stage

    p = ParamsFile(tiny_params())
    stage.run(p, project, 1)
    assert p.used == {"inspect"}
    for rel in _dvc_paths("inspect", 1):
        assert (root / rel).exists(), rel

    r = _cli(project, "inspect", "--gen", "1", "--against", "teacher")  # as dvc.yaml's compare@1 runs it
    assert r.exit_code == 0, r.output
    vs = root / "inspect" / "gen-1-vs-teacher"
    for rel in _dvc_paths("compare", 1):  # the --against output is declared in dvc.yaml
        assert (root / rel).exists(), rel
    cm = json.loads((vs / "statistics.json").read_text())
    head = json.loads((vs / "metrics.json").read_text())
    assert head["agreement"] == cm["test"]["agreement"] and head["kl"] == cm["test"]["kl_mean"] and len(head) == 3
    r = _cli(project, "inspect", "--gen", "1", "--against", "0")  # its teacher named: the same comparison
    assert r.exit_code == 0, r.output
    assert json.loads((root / "inspect" / "gen-1-vs-0" / "statistics.json").read_text()) == cm
    assert cm["train"]["kl_mean"] > 0 and 0 < cm["test"]["agreement"] <= 1
    assert imread(vs / "figures" / "per_class.png").ndim == 3
    chain = (vs / "chain.csv").read_text().splitlines()
    assert chain[0].startswith("generation,against") and [row.split(",")[:2] for row in chain[1:]] == [
        ["1", "0"],
        ["2", "1"],
    ]
    assert float(chain[1].split(",")[3]) == pytest.approx(cm["train"]["agreement"], rel=1e-5)
    assert imread(vs / "figures" / "chain.png").ndim == 3

    for fmt in ("h5", "npz"):
        r = _cli(project, "convert", "--gen", "1", "--format", fmt, "--out", str(root / f"gen1.{fmt}"))
        assert r.exit_code == 0, r.output
        assert (root / f"gen1.{fmt}").exists()
    with np.load(root / "gen1.npz") as f:
        np.testing.assert_array_equal(f["test"], LogitStore.open(project.store(1)).array("test")[:])

    r = _cli(project, "inspect", "--gen", "3")
    assert r.exit_code == 2 and "bancache export-logits" in r.output
