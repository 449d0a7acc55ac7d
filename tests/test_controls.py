"""Controls and the paired table: control-k shares BAN-k's seed, initial weights and batch order; the
paired differences and their t-intervals match hand-computed values."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import pipeline.train.loop
from pipeline.core.paths import ProjectPaths
from pipeline.core.stats import paired, t_quantile
from pipeline.data.prepared import load_prepared
from pipeline.params import GenParams, TrainParams, parse_generation, parse_section
from pipeline.results.columns import Column, Control, ControlEnsemble, Ensemble, Generation
from pipeline.results.paired import control_columns, format_paired_table, paired_rows
from pipeline.train.controls import control_params, train_control
from stages import export, train
from stages.cli import main
from stages.common import ParamsFile
from tests.conftest import tiny_params


class _Spy:
    """Records, per training run, the weights before the first step and every batch (its labels and a hash
    of its inputs, which identify the rows in order). A run starts at `make_criterion`, which
    `train_generation` calls once, right before its first epoch."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.real = pipeline.train.loop.train_one_epoch
        self.real_make = pipeline.train.loop.make_criterion
        self.new_run = False

    def make_criterion(self, *args, **kwargs):
        self.new_run = True
        return self.real_make(*args, **kwargs)

    def __call__(self, model, batches, *args, **kwargs):
        if self.new_run:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.runs.append({"weights": weights, "batches": [], "epochs": 0})
            self.new_run = False
        run = self.runs[-1]
        run["epochs"] += 1
        epoch = run["epochs"]

        def recording():
            for x, y, teacher in batches:
                run["batches"].append((epoch, y.tolist(), hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()))
                yield x, y, teacher

        return self.real(model, recording(), *args, **kwargs)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["ban", "dkpp"])
def test_control_starts_from_ban_k_weights_and_sees_its_batch_order(
    project: ProjectPaths, monkeypatch, loss: str
) -> None:
    raw = tiny_params(students={"1": {"teacher": 0, "loss": loss}})
    params = ParamsFile(raw)
    train.run(params, project, 0)
    export.run(params, project, 0)
    spy = _Spy()
    monkeypatch.setattr(pipeline.train.loop, "train_one_epoch", spy)
    monkeypatch.setattr(pipeline.train.loop, "make_criterion", spy.make_criterion)
    data = load_prepared(project.dataset)
    recipe = parse_section(TrainParams, "train", raw["train"])
    gp = parse_generation(1, raw["students"]["1"])
    pipeline.train.loop.train_generation(data, recipe, 1, gp, project.store(0))
    train_control(data, recipe, 1, gp)
    train_control(data, recipe, 2, gp)  # another generation's control: a different seed
    ban, control, other = spy.runs
    assert _same_weights(ban["weights"], control["weights"])
    assert ban["batches"] == control["batches"]
    assert {e for e, _, _ in ban["batches"]} == {1, 2}  # every epoch was compared
    # The spy can tell runs apart: generation 2's seed gives other weights and another order.
    assert not _same_weights(ban["weights"], other["weights"])
    assert ban["batches"] != other["batches"]


def test_control_params_keep_seed_and_arch_and_drop_the_teacher() -> None:
    recipe = TrainParams(seed=300)
    c = control_params(recipe, 2, GenParams(loss="dkpp", teacher=1, arch="mlp", temperature=4.0))
    assert (c.loss, c.teacher, c.seed, c.arch, c.temperature) == ("ce", None, 302, "mlp", 1.0)
    assert control_params(recipe, 2, GenParams(loss="ban", teacher=1, seed=7)).seed == 7


def test_t_quantile_matches_printed_tables() -> None:
    # Two-sided 95% (upper 0.975) quantiles from standard t tables.
    for df, t in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (8, 2.3060), (30, 2.0423)]:
        assert t_quantile(0.95, df) == pytest.approx(t, abs=5e-4)
    # Closed forms: Cauchy (df 1) t = tan(pi * level / 2); df 2: t = sqrt(2) * level / sqrt(1 - level^2).
    assert t_quantile(0.5, 1) == pytest.approx(1.0)
    assert t_quantile(0.9, 2) == pytest.approx(math.sqrt(2.0) * 0.9 / math.sqrt(1 - 0.81))
    with pytest.raises(ValueError, match="degree of freedom"):
        t_quantile(0.95, 0)


