"""benchmarks/kd_experiments.py (issue 24's distillation experiments) at its smallest size (--quick: 600
MNIST-1D samples, 2 seeds, 2-3 epochs): every arm is recorded per seed, the controls are what they claim
(the paired control starts from the student's very weights and sees its batches; the compute-matched one
trains the chain's epochs) and the tables' differences are the per-seed numbers' paired statistics.
Accuracies are not asserted: targets are reported, not tested."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import pipeline.train.loop
from pipeline.core.stats import detectable_effect, t_quantile
from tests.conftest import benchmark_module

COMPRESSION_ARMS = {"teacher", "kd T=2", "kd T=4", "dkd T=2", "dkd T=4", "paired control", "compute-matched control"}
ENSEMBLE_ARMS = {
    "member 0", "member 1", "member 2", "ensemble", "ensemble student", "BAN from one",
    "paired control", "compute-matched control",
}  # fmt: skip


class _Spy:
    """Per training run: the torch seed it was built with, its weights before the first step and its
    batches (labels and a hash of the inputs). A run starts at make_criterion, called once per training."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.real = pipeline.train.loop.train_one_epoch
        self.real_make = pipeline.train.loop.make_criterion
        self.new_run: dict[str, Any] | None = None

    def make_criterion(self, gp, *args, **kwargs):
        self.new_run = {"seed": torch.initial_seed(), "loss": gp.loss, "arch": gp.arch, "batches": []}
        return self.real_make(gp, *args, **kwargs)

    def __call__(self, model, batches, *args, **kwargs):
        if self.new_run is not None:
            self.new_run["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.runs.append(self.new_run)
            self.new_run = None
        run = self.runs[-1]

        def recording():
            for x, y, teacher in batches:
                run["batches"].append((y.tolist(), hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()))
                yield x, y, teacher

        return self.real(model, recording(), *args, **kwargs)


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with benchmark_module("kd_experiments", monkeypatch) as module:
        yield module


def _run(
    bench: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, experiment: str, *more: str
) -> tuple[dict, str, _Spy]:
    spy = _Spy()
    monkeypatch.setattr(pipeline.train.loop, "train_one_epoch", spy)
    monkeypatch.setattr(pipeline.train.loop, "make_criterion", spy.make_criterion)
    args = ["--experiment", experiment, "--quick", "--select", "--out", str(tmp_path), "--workdir", str(tmp_path)]
    args += list(more)
    assert bench.main(args) == 0
    stem = tmp_path / f"kd_{experiment}_mnist1d-quick"
    return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text(), spy


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_tables(record: dict[str, Any], md: str, pairs: list[tuple[str, str]]) -> None:
    """Every comparison row of the .md is the paired mean, t-interval and detectable effect of the per-seed
    test accuracies in the JSON, recomputed here."""
    runs = record["runs"]
    assert [c["a"] for c in record["comparisons"]] == [a for a, _ in pairs]
    for a, b in pairs:
        d = [100 * (r["arms"][a]["test_acc"] - r["arms"][b]["test_acc"]) for r in runs]
        n, mean = len(d), sum(d) / len(d)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        half = t_quantile(0.95, n - 1) * sd / math.sqrt(n)
        row = re.search(rf"^\| {re.escape(a)} − {re.escape(b)} \| (.+?) \[(.+?), (.+?)\] \| (.+?) \|$", md, re.M)
        assert row is not None, f"{a} − {b} not in the table"
        shown = [float(v) for v in row.groups()]
        assert shown[:3] == pytest.approx([mean, mean - half, mean + half], abs=0.006)
        assert shown[3] == pytest.approx(detectable_effect(sd, n), abs=0.006)
    for arm in runs[0]["arms"]:  # each arm's row: the mean of its per-seed test accuracies
        accs = [100 * r["arms"][arm]["test_acc"] for r in runs]
        assert re.search(rf"^\| {re.escape(arm)} \|.*\| {sum(accs) / len(accs):.2f} ± ", md, re.M), arm


def _check_selection(selection: dict[str, Any], bench: Any) -> None:
    """The choices are the recorded validation scores' own: the converged epochs and the best knob."""
    teacher = selection["teacher_epochs"]
    scores = {int(e): v for e, v in teacher["val_acc"].items()}
    rows = selection["val_rows"] * len(teacher["seeds"])
    assert teacher["chosen"] == bench.converged_epochs(scores, rows)
    assert teacher["seeds"] == [0, 6, 7] == selection["convergence_seeds"]
    for e, per_seed in teacher["val_acc_per_seed"].items():  # the mean over the convergence seeds
        assert len(per_seed) == 3 and scores[int(e)] == pytest.approx(sum(per_seed) / 3, abs=1e-12)
    assert selection["pilot_seed"] == 0 and selection["val_rows"] > 0
    for knob in selection["knobs"].values():
        best = max(k["val_acc"] for k in knob["val_acc"])
        chosen = next(k for k in knob["val_acc"] if k["val_acc"] == best)
        assert all(chosen[key] == value for key, value in knob["chosen"].items() if key != "loss")


def test_compression_records_every_arm_and_pairs_its_controls(bench, monkeypatch, tmp_path: Path) -> None:
    record, md, spy = _run(bench, monkeypatch, tmp_path, "compression")
    assert record["seeds"] == [1, 2] and [r["seed"] for r in record["runs"]] == [1, 2]
    assert record["rows"]["val"] == record["selection"]["val_rows"] and record["machine"]["git_commit"]
    _check_selection(record["selection"], bench)
    for run in record["runs"]:
        arms = run["arms"]
        assert set(arms) == COMPRESSION_ARMS
        assert all({"test_acc", "val_acc", "epochs", "seconds"} <= set(a) for a in arms.values())
        e_t, e_s = arms["teacher"]["epochs"], arms["kd T=2"]["epochs"]
        assert arms["compute-matched control"]["epochs"] == e_t + e_s == run["chain_epochs"]
        assert arms["paired control"]["epochs"] == e_s and arms["teacher"]["arch"] == "cnn1d"
        seed = 100 * run["seed"] + 1
        assert {arms[a]["seed"] for a in COMPRESSION_ARMS - {"teacher"}} == {seed}
        mine = [r for r in spy.runs if r["seed"] == seed]  # four students, the two controls
        assert [r["loss"] for r in mine] == ["kd", "kd", "dkd", "dkd", "ce", "ce"]
        assert all(_same(mine[0]["weights"], r["weights"]) for r in mine)
        assert mine[0]["batches"] == mine[4]["batches"]  # the paired control: the student's batch order
    seeds = {r["seed"] for r in spy.runs}
    assert 101 in seeds and 201 in seeds and len(seeds) > 2  # the spy tells runs apart
    students = ["kd T=2", "kd T=4", "dkd T=2", "dkd T=4"]
    pairs = [(a, b) for a in students for b in ("paired control", "compute-matched control")]
    _check_tables(record, md, pairs)


def test_ensemble_records_every_arm_and_pairs_its_controls(bench, monkeypatch, tmp_path: Path) -> None:
    record, md, spy = _run(bench, monkeypatch, tmp_path, "ensemble")
    _check_selection(record["selection"], bench)
    for run in record["runs"]:
        arms = run["arms"]
        assert set(arms) == ENSEMBLE_ARMS
        chain = sum(arms[a]["epochs"] for a in ("member 0", "member 1", "member 2", "ensemble student"))
        assert arms["compute-matched control"]["epochs"] == chain == run["chain_epochs"]
        assert [arms[f"member {g}"]["seed"] for g in range(3)] == [100 * run["seed"] + g for g in range(3)]
        assert arms["ensemble student"]["teacher"] == [0, 1, 2] and arms["BAN from one"]["teacher"] == 0
        mine = [r for r in spy.runs if r["seed"] == 100 * run["seed"] + 3]  # student, BAN, the two controls
        assert [r["loss"] for r in mine] == ["kd", "kd", "ce", "ce"]
        assert all(_same(mine[0]["weights"], r["weights"]) for r in mine)
        assert mine[0]["batches"] == mine[1]["batches"] == mine[2]["batches"]
        members = [r for r in spy.runs if r["seed"] in {100 * run["seed"] + g for g in range(3)}]
        assert len(members) == 3 and not _same(members[0]["weights"], members[1]["weights"])
    _check_tables(record, md, bench.ENSEMBLE_COMPARISONS)


def test_report_without_a_selection_says_to_select_first(bench, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no selection recorded; run with --select first"):
        bench.main(["--experiment", "ensemble", "--quick", "--out", str(tmp_path), "--workdir", str(tmp_path)])


def test_converged_epochs_is_where_validation_stops_rising(bench) -> None:
    assert bench.converged_epochs({15: 0.8575, 30: 0.915, 60: 0.925, 120: 0.9125}) == 60
    assert bench.converged_epochs({30: 0.60, 60: 0.65, 120: 0.65}) == 60  # a tie: the shorter
    assert bench.converged_epochs({30: 0.60, 60: 0.66, 120: 0.64, 240: 0.66}) == 60
    assert bench.converged_epochs({30: 0.60, 60: 0.66, 120: 0.64, 240: 0.67}) == 240  # still rising at the end
    # one standard error: 1,200 rows (400 validation rows x 3 seeds) at 93.5% give sqrt(.935 x .065 / 1200) =
    # 0.71 points, so 240 epochs (93.17) count as converged beside 480 (93.50), 60 (92.17) do not
    means = {30: 0.9067, 60: 0.9217, 120: 0.92, 240: 0.9317, 480: 0.935}
    assert bench.converged_epochs(means, 1200) == 240 and bench.converged_epochs(means) == 480
    assert bench.converged_epochs(means, 100) == 60  # 100 rows: 2.5 points of noise


TRANSFER_ARMS = {
    "teacher", "transfer-set student", "control, equal epochs", "control, equal steps", "control, the chain's steps"
}  # fmt: skip


def test_transfer_records_every_arm_and_matches_steps(bench, monkeypatch, tmp_path: Path) -> None:
    """Experiment (c) on a small transfer set (100 labelled train rows, 300 unlabelled): the teacher trains on
    labelled rows, the student on every row (the unlabelled ones in each epoch), the controls on labelled rows
    from the student's weights, for its epochs, its steps and the chain's steps."""
    more = ["--params", "configs/mnist1d-transfer.yaml", "--n-train", "100", "--n-unlabelled", "300"]
    record, md, spy = _run(bench, monkeypatch, tmp_path, "transfer", *more)
    _check_selection(record["selection"], bench)
    assert record["rows"]["unlabelled"] == 300 and record["rows"]["fit"] == 90
    for run in record["runs"]:
        arms = run["arms"]
        assert set(arms) == TRANSFER_ARMS
        e_t, e_s = arms["teacher"]["epochs"], arms["transfer-set student"]["epochs"]
        per_epoch = (-(-(90 + 300) // 128), -(-90 // 128))  # batches of the student's and a control's epoch
        steps = round(e_s * per_epoch[0] / per_epoch[1])
        assert arms["control, equal epochs"]["epochs"] == e_s
        assert arms["control, equal steps"]["epochs"] == steps
        assert arms["control, the chain's steps"]["epochs"] == e_t + steps == run["chain_epochs"]
        teacher = next(r for r in spy.runs if r["seed"] == 100 * run["seed"])
        mine = [r for r in spy.runs if r["seed"] == 100 * run["seed"] + 1]  # the student, then its 3 controls
        assert [r["loss"] for r in mine] == ["kd", "ce", "ce", "ce"]
        assert all(_same(mine[0]["weights"], r["weights"]) for r in mine)
        labels = [[y for ys, _ in r["batches"] for y in ys] for r in (teacher, *mine)]
        assert labels[1].count(-1) == 300 * e_s and len(labels[1]) == 390 * e_s
        assert all(-1 not in ys for ys in (labels[0], *labels[2:]))
    _check_tables(record, md, bench.TRANSFER_COMPARISONS)


def test_ensemble_reuses_the_compression_convergence(bench, monkeypatch, tmp_path: Path) -> None:
    """--reuse-convergence: the ensemble's members take the compression run's cnn1d convergence record (same
    params, data, grid and seeds) and train only pilot seed 0's chosen run, not the grid again."""
    first, _, _ = _run(bench, monkeypatch, tmp_path / "a", "compression")
    reuse = tmp_path / "a" / "kd_compression_mnist1d-quick.json"
    record, _, spy = _run(bench, monkeypatch, tmp_path / "b", "ensemble", "--reuse-convergence", str(reuse))
    teacher = record["selection"]["teacher_epochs"]
    assert teacher["reused_from"] == str(reuse)
    assert {k: teacher[k] for k in ("val_acc", "chosen", "seeds")} == {
        k: first["selection"]["teacher_epochs"][k] for k in ("val_acc", "chosen", "seeds")
    }
    assert not [r for r in spy.runs if r["seed"] in (600, 700)]  # no convergence run of pilot seeds 6 and 7
    with pytest.raises(SystemExit, match="no convergence of cnn1d on these params, grid and seeds"):
        bench.main(
            ["--experiment", "ensemble", "--quick", "--select", "--convergence-seeds", "0,6"]
            + ["--out", str(tmp_path / "c"), "--workdir", str(tmp_path / "c"), "--reuse-convergence", str(reuse)]
        )


def test_smaller_grids_and_resume_keep_the_seeds_made(bench, monkeypatch, tmp_path: Path) -> None:
    """The image experiments' smaller grids (--arms, --kd-alphas, --dkd-betas, --student-epoch-grid) are the
    ones tried and recorded; --resume keeps a seed the JSON already holds (not trained again) and runs the
    others, and refuses a JSON made with another selection."""
    small = ["--arms", "kd:4,dkd:4", "--kd-alphas", "0.5,0.9", "--dkd-betas", "8", "--student-epoch-grid", "2,4"]
    first, _, _ = _run(bench, monkeypatch, tmp_path, "compression", "--seeds", "1", *small)
    sel = first["selection"]
    assert set(sel["knobs"]) == {"kd T=4", "dkd T=4"} and sel["student_epochs"]["grid"] == [2, 4]
    assert [k["beta"] for k in sel["knobs"]["dkd T=4"]["val_acc"]] == [8.0] and first["seeds"] == [1]
    arms = {"teacher", "kd T=4", "dkd T=4", "paired control", "compute-matched control"}
    assert set(first["runs"][0]["arms"]) == arms
    spy = _Spy()
    monkeypatch.setattr(pipeline.train.loop, "train_one_epoch", spy)
    monkeypatch.setattr(pipeline.train.loop, "make_criterion", spy.make_criterion)
    out = ["--out", str(tmp_path), "--workdir", str(tmp_path)]
    assert bench.main(["--experiment", "compression", "--quick", "--resume", "--seeds", "1,2", *small, *out]) == 0
    record = json.loads((tmp_path / "kd_compression_mnist1d-quick.json").read_text())
    assert record["seeds"] == [1, 2] and record["runs"][0] == first["runs"][0]
    assert {r["seed"] for r in spy.runs} == {200, 201}  # seed 2's teacher and students only: seed 1 was kept
    pairs = [(a, b) for a in ("kd T=4", "dkd T=4") for b in ("paired control", "compute-matched control")]
    _check_tables(record, (tmp_path / "kd_compression_mnist1d-quick.md").read_text(), pairs)
    other = ["--experiment", "compression", "--quick", "--resume", "--select", *small[:2], "--kd-alphas", "0.1"]
    with pytest.raises(SystemExit, match="holds another selection's seeds"):
        bench.main([*other, "--dkd-betas", "8", "--student-epoch-grid", "2,4", *out])
    with pytest.raises(SystemExit, match="each arm is kd:T or dkd:T"):
        bench.main(["--experiment", "compression", "--quick", "--arms", "ce:1", *out])


def test_transfer_steps_budget_and_reuse_across_unlabelled_rows(bench, monkeypatch, tmp_path: Path) -> None:
    """--transfer-budget steps: the student trains about the teacher's steps (its epochs hold every row);
    a second transfer set of other unlabelled rows reuses the first's teacher convergence (the labelled rows,
    their split and the recipe are the same), while other labelled data are refused."""
    base = ["--params", "configs/mnist1d-transfer.yaml", "--n-train", "100", "--transfer-budget", "steps"]
    first, _, _ = _run(bench, monkeypatch, tmp_path / "a", "transfer", *base, "--n-unlabelled", "300")
    e_t = first["selection"]["teacher_epochs"]["chosen"]
    per_epoch = (-(-90 // 128), -(-(90 + 300) // 128))  # batches of a labelled epoch and of the student's
    e_s = max(1, round(e_t * per_epoch[0] / per_epoch[1]))
    assert first["selection"]["student_epochs"] == {"chosen": e_s, "budget": "steps"}
    for run in first["runs"]:
        assert run["arms"]["transfer-set student"]["epochs"] == e_s
        assert run["arms"]["control, equal steps"]["epochs"] == round(e_s * per_epoch[1] / per_epoch[0])
    reuse = str(tmp_path / "a" / "kd_transfer_mnist1d-quick.json")
    more = [*base, "--n-unlabelled", "200", "--reuse-convergence", reuse]
    record, _, spy = _run(bench, monkeypatch, tmp_path / "b", "transfer", *more)
    assert record["selection"]["teacher_epochs"]["val_acc"] == first["selection"]["teacher_epochs"]["val_acc"]
    assert record["rows"]["unlabelled"] == 200 and not [r for r in spy.runs if r["seed"] in (600, 700)]
    other = ["--experiment", "transfer", "--quick", "--select", *base[:2], "--n-train", "120", "--n-unlabelled", "200"]
    with pytest.raises(SystemExit, match="no convergence of cnn1d on these params"):
        bench.main(
            [*other, "--reuse-convergence", reuse, "--out", str(tmp_path / "c"), "--workdir", str(tmp_path / "c")]
        )


def test_ensemble_members_store_the_same_views(bench, monkeypatch, tmp_path: Path) -> None:
    """A student replays one image per stored view, so an ensemble's members export their views with one
    seed (member 0's, 100 s), which still differs between seeds; the compression teacher keeps its own."""
    exported: list[tuple[str, int, int]] = []
    real = bench.export_generation

    def spy(paths, gen, export, *args, **kwargs):
        exported.append((paths.root.name, gen, export.seed))
        return real(paths, gen, export, *args, **kwargs)

    monkeypatch.setattr(bench, "export_generation", spy)
    _run(bench, monkeypatch, tmp_path, "ensemble")
    by_root: dict[str, dict[int, int]] = {}
    for root, gen, seed in exported:
        by_root.setdefault(root, {})[gen] = seed
    assert by_root == {
        "select-ensemble": {0: 0, 1: 0, 2: 0},
        "ensemble-seed-1": {0: 100, 1: 100, 2: 100},
        "ensemble-seed-2": {0: 200, 1: 200, 2: 200},
    }
