"""Stage `train` (generation K): params train and gen0 (K = 0) or students.K."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from pipeline.audit.fitness import check_teacher
from pipeline.core.devices import resolve_device
from pipeline.core.distributed import DistContext, barrier, context_from_env
from pipeline.core.errors import ParamsError
from pipeline.core.files import write_json, write_text
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import PreparedData, load_prepared
from pipeline.models.predict import predict_accuracy
from pipeline.params import TrainParams, parse_generation, parse_section, section_of
from pipeline.train.loop import (
    EpochLog,
    TrainResult,
    checkpoint_meta,
    open_teacher,
    save_generation,
    train_generation,
)
from stages.common import ParamsFile
from stages.launch import worker_context
from stages.progress import Progress


def epoch_hook(bar: Progress) -> Callable[[EpochLog], None]:
    """Report an epoch's loss and validation accuracy (a resumed run starts the bar at its epoch)."""

    def hook(e: EpochLog) -> None:
        bar.done = e.epoch - 1
        bar.update(loss=e.train_loss, val_acc=e.val_acc)

    return hook


def run(
    params: ParamsFile, layout: ProjectPaths, gen: int, resume: bool = False, verify: bool = True
) -> dict[str, Any]:
    """Train generation `gen`; with `resume`, continue a killed run of the same config from its last epoch;
    `verify` False skips re-hashing the dataset and the teacher's store (trusted files)."""
    recipe = parse_section(TrainParams, "train", params.get("train"))
    raw = params.get(section_of(gen))
    if gen != 0 and raw is None:
        raise ParamsError(
            f"--gen {gen}: params.yaml has no section students.'{gen}' (generation {gen}); "
            "add it or pick another generation"
        )
    gp = parse_generation(gen, raw)
    data = load_prepared(layout.dataset, verify=verify)
    teacher_store = layout.store(gp.teacher) if gp.teacher is not None else None
    # One open of the teacher's store per run, within the memory budget and verified unless trusted: its
    # checkpoint hash, the fitness check and the training all read this one reader.
    targets = open_teacher(data, recipe, teacher_store, verify) if teacher_store is not None else None
    teacher_sha = targets.attrs["checkpoint_sha256"] if targets is not None else None
    fitness = None
    if targets is not None and gp.teacher is not None and context_from_env(os.environ).is_main:
        fitness = check_teacher(data, targets, gp.loss, gp.temperature, gp.teacher)
    meta = checkpoint_meta(data, recipe, gen, gp, teacher_sha)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    state = layout.train_state(gen)
    if not resume:
        state.unlink(missing_ok=True)
    ctx = worker_context(params)
    with Progress(f"gen {gen}", recipe.epochs, unit="epoch", enabled=ctx.is_main) as bar:
        result = train_generation(
            data,
            recipe,
            gen,
            gp,
            teacher_store,
            state_path=state,
            state_key=key,
            ctx=ctx,
            verify=verify,
            on_epoch=epoch_hook(bar),
            targets=targets,
        )
    if not ctx.is_main:  # rank 0 alone writes the generation's outputs
        barrier(ctx)
        return {"generation": gen, "rank": ctx.rank}
    save_generation(layout.model(gen), result, meta)
    metrics = _write_outputs(layout, gen, data, recipe, result, fitness, ctx)
    state.unlink(missing_ok=True)  # the stage's outputs are complete: nothing left to resume
    barrier(ctx)
    return metrics


def _write_outputs(
    layout: ProjectPaths,
    gen: int,
    data: PreparedData,
    recipe: TrainParams,
    result: TrainResult,
    fitness: dict[str, Any] | None,
    ctx: DistContext,
) -> dict[str, Any]:
    """metrics/train/gen-K.json (metrics only: generation, teacher and loss live in the checkpoint's meta)
    and plots/train/gen-K.csv (one row per epoch)."""
    device = resolve_device(recipe.device, ctx)
    last = result.history[-1]
    metrics: dict[str, Any] = {
        "selected_epoch": result.selected_epoch,
        "final_train_loss": last.train_loss,
        "final_val_acc": last.val_acc,
        # Reported only; nothing is selected on it.
        "test_acc": predict_accuracy(result.model, data.x_test, data.y_test, recipe.eval_batch_size, device)[1],
    }
    if fitness is not None:  # its metrics and warnings (the report lists them); loss, rows and T are settings
        metrics["teacher_fitness"] = {k: fitness[k] for k in ("fit_accuracy", "entropy_mean", "warnings")}
    write_json(layout.train_metrics(gen), metrics)
    buf = io.StringIO()
    # Wall-clock seconds stay out of this git-tracked file, so a rerun of the same recipe reproduces it exactly
    # (they are in the progress lines and the resume state's history).
    fields = [f for f in asdict(result.history[0]) if f != "seconds"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(asdict(h) for h in result.history)
    write_text(layout.train_plot(gen), buf.getvalue())
    return metrics