def test_paired_mean_and_interval_by_hand() -> None:
    # d = 1, 2, 3, 6: mean 3, sd sqrt(((-2)^2 + 1 + 0 + 9) / 3) = sqrt(14 / 3); half = 3.1824 * sd / 2.
    p = paired([91.0, 92.0, 93.0, 96.0], [90.0, 90.0, 90.0, 90.0])
    sd = math.sqrt(14.0 / 3.0)
    assert (p.n, p.mean, p.sd) == (4, pytest.approx(3.0), pytest.approx(sd))
    assert p.half_width == pytest.approx(3.182446 * sd / 2.0, rel=1e-6)
    assert (p.low, p.high) == (pytest.approx(3.0 - p.half_width), pytest.approx(3.0 + p.half_width))
    one = paired([1.0], [0.5])
    assert one.mean == 0.5 and math.isnan(one.half_width)
    with pytest.raises(ValueError, match="equally long"):
        paired([1.0, 2.0], [1.0])


def _runs() -> list[dict[Column, float]]:
    # BAN-1 - Control-1 = +1, +2, +3 points; Ens*2 - Control Ens*2 = 0, 0, +3.
    cols = [Generation(0), Generation(1), Generation(2), Ensemble(2), Control(1), ControlEnsemble(2)]
    return [
        dict(zip(cols, [0.90, 0.91, 0.92, 0.93, 0.90, 0.93], strict=True)),
        dict(zip(cols, [0.80, 0.82, 0.80, 0.85, 0.80, 0.85], strict=True)),
        dict(zip(cols, [0.70, 0.73, 0.70, 0.75, 0.70, 0.72], strict=True)),
    ]


def test_paired_rows_and_table_by_hand() -> None:
    rows = paired_rows(_runs())
    assert [r.k for r in rows] == [1, 2]
    d1 = rows[0].ban_minus_control
    assert d1 is not None and d1.mean == pytest.approx(2.0) and d1.sd == pytest.approx(1.0)
    assert d1.half_width == pytest.approx(4.302653 / math.sqrt(3.0), rel=1e-6)
    assert rows[1].ban_minus_control is None  # no Control-2 in these runs
    e2 = rows[1].ens_minus_control_ens
    assert e2 is not None and e2.mean == pytest.approx(1.0) and e2.sd == pytest.approx(math.sqrt(3.0))
    table = format_paired_table(_runs(), "cnn1d", 1000)
    assert "3 seeds" in table and "1000 test rows" in table
    h = 4.302653 / math.sqrt(3.0)
    assert f"| 1 | 82.00 ± 9.00 | 80.00 ± 10.00 | +2.00 [{2 - h:+.2f}, {2 + h:+.2f}] |" in table
    assert "| Teacher | 80.00 ± 10.00 |" in table


def test_control_columns_ensemble_by_hand() -> None:
    y = np.array([0, 1, 1])
    a = np.log(np.array([[0.6, 0.4], [0.6, 0.4], [0.2, 0.8]], np.float32))
    b = np.log(np.array([[0.3, 0.7], [0.1, 0.9], [0.1, 0.9]], np.float32))
    cols = control_columns({1: a, 2: b}, y)
    # mean probs: [0.45, 0.55], [0.35, 0.65], [0.15, 0.85] -> 1, 1, 1: 2 of 3 right
    assert cols == {Control(1): pytest.approx(2 / 3), Control(2): pytest.approx(2 / 3), ControlEnsemble(2): 2 / 3}


