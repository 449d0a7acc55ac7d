"""One generation in a project root (`pipeline.core.paths.ProjectPaths`): trained, saved, and its metrics
and per-epoch plot written, as the `train` stage and the sweep both need it.

Progress is the caller's: these functions take an `on_epoch` hook (`epoch_hook` over any `Bar`, such as the
stages' `Progress`), and print nothing themselves.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from pipeline.audit.fitness import check_teacher
from pipeline.cache.reader import CachedTargets
from pipeline.core.devices import resolve_device
from pipeline.core.distributed import SINGLE_PROCESS, DistContext, barrier, partition_rows
from pipeline.core.files import write_json, write_text
from pipeline.core.machine import with_machine
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import PreparedData, load_prepared
from pipeline.models.predict import predict_accuracy
from pipeline.params import ExportParams, GenParams, TrainParams
from pipeline.results.ensemble import evaluate_chain, write_ensemble_metrics
from pipeline.teachers.export import export_logits
from pipeline.train.loop import (
    EpochLog,
    TrainResult,
    check_targets,
    checkpoint_meta,
    open_teacher,
    save_generation,
    train_generation,
)


class Bar(Protocol):
    """What the chain needs of a progress display: the steps done so far, and an update after each step."""

    done: int

    def update(self, n: int = 1, /, **values: float) -> None: ...


BarFactory = Callable[..., AbstractContextManager[Bar]]
"""Opens a display: (label, total, unit=..., lines=..., enabled=...), as `stages.progress.Progress`."""


def epoch_hook(bar: Bar) -> Callable[[EpochLog], None]:
    """Report an epoch's loss and validation accuracy (a resumed run starts the bar at its epoch)."""

    def hook(e: EpochLog) -> None:
        bar.done = e.epoch - 1
        bar.update(loss=e.train_loss, val_acc=e.val_acc)

    return hook


@dataclass
class GenerationJob:
    """A generation ready to train: its data, the teacher's reader (opened once per run), the fitness of
    that teacher (main process only) and the checkpoint meta whose hash keys the resume state."""

    paths: ProjectPaths
    recipe: TrainParams
    gen: int
    gp: GenParams
    data: PreparedData
    targets: CachedTargets | None
    fitness: dict[str, Any] | None
    meta: dict[str, Any]
    verify: bool


def prepare_generation(
    paths: ProjectPaths,
    recipe: TrainParams,
    gen: int,
    gp: GenParams,
    verify: bool = True,
    resume: bool = False,
    is_main: bool = True,
) -> GenerationJob:
    """Load the data and open the teacher's store once, within train.memory_budget_mib and verified unless
    `verify` is False (trusted files): its checkpoint hash, the fitness check and the training all read that
    one reader. Without `resume`, a saved resume state is discarded."""
    data = load_prepared(paths.dataset, verify=verify)
    teacher_store = paths.store(gp.teacher) if gp.teacher is not None else None
    targets = open_teacher(data, recipe, teacher_store, verify) if teacher_store is not None else None
    if targets is not None:  # a loss, view policy or temperature the store cannot serve: before any work
        check_targets(targets, gp, gen)
    teacher_sha = targets.attrs["checkpoint_sha256"] if targets is not None else None
    fitness = None
    if targets is not None and gp.teacher is not None and is_main:
        fitness = check_teacher(data, targets, gp.loss, gp.temperature, gp.teacher)
    meta = checkpoint_meta(data, recipe, gen, gp, teacher_sha)
    if not resume:
        paths.train_state(gen).unlink(missing_ok=True)
    return GenerationJob(paths, recipe, gen, gp, data, targets, fitness, meta, verify)


