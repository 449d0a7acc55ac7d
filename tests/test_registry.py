"""One registry per kind: a loss declared once (pipeline.losses.LOSSES) is known to params, training,
fitness, the CLI and the tables; optimizers and schedules have one builder per name params allows; an
unknown name is refused with the known ones."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline import losses
from pipeline.audit.fitness import Fitness, fitness_warnings
from pipeline.core.errors import ParamsError, ResultsError
from pipeline.core.paths import ProjectPaths
from pipeline.losses import LOSSES, LossSpec, ban_loss, loss_columns, loss_spec, register_loss
from pipeline.models.checkpoint import load_checkpoint
from pipeline.params import OPTIMIZERS, SCHEDULES, GenParams, TrainParams, parse_generation, parse_section
from pipeline.results.columns import parse_columns
from pipeline.results.tables import format_table
from pipeline.train.loop import make_criterion
from pipeline.train.optim import OPTIMIZER_BUILDERS, SCHEDULE_BUILDERS, make_optimizer, make_scheduler
from stages.cli import main
from tests.conftest import tiny_params

CALLS: list[float] = []  # the temperature of every call of the toy loss


def _toy(s, t, _y, temp, _alpha, _beta, _g):
    """A scaled BAN: the toy loss, recording that it was called."""
    CALLS.append(temp)
    return 2.0 * ban_loss(s, t, temp)


@pytest.fixture
def toy() -> Iterator[LossSpec]:
    """The toy loss, registered in the one place a loss is declared, and removed again afterwards."""
    CALLS.clear()
    spec = register_loss(
        LossSpec("toy", _toy, needs_teacher=True, label_free=True, column="TOY", params=("temperature",))
    )
    yield spec
    del LOSSES["toy"]


def test_a_registered_toy_loss_trains_a_student_through_the_cli(toy, exported_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "project"
    shutil.copytree(exported_root, root)
    raw = tiny_params()
    raw["students"]["1"] = {"teacher": 0, "loss": "toy", "temperature": 2.0}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["--root", str(root), "--params", str(root / "params.yaml"), "train", "--gen", "1"])
    assert r.exit_code == 0, r.output
    layout = ProjectPaths(root)
    assert CALLS and set(CALLS) == {2.0}  # every training step went through the toy, with the student's T
    assert load_checkpoint(layout.model(1))["meta"]["loss"] == "toy"
    # label_free: fitness warns that a 'toy' student copies a 2-epoch teacher's errors.
    warnings = json.loads(layout.train_metrics(1).read_text())["teacher"]["warnings"]
    assert warnings and all("'toy' student" in w for w in warnings)


@pytest.mark.parametrize(
    ("loss", "section", "fn"),
    [("dkd", {"temperature": 4.0, "alpha": 1.0, "beta": 3.0}, "dkd_loss"), ("mse", {"temperature": 2.0}, "mse_loss")],
)
def test_dkd_and_mse_students_train_through_the_cli(
    loss: str, section: dict, fn: str, exported_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered in pipeline.losses, both train a student from generation 0's dense store through the CLI;
    every step calls the loss's pure function with the section's params, and the checkpoint records them."""
    calls: list[tuple] = []
    pure = getattr(losses, fn)

    def spy(*args):
        calls.append(args[3:])  # what follows (student, teacher, labels) for dkd; () for mse
        return pure(*args)

    monkeypatch.setattr(losses, fn, spy)  # the registry's lambda looks the function up when it is called
    root = tmp_path / "project"
    shutil.copytree(exported_root, root)
    raw = tiny_params()
    raw["students"]["1"] = {"teacher": 0, "loss": loss, **section}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["--root", str(root), "--params", str(root / "params.yaml"), "train", "--gen", "1"])
    assert r.exit_code == 0, r.output
    layout = ProjectPaths(root)
    meta = load_checkpoint(layout.model(1))["meta"]
    assert meta["loss"] == loss and meta["temperature"] == section["temperature"]
    if loss == "dkd":
        assert calls and set(calls) == {(4.0, 1.0, 3.0)}  # T, alpha (TCKD), beta (NCKD) of the section
        assert meta["beta"] == 3.0
    else:
        assert calls and set(calls) == {()}  # no temperature reaches the logit MSE
        assert "beta" not in meta  # only a loss that reads beta records it (older checkpoints keep their keys)
    metrics = json.loads(layout.train_metrics(1).read_text())
    assert math.isfinite(metrics["train_loss"])
    # mse has no label term: fitness warns that the student copies a 2-epoch teacher; dkd's label CE corrects it
    warnings = metrics["teacher"]["warnings"]
    assert (bool(warnings) and all(f"'{loss}' student" in w for w in warnings)) if loss == "mse" else not warnings


