"""One generation in a project root (`pipeline.core.paths.ProjectPaths`): trained, saved, and its metrics
and per-epoch plot written, as the `train` stage and the sweep both need it.

Progress is the caller's: these functions take an `on_epoch` hook (`epoch_hook` over any `Bar`, such as the
stages' `Progress`), and print nothing themselves.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.audit.fitness import check_teacher
from pipeline.cache.members import EnsembleTargets, Targets
from pipeline.cache.store import LogitStore
from pipeline.core.devices import resolve_device
from pipeline.core.distributed import SINGLE_PROCESS, DistContext, barrier, partition_rows
from pipeline.core.files import write_json, write_text
from pipeline.core.machine import with_machine
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import PreparedData, load_prepared
from pipeline.losses import loss_spec
from pipeline.models.predict import predict_accuracy
from pipeline.params import ExportParams, GenParams, SourceParams, TrainParams
from pipeline.results.ensemble import evaluate_chain, write_ensemble_metrics
from pipeline.teachers.export import export_logits
from pipeline.teachers.foreign import import_teacher, teacher_label
from pipeline.train.loop import (
    EpochLog,
    TrainResult,
    check_all_targets,
    checkpoint_meta,
    open_teacher,
    save_generation,
    train_generation,
)

log = logging.getLogger(__name__)


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
    targets: Targets | None
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
    teacher_store = teacher_stores(paths, gp)
    targets = open_teacher(data, recipe, teacher_store, verify, gp) if teacher_store is not None else None
    if targets is not None:  # a loss, view policy or temperature the stores cannot serve: before any work
        check_all_targets(targets, gp, gen)
    teacher_sha: str | list[str] | None = None
    if isinstance(targets, EnsembleTargets):
        teacher_sha = targets.checkpoint_sha256  # one per member, in params order
    elif targets is not None:
        teacher_sha = targets.attrs["checkpoint_sha256"]
    fitness = None
    if targets is not None and gp.teacher is not None and is_main:
        fitness = check_teacher(data, targets, gp.loss, gp.temperature, gp.teacher)
    meta = checkpoint_meta(data, recipe, gen, gp, teacher_sha)
    if not resume:
        paths.train_state(gen).unlink(missing_ok=True)
    return GenerationJob(paths, recipe, gen, gp, data, targets, fitness, meta, verify)


def teacher_stores(paths: ProjectPaths, gp: GenParams) -> Path | list[Path] | None:
    """The store a generation learns from, the member stores of an ensemble teacher, or None (labels)."""
    if gp.teacher is None or not loss_spec(gp.loss).needs_teacher:
        return None
    return [paths.store(g) for g in gp.members] if isinstance(gp.teacher, list) else paths.store(gp.teacher)


def teacher_record(paths: ProjectPaths, gen: int, gp: GenParams) -> dict[str, Any]:
    """What generation `gen` learns from, as dvc.yaml's train@K depends on it (members/gen-K.json): its
    teacher in params and the completion-marker sha256 of each member store (which changes with any array of
    the store), so the file changes exactly when one of K's own teacher stores does (none for labels)."""
    members = list(gp.members) if loss_spec(gp.loss).needs_teacher else []
    markers = {}
    for g in members:
        marker = LogitStore.open(paths.store(g)).marker  # checked against the store as every open is
        markers[str(g)] = marker["marker_sha256"] if marker is not None else None
    record: dict[str, Any] = {"generation": gen, "teacher": gp.teacher if members else None, "stores": markers}
    if isinstance(gp.teacher, list):
        record["ensemble"] = gp.ensemble
    return record


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
        teacher_stores(paths, job.gp),
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
    write_text(paths.train_plot(gen), plot_csv(result.history))
    return metrics


def plot_csv(history: list[EpochLog]) -> str:
    """plots/train/gen-K.csv: one row per epoch (the header alone for an imported generation 0)."""
    buf = io.StringIO()
    # Wall-clock seconds stay out of this git-tracked file, so a rerun of the same recipe reproduces it exactly
    # (they are in the progress lines and the resume state's history).
    fields = [f.name for f in dataclasses.fields(EpochLog) if f.name != "seconds"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(asdict(h) for h in history)
    return buf.getvalue()


def import_generation(
    paths: ProjectPaths, source: SourceParams, recipe: TrainParams, verify: bool = True
) -> dict[str, Any]:
    """Generation 0 imported instead of trained (params `gen0.source`): its checked import record in
    models/gen-0/model.pt, its test accuracy (on the device `train.device` names) and the label naming it
    in metrics/train/gen-0.json, and a plot with no epochs."""
    data = load_prepared(paths.dataset, verify=verify)
    weights = paths.root / source.weights
    if not weights.resolve().is_relative_to(paths.teachers.resolve()):
        log.warning(
            "gen0.source.weights = %r is outside teachers/: `dvc repro` reruns the import only when a file "
            "under teachers/ changes",
            source.weights,
        )
    model, record = import_teacher(source, weights, data, paths.model(0))
    device = resolve_device(recipe.device, SINGLE_PROCESS)
    _, test_acc = predict_accuracy(model.to(device), data.x_test, data.y_test, recipe.eval_batch_size, device)
    metrics = {"imported": teacher_label(record), "test_acc": test_acc}
    write_json(paths.train_metrics(0), with_machine(metrics))
    write_text(paths.train_plot(0), plot_csv([]))
    paths.train_state(0).unlink(missing_ok=True)  # a trained run's resume state is not this generation
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