def test_sweep_with_controls_writes_the_paired_table(tmp_path: Path) -> None:
    raw = tiny_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweep"
    args = ["--params", str(tmp_path / "params.yaml"), "sweep", "--seeds", "0,1", "--losses", "", "--controls"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sweep.json").read_text())
    assert record["controls"] is True and record["num_test"] == 100
    runs = record["runs"]
    assert all({"Control-1", "Control-2", "Control Ens*2"} <= set(r) for r in runs)
    d = paired([100 * r["BAN-2"] for r in runs], [100 * r["Control-2"] for r in runs])
    expected = f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
    assert expected in result.output and expected in (out / "table.md").read_text()
    assert "2 seeds, 100 test rows" in result.output


def test_control_stage_reads_declared_params_and_report_pairs_it(project: ProjectPaths) -> None:
    from stages import control, ensemble, report
    from tests.test_params import _declared_params

    raw = tiny_params(students={"1": {"teacher": 0, "loss": "ban"}})
    off = ParamsFile(raw)
    assert control.run(off, project, 1)["skipped"] is True
    assert not (project.control_dir(1) / "model.pt").exists()
    for gen in (0, 1):
        train.run(ParamsFile(raw), project, gen)
        export.run(ParamsFile(raw), project, gen)
    ensemble.run(ParamsFile(raw), project)
    on = ParamsFile({**raw, "train_controls": True})
    m = control.run(on, project, 1)
    assert on.used <= _declared_params()["control@1"] and "train_controls" in on.used
    logits = np.load(project.control_dir(1) / "test_logits.npy")
    y = load_prepared(project.dataset).y_test
    assert m["test_acc"] == pytest.approx(float((logits.argmax(-1) == y).mean())) and m["seed"] == 1
    text = report.run(project)
    ban1 = json.loads((project.ensemble_metrics / "gen1.json").read_text())["test_acc"]
    assert f"| 1 | {100 * ban1:.2f} | {100 * m['test_acc']:.2f} | {100 * (ban1 - m['test_acc']):+.2f} (1 seed" in text
    assert "1 seed, 100 test rows" in text
    # The tiny teacher (2 epochs) is far from fitting its rows: the report flags its ban student.
    assert "## Teacher fitness flags" in text and "own fit rows" in text


def test_train_controls_key_must_be_a_bool(tmp_path: Path) -> None:
    from pipeline.core.errors import ParamsError

    with pytest.raises(ParamsError, match="train_controls = 'yes': expected true or false"):
        ParamsFile({**tiny_params(), "train_controls": "yes"}).validate()


def test_old_controls_key_says_it_was_renamed(tmp_path: Path) -> None:
    """`controls:` was both a params key and the controls/ folder (`dvc exp show --keep` crashed on it)."""
    raw = {k: v for k, v in tiny_params().items() if k != "train_controls"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**raw, "controls": False}))
    r = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "validate"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        f"bancache: error: {tmp_path / 'params.yaml'}: section 'controls' was renamed to 'train_controls' ('controls' "
        "is also the controls/ output folder, and DVC cannot tell the param from the dependency); rename it"
    ]


def test_detectable_effect_has_the_power_it_claims() -> None:
    """The effect detectable_effect returns is found by the paired t-test `power` of the time: checked by
    simulation (normal per-seed differences), and it shrinks like 1 / sqrt(n) for large n."""
    import numpy as np

    from pipeline.core.stats import detectable_effect

    sd, n = 0.8, 5
    delta = detectable_effect(sd, n)
    rng = np.random.default_rng(0)
    d = rng.normal(delta, sd, size=(40_000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > t_quantile(0.95, n - 1)) == pytest.approx(0.8, abs=0.01)
    # five seeds need about 1.7 sd (the normal approximation, 2.8 sd / sqrt(5) = 1.25 sd, is too hopeful)
    assert 1.5 * sd < delta < 1.9 * sd
    big = detectable_effect(1.0, 400)
    assert big == pytest.approx((1.959964 + 0.841621) / math.sqrt(400), rel=0.01)
    assert math.isnan(detectable_effect(1.0, 1))
