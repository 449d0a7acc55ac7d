"""`bancache sweep`: the whole chain over several seeds (and gen-1 loss variants), one table.

Each seed runs in its own project root under --out, through the same stage functions dvc.yaml runs, with
train.seed set to 100 * seed (generation K then uses 100 * seed + K). The loss variants train a first
student from generation 0's cache with each loss, as the BAN / BAN+L / CWTM / DKPP columns of Table 2.
With controls, every student generation K also gets control-K (labels only, generation K's seed, initial
weights and batch order) and the paired table (BAN-K minus control-K with a 95% t-interval over seeds).
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.devices import resolve_device
from pipeline.core.files import write_json, write_text
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import PreparedData, load_prepared
from pipeline.losses import loss_columns
from pipeline.models.predict import accuracy, predict_logits
from pipeline.params import TrainParams, parse_chain, parse_generation, parse_section, student_keys
from pipeline.results.columns import Column, LossVariant, is_control, labelled
from pipeline.results.paired import control_columns, format_paired_table
from pipeline.results.tables import chain_columns, format_table
from pipeline.train.controls import train_control
from pipeline.train.loop import train_generation
from stages import ensemble, export, prepare, train
from stages.common import ParamsFile
from stages.progress import Progress, note

log = logging.getLogger(__name__)


def control_run(raw: dict[str, Any], data: PreparedData) -> dict[Column, float]:
    """Control-K of every student generation K of this seed's params, and the controls' Ens*k."""
    recipe = parse_section(TrainParams, "train", raw["train"])
    chain = parse_chain(raw.get("gen0"), raw.get("students"))
    device = resolve_device(recipe.device)
    logits = {}
    for gen in sorted(g for g in chain.gens if g >= 1):
        with Progress(f"control {gen}", recipe.epochs, unit="epoch") as bar:
            model = train_control(data, recipe, gen, chain.gens[gen], train.epoch_hook(bar)).model
        logits[gen] = predict_logits(model, data.x_test, recipe.eval_batch_size, device)
    return control_columns(logits, data.y_test)


def run_seed(
    params: ParamsFile, root: Path, seed: int, dataset: Path, losses: list[str], controls: bool = False
) -> dict[Column, float]:
    raw = copy.deepcopy(params.raw)
    raw.setdefault("train", {})["seed"] = 100 * seed
    p = ParamsFile(raw)
    layout = ProjectPaths(root)
    layout.dataset.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dataset, layout.dataset)
    for gen in [0, *student_keys(raw.get("students"))]:
        note(f"sweep seed {seed}: generation {gen}")
        train.run(p, layout, gen)
        export.run(p, layout, gen)
    cols = chain_columns(ensemble.run(p, layout))
    recipe = parse_section(TrainParams, "train", raw["train"])
    data = load_prepared(layout.dataset)
    for loss in losses:
        note(f"sweep seed {seed}: generation 1 with loss {loss}")
        gp = parse_generation(1, {"teacher": 0, "loss": loss})
        with Progress(f"seed {seed} gen 1 ({loss})", recipe.epochs, unit="epoch") as bar:
            model = train_generation(data, recipe, 1, gp, layout.store(0), on_epoch=train.epoch_hook(bar)).model
        logits = predict_logits(model, data.x_test, recipe.eval_batch_size, resolve_device(recipe.device))
        cols[LossVariant(loss, loss_columns()[loss])] = accuracy(logits, data.y_test)
    if controls:
        cols.update(control_run(raw, data))
    log.info("seed %d: %s", seed, labelled(cols))
    return cols


def run(params: ParamsFile, out: Path, seeds: list[int], losses: list[str], controls: bool = False) -> str:
    """Run every seed, write sweep.json after each and table.md (Table 2 shape, plus the paired table)."""
    out.mkdir(parents=True, exist_ok=True)
    dataset = ProjectPaths(out).dataset
    prepare.run(params, ProjectPaths(out))
    num_test = len(load_prepared(dataset).y_test)
    runs: list[dict[Column, float]] = []
    with Progress("sweep", len(seeds), unit="seed") as bar:
        for seed in seeds:
            runs.append(run_seed(params, out / f"seed-{seed}", seed, dataset, losses, controls))
            saved = [labelled(r) for r in runs]  # a sweep's JSON keys each run by its columns' labels
            record = {"seeds": seeds[: len(runs)], "num_test": num_test, "controls": controls, "runs": saved}
            write_json(out / "sweep.json", record)
            bar.update()
    arch = parse_section(TrainParams, "train", params.raw.get("train")).arch
    table = format_tables(runs, arch, num_test, controls)
    write_text(out / "table.md", table + "\n")
    return table


def format_tables(runs: list[dict[Column, float]], arch: str, num_test: int, controls: bool) -> str:
    """The paper's Table 2 shape (chain and loss columns) and, with controls, the paired table."""
    chain_only = [{c: v for c, v in r.items() if not is_control(c)} for r in runs]
    parts = [f"Table 2 shape ({num_test} test rows):", "", format_table(chain_only, arch)]
    if controls:
        parts += ["", format_paired_table(runs, arch, num_test)]
    return "\n".join(parts)
