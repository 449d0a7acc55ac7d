"""`bancache sweep` on a tiny MNIST-1D config (200 samples, 1 epoch, one student): one project root per
seed with the chain trained at train.seed = 100 * seed, the loss-variant columns, and a table of the runs' means."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline.cache.store import LogitStore
from pipeline.core.paths import ProjectPaths
from stages import sweep
from stages.common import ParamsFile
from tests.conftest import tiny_params


def test_sweep_runs_each_seed_in_its_own_root_and_tabulates_them(tmp_path: Path) -> None:
    base = tiny_params()
    raw = tiny_params(
        data={**base["data"], "num_samples": 200},
        train={**base["train"], "epochs": 1},
        students={"1": base["students"]["1"]},
    )
    out = tmp_path / "sweep"
    table = sweep.run(ParamsFile(raw), out, seeds=[0, 1], losses=["ban+l"])

    result = json.loads((out / "sweep.json").read_text())
    assert result["seeds"] == [0, 1]
    runs = result["runs"]
    for seed, run in zip([0, 1], runs, strict=True):
        layout = ProjectPaths(out / f"seed-{seed}")
        assert [LogitStore.open(layout.store(g)).attrs["seed"] for g in (0, 1)] == [100 * seed + g for g in (0, 1)]
        chain = json.loads(layout.ensemble_metrics.read_text())["accuracy"]
        assert run["Teacher"] == chain["gen0"] and run["BAN-1"] == chain["gen1"]
        assert set(run) == {"Teacher", "BAN-1", "BAN+L"}
        assert 0.0 <= run["BAN+L"] <= 1.0

    assert (out / "table.md").read_text() == table + "\n"
    title, blank, head, sep, row = table.splitlines()  # no controls: the Table 2 shape alone
    assert title.endswith(f"({result['num_test']} test rows):") and blank == ""
    assert head == "| Network (test accuracy %, 2 seeds) | Teacher | BAN+L | BAN-1 |"
    teacher = [100 * r["Teacher"] for r in runs]
    assert row.split(" | ")[1] == f"{statistics.mean(teacher):.2f} ± {statistics.stdev(teacher):.2f}"