def train_job(
    job: GenerationJob, ctx: DistContext = SINGLE_PROCESS, on_epoch: Callable[[EpochLog], None] | None = None
) -> dict[str, Any]:
    """Train the generation (resuming a saved state of the same meta), then on rank 0 save the model and
    write its metrics and plot; returns the metrics (other ranks: their rank)."""
    key = hashlib.sha256(json.dumps(job.meta, sort_keys=True, default=str).encode()).hexdigest()
    paths, gen, state = job.paths, job.gen, job.paths.train_state(job.gen)
    result = train_generation(
        job.data,
        job.recipe,
        gen,
        job.gp,
        paths.store(job.gp.teacher) if job.gp.teacher is not None else None,
        state_path=state,
        state_key=key,
        ctx=ctx,
        verify=job.verify,
        on_epoch=on_epoch,
        targets=job.targets,
    )
    if not ctx.is_main:  # rank 0 alone writes the generation's outputs
        barrier(ctx)
        return {"generation": gen, "rank": ctx.rank}
    save_generation(paths.model(gen), result, job.meta)
    metrics = write_outputs(paths, gen, job.data, job.recipe, result, job.fitness, ctx)
    state.unlink(missing_ok=True)  # the stage's outputs are complete: nothing left to resume
    barrier(ctx)
    return metrics


def write_outputs(
    paths: ProjectPaths,
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
    # The names every metrics file shares (README, "DVC tables"): epoch, train_loss, val_acc, test_acc.
    metrics: dict[str, Any] = {
        "epoch": result.selected_epoch,
        "train_loss": last.train_loss,
        "val_acc": last.val_acc,
        # Reported only; nothing is selected on it.
        "test_acc": predict_accuracy(result.model, data.x_test, data.y_test, recipe.eval_batch_size, device)[1],
    }
    if fitness is not None:  # the teacher's, named as inspect names a store's own; loss, rows and T are settings
        metrics["teacher"] = {
            "fit_acc": fitness["fit_accuracy"],
            "entropy": fitness["entropy_mean"],
            "warnings": fitness["warnings"],
        }
    write_json(paths.train_metrics(gen), with_machine(metrics))
    buf = io.StringIO()
    # Wall-clock seconds stay out of this git-tracked file, so a rerun of the same recipe reproduces it exactly
    # (they are in the progress lines and the resume state's history).
    fields = [f for f in asdict(result.history[0]) if f != "seconds"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(asdict(h) for h in result.history)
    write_text(paths.train_plot(gen), buf.getvalue())
    return metrics


def export_generation(
    paths: ProjectPaths, gen: int, p: ExportParams, ctx: DistContext, bar: BarFactory, verify: bool = True
) -> dict[str, Any]:
    """Export generation `gen`'s logits into its store (this rank's rows under torchrun), shown on `bar`."""
    data = load_prepared(paths.dataset, verify=verify)
    device = resolve_device(p.device, ctx)
    totals = {}  # this rank's rows of each split
    for split in ("train", "test"):
        begin, end = partition_rows(len(data.split(split)[1]), p.chunk_rows, ctx.world_size)[ctx.rank]
        totals[split] = end - begin
    with split_bars(bar, f"export gen {gen}", totals, enabled=ctx.is_main) as on_rows:
        return export_logits(paths.model(gen), data, paths.store(gen), p, device, ctx, on_rows=on_rows)


@contextlib.contextmanager
def split_bars(
    bar: BarFactory, label: str, totals: dict[str, int], enabled: bool = True
) -> Iterator[Callable[[str, int], None]]:
    """`on_rows(split, n)` for an export: one display per split (`export gen 0 train rows 400/4000`, then the
    test rows), so a count never mixes the splits; each opens at its split's first chunk and closes when
    the next split starts."""
    shown: dict[str, Bar] = {}
    with contextlib.ExitStack() as stack:

        def on_rows(split: str, n: int) -> None:
            if split not in shown:
                stack.close()  # the previous split's display
                shown[split] = stack.enter_context(
                    bar(f"{label} {split}", totals[split], unit="rows", lines=10, enabled=enabled)
                )
            shown[split].update(n)

        yield on_rows


def evaluate_project(paths: ProjectPaths, gens: list[int], verify: bool = True) -> dict[str, Any]:
    """Accuracy of each generation and of Ens*k from the cached test logits, written to metrics/ensemble/."""
    data = load_prepared(paths.dataset, verify=verify)
    metrics = evaluate_chain({g: paths.store(g) for g in gens}, data, verify=verify)
    # metrics only, for `dvc metrics show` (members: lists, which it does not tabulate; the report names them)
    write_ensemble_metrics(paths.ensemble_metrics, metrics)
    return metrics