def test_a_topk_store_serves_dkd_and_refuses_mse_before_any_step(
    exported_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dkd reads only p_T, so a sparse store's distribution serves it; mse matches logits, which a sparse store
    does not keep: refused in one line when the store is opened, before the fitness check or a training step."""
    from stages import export
    from stages.common import ParamsFile

    root = tmp_path / "project"
    shutil.copytree(exported_root, root)
    raw = tiny_params()
    raw["export"] = {**raw["export"], "layout": "topk", "topk": 3}
    export.run(ParamsFile(raw), ProjectPaths(root), 0)
    args = ["--root", str(root), "--params", str(root / "params.yaml"), "train", "--gen", "1"]
    raw["students"]["1"] = {"teacher": 0, "loss": "dkd", "temperature": 2.0}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert load_checkpoint(ProjectPaths(root).model(1))["meta"]["loss"] == "dkd"

    steps: list[int] = []
    monkeypatch.setattr(losses, "mse_loss", lambda *a: steps.append(1))
    monkeypatch.setattr("pipeline.chain.generation.check_teacher", lambda *a: steps.append(2))
    raw["students"]["1"] = {"teacher": 0, "loss": "mse"}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("bancache: error: students.1.loss = 'mse' matches the teacher's logits")
    assert "layout 'topk'" in r.output and r.output.rstrip().endswith("Export it with export.layout: dense")
    assert steps == []  # neither the fitness check nor a loss step ran


def test_a_registered_loss_is_known_everywhere_else(toy) -> None:
    assert parse_generation(1, {"teacher": 0, "loss": "toy"}).loss == "toy"
    with pytest.raises(ParamsError, match="ban, ban\\+l, kd, cwtm, dkpp, dkd, mse, toy"):
        parse_generation(1, {"teacher": 0, "loss": "ce"})  # 'ce ignores the teacher' lists it
    with pytest.raises(ParamsError, match="loss must be 'ce'"):
        parse_generation(0, {"loss": "toy"})  # it needs a teacher: not a generation 0 loss
    poor = Fitness(fit_accuracy=0.5, entropy_mean=1.0, temperature=1.0, rows=10)
    assert fitness_warnings(poor, "toy") and not fitness_warnings(poor, "kd")
    # The table orders it with the loss columns (before BAN-k), not with the unknown columns at the end.
    run = parse_columns({"Teacher": 0.5, "BAN-1": 0.5, "TOY": 0.5, "Ens*2": 0.5}, loss_columns())
    head = format_table([run], "net").splitlines()[0]
    assert head.index("TOY") < head.index("BAN-1")
    r = CliRunner().invoke(main, ["sweep", "--losses", "bogus"])
    assert r.exit_code == 2 and "choose from ban, ban+l, kd, cwtm, dkpp, dkd, mse, toy" in r.output


def test_an_unregistered_loss_column_is_refused() -> None:
    with pytest.raises(ResultsError, match="unknown result column 'TOY'"):
        parse_columns({"Teacher": 0.5, "TOY": 0.5}, loss_columns())


def test_a_duplicate_name_or_column_is_refused(toy) -> None:
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_loss(toy)
    with pytest.raises(ValueError, match="column 'BAN' is already"):
        register_loss(LossSpec("toy2", _toy, needs_teacher=True, label_free=True, column="BAN"))
    with pytest.raises(ValueError, match="names its table column"):
        register_loss(LossSpec("toy3", _toy, needs_teacher=True, label_free=True, column=None))
    assert "toy2" not in LOSSES and "toy3" not in LOSSES


def test_unknown_loss_is_refused_with_the_known_ones() -> None:
    known = ", ".join(LOSSES)
    with pytest.raises(ParamsError, match=re.escape(f"unknown loss 'bogus'; known: {known}") + "$"):
        loss_spec("bogus")
    with pytest.raises(ParamsError, match="students.K.loss = 'bogus': allowed values are ce, ban"):
        GenParams(loss="bogus")  # the dataclass checks itself when constructed
    unchecked = GenParams()
    object.__setattr__(unchecked, "loss", "bogus")  # past the constructor's check: the registry still refuses it
    with pytest.raises(ParamsError, match="unknown loss 'bogus'"):
        make_criterion(unchecked)
    with pytest.raises(ParamsError, match="students.1.loss = 'bogus': allowed values are ce, ban"):
        parse_generation(1, {"teacher": 0, "loss": "bogus"})


@pytest.mark.parametrize(("key", "value"), [("optimizer", "lion"), ("schedule", "poly")])
def test_unknown_optimizer_or_schedule_is_refused_with_the_known_ones(key: str, value: str) -> None:
    known = ", ".join(OPTIMIZERS if key == "optimizer" else SCHEDULES)
    with pytest.raises(ParamsError, match=f"train.{key} = '{value}': allowed values are {known}$"):
        parse_section(TrainParams, "train", {key: value})
    with pytest.raises(ParamsError, match=f"train.{key} = '{value}': allowed values are {known}$"):
        TrainParams(**{key: value})  # the dataclass checks itself when constructed
    p = TrainParams()
    object.__setattr__(p, key, value)  # past the constructor's check: the builder refuses it, no fall-through
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ParamsError, match=f"train.{key} = '{value}': allowed values are {known}$"):
        make_scheduler(make_optimizer(model, p), p) if key == "schedule" else make_optimizer(model, p)


def test_builders_cover_exactly_the_names_params_allows() -> None:
    assert tuple(OPTIMIZER_BUILDERS) == OPTIMIZERS
    assert tuple(SCHEDULE_BUILDERS) == SCHEDULES
    model = torch.nn.Linear(2, 2)
    for name in OPTIMIZERS:
        assert type(make_optimizer(model, TrainParams(optimizer=name))).__name__.lower() == name
    for name in SCHEDULES:
        p = TrainParams(schedule=name, epochs=4)
        make_scheduler(make_optimizer(model, p), p)  # every allowed name builds


def test_every_loss_reads_only_generation_keys() -> None:
    fields = set(GenParams.__dataclass_fields__)
    for spec in LOSSES.values():
        assert set(spec.params) <= fields, spec.name


S = torch.tensor([[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]])
T = torch.tensor([[0.5, 0.5, -2.0], [1.5, 0.0, 0.0]]).half()
Y = torch.tensor([0, 1])


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_criterion_is_the_pure_function_bit_for_bit(name: str) -> None:
    """make_criterion calls the registered function with the generation's T, alpha, beta and generator: the
    same value, bit for bit, as calling the pure loss directly (what training computed before the registry)."""
    gp = GenParams(loss=name, temperature=2.0, alpha=0.3, beta=5.0)
    got = make_criterion(gp, torch.Generator().manual_seed(3))(S, T, Y)
    direct = {
        "ce": lambda: losses.ce_loss(S, Y),
        "ban": lambda: losses.ban_loss(S, T, 2.0),
        "ban+l": lambda: losses.ban_l_loss(S, T, Y, 2.0),
        "kd": lambda: losses.kd_loss(S, T, Y, 2.0, 0.3),
        "cwtm": lambda: losses.cwtm_loss(S, T, Y, 2.0),
        "dkpp": lambda: losses.dkpp_loss(S, T, 2.0, torch.Generator().manual_seed(3)),
        "dkd": lambda: losses.dkd_loss(S, T, Y, 2.0, 0.3, 5.0),
        "mse": lambda: losses.mse_loss(S, T),
    }[name]()
    assert torch.equal(got, direct)
    if loss_spec(name).needs_teacher:
        with pytest.raises(ValueError, match=re.escape(f"loss '{name}' needs teacher logits")):
            make_criterion(gp)(S, None, Y)
