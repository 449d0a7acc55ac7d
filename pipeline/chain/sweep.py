"""The sweep: the whole chain over several seeds (and gen-1 loss variants), one table.

Each seed runs in its own project root under `out`, through the same library steps the stages run, with
train.seed set to 100 * seed (generation K then uses 100 * seed + K). The loss variants train a first
student from generation 0's cache with each loss, as the BAN / BAN+L / CWTM / DKPP columns of Table 2.
With controls, every student generation K also gets control-K (labels only, generation K's seed, initial
weights and batch order) and the paired table (BAN-K minus control-K with a 95% t-interval over seeds).

`params` is the whole params mapping (validated by the caller); `bar` and `note` show progress (the CLI's
`stages.progress.Progress` and `note`), so the library prints nothing itself.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.chain.generation import (
    BarFactory,
    epoch_hook,
    evaluate_project,
    export_generation,
    prepare_generation,
    train_job,
)
from pipeline.core.devices import resolve_device
from pipeline.core.distributed import SINGLE_PROCESS
from pipeline.core.files import write_json, write_text
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import PreparedData, load_prepared
from pipeline.losses import loss_columns
from pipeline.models.predict import predict_accuracy, predict_logits
from pipeline.params import (
    ExportParams,
    TrainParams,
    parse_chain,
    parse_generation,
    parse_section,
    section_of,
    student_keys,
)
from pipeline.results.columns import Column, LossVariant, is_control, labelled
from pipeline.results.paired import control_columns, format_paired_table
from pipeline.results.tables import chain_columns, format_table
from pipeline.train.controls import train_control
from pipeline.train.loop import train_generation

log = logging.getLogger(__name__)

Note = Callable[[str], None]


def control_run(raw: dict[str, Any], data: PreparedData, bar: BarFactory) -> dict[Column, float]:
    """Control-K of every student generation K of this seed's params, and the controls' Ens*k."""
    recipe = parse_section(TrainParams, "train", raw["train"])
    chain = parse_chain(raw.get("gen0"), raw.get("students"))
    device = resolve_device(recipe.device)
    logits = {}
    for gen in sorted(g for g in chain.gens if g >= 1):
        with bar(f"control {gen}", recipe.epochs, unit="epoch") as b:
            model = train_control(data, recipe, gen, chain.gens[gen], epoch_hook(b)).model
        logits[gen] = predict_logits(model, data.x_test, recipe.eval_batch_size, device)
    return control_columns(logits, data.y_test)


def _train_chain(raw: dict[str, Any], paths: ProjectPaths, seed: int, bar: BarFactory, note: Note) -> None:
    """Train and export every generation of the chain into `paths`, as `bancache train` / `export-logits`."""
    recipe = parse_section(TrainParams, "train", raw.get("train"))
    for gen in [0, *student_keys(raw.get("students"))]:
        note(f"sweep seed {seed}: generation {gen}")
        node: Any = raw
        for part in section_of(gen).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        job = prepare_generation(paths, recipe, gen, parse_generation(gen, node))
        with bar(f"gen {gen}", recipe.epochs, unit="epoch") as b:
            train_job(job, SINGLE_PROCESS, on_epoch=epoch_hook(b))
        export_generation(paths, gen, parse_section(ExportParams, "export", raw.get("export")), SINGLE_PROCESS, bar)


def run_seed(
    params: dict[str, Any],
    root: Path,
    seed: int,
    dataset: Path,
    losses: list[str],
    bar: BarFactory,
    note: Note,
    controls: bool = False,
) -> dict[Column, float]:
    """One seed's chain in its own project root `root` (a copy of the prepared `dataset`), its loss
    variants and, with `controls`, its controls: that seed's columns."""
    raw = copy.deepcopy(params)
    raw.setdefault("train", {})["seed"] = 100 * seed
    paths = ProjectPaths(root)
    paths.dataset.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dataset, paths.dataset)
    _train_chain(raw, paths, seed, bar, note)
    cols = chain_columns(evaluate_project(paths, [0, *student_keys(raw.get("students"))]))
    recipe = parse_section(TrainParams, "train", raw["train"])
    data = load_prepared(paths.dataset)
    device = resolve_device(recipe.device)
    for loss in losses:
        note(f"sweep seed {seed}: generation 1 with loss {loss}")
        gp = parse_generation(1, {"teacher": 0, "loss": loss})
        with bar(f"seed {seed} gen 1 ({loss})", recipe.epochs, unit="epoch") as b:
            model = train_generation(data, recipe, 1, gp, paths.store(0), on_epoch=epoch_hook(b)).model
        column = LossVariant(loss, loss_columns()[loss])
        cols[column] = predict_accuracy(model, data.x_test, data.y_test, recipe.eval_batch_size, device)[1]
    if controls:
        cols.update(control_run(raw, data, bar))
    log.info("seed %d: %s", seed, labelled(cols))
    return cols


def _seed_line(k: int, n: int, seed: int, elapsed: float) -> str:
    """`sweep seed k/n: seed S ...`, printed as seed k starts (a count printed when a seed ends read as the
    next one's start), with the time so far and an ETA from the mean seed time once one has ended."""
    line = f"sweep seed {k}/{n}: seed {seed}"
    if k > 1:
        line += f", {elapsed:.0f} s so far, ETA {elapsed / (k - 1) * (n - k + 1):.0f} s"
    return line


def run_sweep(
    params: dict[str, Any],
    out: Path,
    seeds: list[int],
    losses: list[str],
    bar: BarFactory,
    note: Note,
    controls: bool = False,
) -> str:
    """Run every seed, write sweep.json after each and table.md (Table 2 shape, plus the paired table).
    The caller prepares the dataset into `out` first (`ProjectPaths(out).dataset`, as `bancache prepare`):
    each seed's root gets a copy of it."""
    out.mkdir(parents=True, exist_ok=True)
    dataset = ProjectPaths(out).dataset
    num_test = len(load_prepared(dataset).y_test)
    runs: list[dict[Column, float]] = []
    start = time.perf_counter()
    for k, seed in enumerate(seeds, 1):
        note(_seed_line(k, len(seeds), seed, time.perf_counter() - start))
        runs.append(run_seed(params, out / f"seed-{seed}", seed, dataset, losses, bar, note, controls))
        saved = [labelled(r) for r in runs]  # a sweep's JSON keys each run by its columns' labels
        record = {"seeds": seeds[: len(runs)], "num_test": num_test, "controls": controls, "runs": saved}
        write_json(out / "sweep.json", record)
    arch = parse_section(TrainParams, "train", params.get("train")).arch
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
