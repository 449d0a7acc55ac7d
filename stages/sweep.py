"""`bancache sweep`: the whole chain over several seeds (and gen-1 loss variants), one table.

Each seed runs in its own project root under --out, through the same stage functions dvc.yaml runs, with
train.seed set to 100 * seed (generation K then uses 100 * seed + K). The loss variants train a first
student from generation 0's cache with each loss, as the BAN / BAN+L / CWTM / DKPP columns of Table 2.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.data import load_prepared
from pipeline.evaluate import accuracy, predict_logits, resolve_device
from pipeline.io import write_json, write_text
from pipeline.layout import Layout
from pipeline.params import TrainParams, parse_generation, parse_section, student_keys
from pipeline.report import LOSS_COLUMNS, chain_columns, format_table
from pipeline.train import train_generation
from stages import ensemble, export, prepare, train
from stages.common import ParamsFile

log = logging.getLogger(__name__)


def run_seed(params: ParamsFile, root: Path, seed: int, dataset: Path, losses: list[str]) -> dict[str, float]:
    raw = copy.deepcopy(params.raw)
    raw.setdefault("train", {})["seed"] = 100 * seed
    p = ParamsFile(raw)
    layout = Layout(root)
    layout.dataset.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dataset, layout.dataset)
    for gen in [0, *student_keys(raw.get("students"))]:
        train.run(p, layout, gen)
        export.run(p, layout, gen)
    cols = chain_columns(ensemble.run(p, layout))
    recipe = parse_section(TrainParams, "train", raw["train"])
    data = load_prepared(layout.dataset)
    for loss in losses:
        gp = parse_generation(1, {"teacher": 0, "loss": loss})
        model = train_generation(data, recipe, 1, gp, layout.store(0)).model
        logits = predict_logits(model, data.x_test, recipe.eval_batch_size, resolve_device(recipe.device))
        cols[LOSS_COLUMNS[loss]] = accuracy(logits, data.y_test)
    log.info("seed %d: %s", seed, cols)
    return cols


def run(params: ParamsFile, out: Path, seeds: list[int], losses: list[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    dataset = Layout(out).dataset
    prepare.run(params, Layout(out))
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        runs.append(run_seed(params, out / f"seed-{seed}", seed, dataset, losses))
        write_json(out / "sweep.json", {"seeds": seeds[: len(runs)], "runs": runs})
    arch = parse_section(TrainParams, "train", params.raw.get("train")).arch
    table = format_table(runs, arch)
    write_text(out / "table.md", table + "\n")
    return table
