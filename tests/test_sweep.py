"""`bancache sweep` on a tiny MNIST-1D config (200 samples, 1 epoch, one student): one project root per
seed with the chain trained at train.seed = 100 * seed, the loss-variant columns, and a table of the runs' means."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

import pipeline.chain.sweep
from pipeline.cache.store import LogitStore
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import load_prepared
from pipeline.models.predict import accuracy, predict_logits
from pipeline.params import TrainParams, parse_generation, parse_section
from pipeline.results.ensemble import read_ensemble_metrics
from pipeline.train.loop import train_generation
from stages import sweep
from stages.common import ParamsFile
from tests.conftest import tiny_params

SEEDS = [0, 1]
LOSSES = ["ban+l", "cwtm"]  # two variants: each gets its own column


def _variant(root: Path, train: dict, seed: int, loss: str) -> torch.nn.Module:
    """A first student trained with `loss` from the seed root's generation-0 store, as the paper's Table 2
    columns are defined: teacher 0, train.seed = 100 * seed; recomputed here, outside the sweep."""
    recipe = parse_section(TrainParams, "train", {**train, "seed": 100 * seed})
    gp = parse_generation(1, {"teacher": 0, "loss": loss})
    layout = ProjectPaths(root)
    return train_generation(load_prepared(layout.dataset), recipe, 1, gp, layout.store(0)).model


def test_sweep_runs_each_seed_in_its_own_root_and_tabulates_them(tmp_path: Path, monkeypatch) -> None:
    base = tiny_params()
    raw = tiny_params(
        data={**base["data"], "num_samples": 200},
        train={**base["train"], "epochs": 1},
        students={"1": base["students"]["1"]},
    )
    trained = []  # the loss variants' models, in the sweep's order (seed, then loss)
    real_train = pipeline.chain.sweep.train_generation

    def train_spy(*args, **kw):
        result = real_train(*args, **kw)
        trained.append({k: v.clone() for k, v in result.model.state_dict().items()})
        return result

    monkeypatch.setattr(pipeline.chain.sweep, "train_generation", train_spy)
    out = tmp_path / "sweep"
    table = sweep.run(ParamsFile(raw), out, seeds=SEEDS, losses=LOSSES)

    result = json.loads((out / "sweep.json").read_text())
    assert result["seeds"] == SEEDS
    runs = result["runs"]
    assert len(trained) == len(SEEDS) * len(LOSSES)
    for i, (seed, run) in enumerate(zip(SEEDS, runs, strict=True)):
        layout = ProjectPaths(out / f"seed-{seed}")
        assert [LogitStore.open(layout.store(g)).attrs["seed"] for g in (0, 1)] == [100 * seed + g for g in (0, 1)]
        chain = read_ensemble_metrics(layout.ensemble_metrics)["accuracy"]
        assert run["Teacher"] == chain["gen0"] and run["BAN-1"] == chain["gen1"]
        assert set(run) == {"Teacher", "BAN-1", "BAN+L", "CWTM"}
        data = load_prepared(layout.dataset)
        batch = parse_section(TrainParams, "train", raw["train"]).eval_batch_size  # as the sweep predicts
        for j, (loss, column) in enumerate([("ban+l", "BAN+L"), ("cwtm", "CWTM")]):
            model = _variant(layout.root, raw["train"], seed, loss)
            # The sweep trained exactly this student (its loss, its seed, its teacher store) ...
            for k, v in model.state_dict().items():
                torch.testing.assert_close(trained[i * len(LOSSES) + j][k], v, rtol=0, atol=0)
            # ... and its column is that student's test accuracy.
            assert run[column] == accuracy(predict_logits(model, data.x_test, batch, torch.device("cpu")), data.y_test)

    assert (out / "table.md").read_text() == table + "\n"
    title, blank, head, sep, row = table.splitlines()  # no controls: the Table 2 shape alone
    assert title.endswith(f"({result['num_test']} test rows):") and blank == ""
    columns = ["Teacher", "BAN+L", "CWTM", "BAN-1"]
    assert head == "| Network (test accuracy %, 2 seeds) | " + " | ".join(columns) + " |"
    assert sep == "|---" * (len(columns) + 1) + "|"
    network, *cells = row.strip("| ").split(" | ")
    assert network == raw["train"]["arch"]
    for column, cell in zip(columns, cells, strict=True):  # each column's mean ± sample std over the seeds, in %
        values = [100 * r[column] for r in runs]
        assert cell == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}", column


def test_a_sweep_of_dkd_and_mse_gives_each_its_column(tmp_path: Path) -> None:
    """Registering dkd and mse is all the sweep needs: one seed, each variant trained from generation 0's store
    and tabulated in its own column, in Table 2's place for loss columns (after Teacher, before BAN-1)."""
    base = tiny_params()
    raw = tiny_params(
        data={**base["data"], "num_samples": 200},
        train={**base["train"], "epochs": 1},
        students={"1": base["students"]["1"]},
    )
    out = tmp_path / "sweep"
    table = sweep.run(ParamsFile(raw), out, seeds=[0], losses=["dkd", "mse"])
    run = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert set(run) == {"Teacher", "BAN-1", "DKD", "MSE"}
    layout = ProjectPaths(out / "seed-0")
    data = load_prepared(layout.dataset)
    batch = parse_section(TrainParams, "train", raw["train"]).eval_batch_size
    for loss, column in [("dkd", "DKD"), ("mse", "MSE")]:
        model = _variant(layout.root, raw["train"], 0, loss)  # the same student, trained again outside the sweep
        assert run[column] == accuracy(predict_logits(model, data.x_test, batch, torch.device("cpu")), data.y_test)
    head = table.splitlines()[2]
    assert head == "| Network (test accuracy %, 1 seed) | Teacher | DKD | MSE | BAN-1 |"
