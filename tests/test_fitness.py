"""Teacher fitness on planted teachers (under-fitted, one-hot, healthy), and the warmup / one-cycle schedules."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.audit.fitness import MIN_ENTROPY, split_warning, store_fitness
from pipeline.cache.store import LogitStore
from pipeline.core.errors import CorruptStoreError, ParamsError
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import load_prepared
from pipeline.params import TrainParams, parse_section
from pipeline.train.loop import make_scheduler
from pipeline.train.schedules import lr_factor
from stages import train
from stages.common import ParamsFile
from tests.conftest import tiny_params


def _plant(layout: ProjectPaths, margin: float, wrong_fraction: float) -> None:
    """Generation 0's store with logits margin * onehot(label), the label replaced by label + 1 on the
    first `wrong_fraction` of the fit rows."""
    data = load_prepared(layout.dataset)
    y = data.y_train.copy()
    fit = data.fit_index()
    bad = fit[: int(round(wrong_fraction * len(fit)))]
    y[bad] = (y[bad] + 1) % data.num_classes
    attrs = {
        "generation": 0,
        "arch": "cnn1d",
        "seed": 0,
        "temperature": 1.0,
        "checkpoint_sha256": "0" * 64,
        "class_names": data.class_names,
        "dataset_fingerprint": data.fingerprint,
    }
    rows = {"train": len(y), "test": len(data.y_test)}
    s = LogitStore.create(layout.store(0), rows, data.num_classes, 1, "float32", 128, attrs)
    s.write("train", 0, margin * np.eye(data.num_classes, dtype=np.float32)[y])
    s.write("test", 0, margin * np.eye(data.num_classes, dtype=np.float32)[data.y_test])
    s.seal()


def _fitness(layout: ProjectPaths, t: float = 1.0):
    d = load_prepared(layout.dataset)
    return store_fitness(layout.store(0), d.fingerprint, d.y_train, d.fit_index(), d.num_classes, t)


def test_fitness_of_planted_teachers_by_hand(project: ProjectPaths) -> None:
    _plant(project, margin=3.0, wrong_fraction=0.2)
    f = _fitness(project)
    assert f.fit_accuracy == pytest.approx(0.8, abs=1.0 / f.rows)
    # softmax of 3 * onehot over 10 classes: p = e^3 / (e^3 + 9) on one class, 1 / (e^3 + 9) on nine.
    z = math.exp(3.0) + 9.0
    h = -(math.exp(3.0) / z) * math.log(math.exp(3.0) / z) - 9.0 / z * math.log(1.0 / z)
    assert f.entropy_mean == pytest.approx(h, rel=1e-5)
    # At T = 3 the same logits are softer: margin 1.
    z3 = math.e + 9.0
    h3 = -(math.e / z3) * math.log(math.e / z3) - 9.0 / z3 * math.log(1.0 / z3)
    assert _fitness(project, 3.0).entropy_mean == pytest.approx(h3, rel=1e-5)


@pytest.mark.parametrize(
    ("margin", "wrong", "expect"),
    [
        (3.0, 0.2, ["own fit rows"]),  # under-fitted: 80% on its fit rows
        (40.0, 0.0, ["no dark knowledge"]),  # one-hot outputs: entropy ~ 0
        (3.0, 0.0, []),  # fits, and soft: no warning
    ],
)
def test_train_warns_on_unfit_teachers_and_records_fitness(project, caplog, margin, wrong, expect) -> None:
    _plant(project, margin, wrong)
    raw = tiny_params(students={"1": {"teacher": 0, "loss": "ban"}, "2": {"teacher": 0, "loss": "ban+l"}})
    with caplog.at_level(logging.WARNING, logger="pipeline.audit.fitness"):
        m = train.run(ParamsFile(raw), project, 1)
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.audit.fitness"]
    assert len(warned) == len(expect) and all(e in w for e, w in zip(expect, warned, strict=True))
    recorded = json.loads(project.train_metrics(1).read_text())["teacher"]
    assert recorded == m["teacher"] and len(recorded["warnings"]) == len(warned)
    for short, full in zip(warned, recorded["warnings"], strict=True):  # the console's line, the record's advice
        finding, advice = split_warning(full)
        assert short.startswith(finding + ": ") and len(short) < 140 and advice not in short
        assert "Train the teacher longer" in advice or "Raise the student's temperature" in advice
    assert (recorded["entropy"] < MIN_ENTROPY) == (margin == 40.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.audit.fitness"):
        train.run(ParamsFile(raw), project, 2)  # ban+l learns labels too: never warned
    assert not [r for r in caplog.records if r.name == "pipeline.audit.fitness"]


def test_cli_prints_each_fitness_warning_as_one_warning_line(project) -> None:
    """Through the real command (its own logging set-up, which pytest's log capture would mask in-process):
    one `warning:` line per warning, no timestamp or logger name, the full advice left to the metrics."""
    import subprocess
    import sys

    import yaml

    _plant(project, 3.0, 0.2)  # under-fitted teacher: one warning
    raw = tiny_params(students={"1": {"teacher": 0, "loss": "ban"}})
    (project.root / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "stages.cli", "--root", str(project.root), "train", "--gen", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if "own fit rows" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: teacher generation 0 is 80."), r.stderr
    assert "Train the teacher longer" not in r.stderr and "pipeline.audit" not in r.stderr
    full = json.loads(project.train_metrics(1).read_text())["teacher"]["warnings"]
    assert len(full) == 1 and "Train the teacher longer" in full[0]


def test_console_formatter_gives_warnings_a_level_word_and_detail_lines_a_time() -> None:
    from stages.cli import ConsoleFormatter

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("pipeline.audit.fitness", level, __file__, 1, "teacher %s", ("unfit",), None)

    fmt = ConsoleFormatter()
    assert fmt.format(record(logging.WARNING)) == "warning: teacher unfit"
    assert fmt.format(record(logging.ERROR)) == "error: teacher unfit"
    info = fmt.format(record(logging.INFO))
    assert info.endswith(" pipeline.audit.fitness teacher unfit") and info[:4].isdigit()  # -v: time and source


def _lrs(p: TrainParams) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=p.lr)
    sched = make_scheduler(opt, p)
    out = []
    for _ in range(p.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_by_hand() -> None:
    p = TrainParams(lr=1.0, epochs=6, warmup_epochs=2, schedule="cosine")
    c = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert _lrs(p) == pytest.approx([0.5, 1.0, *c])
    step = TrainParams(lr=1.0, epochs=6, warmup_epochs=2, schedule="step")
    assert _lrs(step) == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.2, 0.04])  # x0.2 at 2 and 3 of the 4 left


def test_onecycle_by_hand() -> None:
    p = TrainParams(lr=1.0, epochs=10, schedule="onecycle")  # rise: 30% of 10 = 3 epochs from lr / 25
    rise = [0.04 + 0.96 * e / 3 for e in range(3)]
    fall = [0.5 * (1 + math.cos(math.pi * e / 7)) for e in range(7)]
    assert _lrs(p) == pytest.approx([*rise, *fall])
    assert [lr_factor(TrainParams(epochs=10, schedule="onecycle", warmup_epochs=5), e) for e in (0, 5)] == [0.04, 1.0]


def test_plain_cosine_is_unchanged() -> None:
    p = TrainParams(lr=1.0, epochs=5, schedule="cosine")
    assert _lrs(p) == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)])
    assert type(make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), p)).__name__ == (
        "CosineAnnealingLR"
    )


def test_warmup_must_leave_epochs() -> None:
    with pytest.raises(ParamsError, match="train.warmup_epochs = 5: must be below epochs"):
        parse_section(TrainParams, "train", {"epochs": 5, "warmup_epochs": 5})


def test_inspect_reports_fitness_of_a_one_hot_teacher(project: ProjectPaths) -> None:
    from click.testing import CliRunner

    from stages.cli import main

    _plant(project, margin=40.0, wrong_fraction=0.1)
    params = project.root / "params.yaml"
    params.write_text(json.dumps(tiny_params()))  # JSON is YAML
    r = CliRunner().invoke(main, ["--params", str(params), "--root", str(project.root), "inspect", "--gen", "0"])
    assert r.exit_code == 0, r.output
    m = json.loads((project.root / "inspect/gen-0/statistics.json").read_text())["fitness"]
    assert "rows" not in m  # statistics.json holds metrics only (the row count is in summary.md)
    assert m["fit_accuracy"] == pytest.approx(0.9, abs=0.01) and m["entropy_mean"] < 1e-6
    assert f"{100 * m['fit_accuracy']:.2f}% on its own fit rows" in r.output
    summary = (project.root / "inspect/gen-0/summary.md").read_text()
    assert "## Teacher fitness" in summary and "own fit rows" in summary and "no dark knowledge" in summary


def _alter_a_row(layout: ProjectPaths) -> None:
    """Change train row 0 of generation 0's store to finite, well-formed logits (its classes rolled by one):
    it decodes and passes every check but the content hash against the marker."""
    arr = zarr.open_array(str(layout.store(0) / "train"), mode="r+")
    arr[0] = np.roll(arr[0], 1, axis=-1)


def test_trust_stores_and_the_memory_budget_reach_the_fitness_check_through_one_open(
    project: ProjectPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.audit.fitness as fitness_mod

    _plant(project, margin=3.0, wrong_fraction=0.1)
    _alter_a_row(project)
    seen: list[int] = []  # max_memory_bytes of the reader the fitness check reads, then whether it streamed
    streamed: list[bool] = []
    real_fitness = fitness_mod.teacher_fitness

    def spy_fitness(targets, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(targets.max_memory_bytes)
        f = real_fitness(targets, *args, **kwargs)
        streamed.append(targets.streaming)
        return f

    opens: list[Path] = []
    real_open = LogitStore.open.__func__  # type: ignore[attr-defined]

    def spy_open(cls, path, **kwargs):  # type: ignore[no-untyped-def]
        opens.append(Path(path))
        return real_open(cls, path, **kwargs)

    monkeypatch.setattr(fitness_mod, "teacher_fitness", spy_fitness)
    monkeypatch.setattr(LogitStore, "open", classmethod(spy_open))
    raw = tiny_params(train={**tiny_params()["train"], "memory_budget_mib": 0, "epochs": 1})
    with pytest.raises(CorruptStoreError, match="content differs from its marker"):
        train.run(ParamsFile(raw), project, 1)  # verified (the default): the hash finds the altered row
    assert seen == [0] and streamed == []  # the budget (0: stream by chunk) reached the fitness check: it raised
    seen.clear()
    opens.clear()
    m = train.run(ParamsFile(raw), project, 1, verify=False)  # --trust-stores: nothing hashes the store
    assert seen == [0] and streamed == [True]
    assert opens.count(project.store(0)) == 1  # one open of the teacher's store: sha, fitness and training
    assert m["teacher"]["fit_acc"] == pytest.approx(0.9, abs=0.01)


def test_trust_stores_reaches_the_fitness_in_inspect(project: ProjectPaths) -> None:
    from click.testing import CliRunner

    from stages.cli import main

    _plant(project, margin=3.0, wrong_fraction=0.1)
    _alter_a_row(project)
    params = project.root / "params.yaml"
    params.write_text(json.dumps(tiny_params()))  # JSON is YAML
    args = ["--params", str(params), "--root", str(project.root)]
    r = CliRunner().invoke(main, [*args, "inspect", "--gen", "0"])
    assert r.exit_code == 2 and "content differs from its marker" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--trust-stores", "inspect", "--gen", "0"])
    assert r.exit_code == 0, r.output  # neither the statistics nor the fitness re-hashed the store
    m = json.loads((project.root / "inspect/gen-0/statistics.json").read_text())["fitness"]
    assert m["fit_accuracy"] == pytest.approx(0.9, abs=0.01)


def test_inspect_opens_the_audited_store_once(project: ProjectPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import audit

    _plant(project, margin=3.0, wrong_fraction=0.1)
    opens: list[Path] = []
    real_open = LogitStore.open.__func__  # type: ignore[attr-defined]

    def spy_open(cls, path, **kwargs):  # type: ignore[no-untyped-def]
        opens.append(Path(path))
        return real_open(cls, path, **kwargs)

    monkeypatch.setattr(LogitStore, "open", classmethod(spy_open))
    for verify in (True, False):
        opens.clear()
        m = audit.run(ParamsFile(tiny_params()), project, 0, verify=verify)
        assert opens.count(project.store(0)) == 1  # the statistics and the fitness read one open
        assert m["fitness"]["fit_accuracy"] == pytest.approx(0.9, abs=0.01)
