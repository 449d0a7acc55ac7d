"""Training one generation: from labels (generation 0) or from a teacher's cached logits (K >= 1).

A student never builds, loads or even opens its teacher's checkpoint: its targets come only from the
teacher's logit store, read by dataset index (`pipeline.cache.reader.CachedTargets`). With a multi-view store and
view_policy "cycle" or "random", each sample trains on one stored view: its image is rebuilt from the
stored crop/flip (no fresh augmentation) and its target is that view's teacher output.

Two input paths feed the same `train_one_epoch`: when the train data and the teacher's targets fit
`train.memory_budget_mib`, they live on the training device and batches are gathered there
(`pipeline.train.resident`); otherwise a DataLoader streams them (`pipeline.train.inputs`). Both draw the same
random numbers, so on the CPU they train bit-identically.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.cache.formats import LAYOUTS
from pipeline.cache.members import EnsembleTargets, Targets, members_of
from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import check_temperature, has_aug, views_of
from pipeline.core.devices import resolve_device
from pipeline.core.distributed import SINGLE_PROCESS, DistContext
from pipeline.core.errors import DivergedError, ParamsError
from pipeline.data.files import ImageFiles
from pipeline.data.prepared import PreparedData
from pipeline.losses import Teacher, loss_spec
from pipeline.models.checkpoint import save_atomic, save_checkpoint
from pipeline.models.registry import ImageInput, build_model
from pipeline.params import GenParams, TrainParams, generation_seed, section_of
from pipeline.train.epochs import LiveAugment, ViewPolicy
from pipeline.train.inputs import make_input
from pipeline.train.optim import make_optimizer, make_scheduler
from pipeline.train.resident import MIB, Batch

log = logging.getLogger(__name__)

STATE_FORMAT = "bancache-train-state-v2"  # v2: adds the loss generator


def seed_everything(seed: int, deterministic: bool, device: torch.device | None = None) -> torch.Generator:
    """Seed Python, numpy and torch; deterministic kernels, or cudnn's autotuner (`cudnn.benchmark`) on
    CUDA when not deterministic. Returns the shuffling generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device is not None and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return torch.Generator().manual_seed(seed)


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_acc: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochLog] = field(default_factory=list)
    selected_epoch: int = 0


@dataclass
class StepOptions:
    """Per-step input handling: live augmentation (either input path), autocast dtype and memory format (CUDA)."""

    augment: LiveAugment | None = None
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False


def _bf16_ok() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):
        return False


def step_options(
    recipe: TrainParams, data: PreparedData, device: torch.device, aug_gen: torch.Generator
) -> StepOptions:
    images = data.x_train.ndim == 4 and data.x_train.dtype == np.uint8
    opts = StepOptions()
    on_disk = isinstance(data.x_train, ImageFiles)
    if recipe.crop == "resized" and not on_disk:
        raise ParamsError(
            "train.crop = 'resized': RandomResizedCrop needs the decoded files (data.storage: files, dataset "
            "imagefolder); set train.crop: pad for in-memory datasets"
        )
    if images and recipe.augment and recipe.crop == "pad":  # resized crops are cut in the loader's workers
        opts.augment = LiveAugment(aug_gen, data.x_train.shape[-1])  # padding augment.PAD (pipeline.train.epochs)
    if device.type == "cuda":
        if recipe.amp in ("auto", "bf16"):
            opts.amp_dtype = torch.bfloat16 if _bf16_ok() else torch.float16
        elif recipe.amp == "fp16":
            opts.amp_dtype = torch.float16
        opts.channels_last = images and recipe.channels_last
    return opts


Criterion = Callable[[torch.Tensor, Teacher | None, torch.Tensor], torch.Tensor]


def make_criterion(gp: GenParams, generator: torch.Generator | None = None) -> Criterion:
    """The generation's registered loss (`pipeline.losses.LOSSES`) bound to its params once:
    criterion(student_logits, teacher, labels). `generator` draws DKPP's permutations."""
    spec, t, alpha, beta = loss_spec(gp.loss), gp.temperature, gp.alpha, gp.beta

    def criterion(s: torch.Tensor, teacher: Teacher | None, y: torch.Tensor) -> torch.Tensor:
        return spec(s, teacher, y, t, alpha, beta, generator)

    return criterion


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    opt: torch.optim.Optimizer,
    criterion: Criterion,
    opts: StepOptions | None = None,
) -> float:
    """One pass over `batches` of (x, y, teacher) on the model's device; returns the mean loss per sample.
    The running loss stays on the device (float64) and is read once, at the end of the epoch."""
    opts = opts or StepOptions()
    model.train()
    scaler = torch.amp.GradScaler("cuda", enabled=opts.amp_dtype == torch.float16)
    total: torch.Tensor | None = None
    count = 0
    for x, y, teacher in batches:
        if opts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=opts.amp_dtype or torch.float32, enabled=opts.amp_dtype is not None):
            out = model(x)
        loss = criterion(out, teacher, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        part = loss.detach().double() * len(y)
        total = part if total is None else total + part
        count += len(y)
    return float(total) / count if total is not None else 0.0


def _save_state(
    path: Path,
    key: str,
    epoch: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gens: tuple[torch.Generator, ...],
    result: TrainResult,
    best: tuple[float, dict[str, torch.Tensor] | None],
) -> None:
    """Everything needed to continue after `epoch` bit-exactly: weights, optimizer, schedule, RNGs."""
    state = {
        "format": STATE_FORMAT,
        "key": key,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gens[0].get_state(),
        "aug_generator": gens[1].get_state(),
        "loss_generator": gens[2].get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": [asdict(h) for h in result.history],
        "best_acc": best[0],
        "best_state": best[1],
        "selected_epoch": result.selected_epoch,
    }
    save_atomic(path, state)  # a full disk is a DiskFullError, not torch's RuntimeError


def _load_state(path: Path, key: str) -> dict[str, Any] | None:
    """The resume state at `path` if it exists, loads, and belongs to this exact run (`key`)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged state costs progress, never correctness
        log.warning("ignoring unreadable resume state %s (%s); starting from epoch 1", path, e)
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("key") != key:
        log.warning("resume state %s belongs to another run (params, data or teacher changed); starting fresh", path)
        return None
    return state  # type: ignore[no-any-return]


TeacherStores = Path | list[Path]  # one teacher's store, or an ensemble teacher's member stores in params order


def open_teacher(
    data: PreparedData, recipe: TrainParams, store: TeacherStores, verify: bool, gp: GenParams | None = None
) -> Targets:
    """The reader of a teacher store's train split within train.memory_budget_mib; `verify` False skips
    hashing it (a trusted store). A list of stores is an ensemble teacher (`gp.ensemble` combines them):
    every member is opened and verified as a single teacher is, and they share the budget evenly."""
    stores = store if isinstance(store, list) else [store]
    budget = recipe.memory_budget_mib * MIB // len(stores)
    readers = [
        CachedTargets(
            s, "train", data.fingerprint, len(data.y_train), data.num_classes, max_memory_bytes=budget, verify=verify
        )
        for s in stores
    ]
    if not isinstance(store, list):
        return readers[0]
    mode = gp.ensemble if gp is not None else "probs"
    return EnsembleTargets(readers, mode, list(gp.members) if gp is not None else [])


def _open_targets(
    data: PreparedData,
    recipe: TrainParams,
    gen: int,
    gp: GenParams,
    teacher_store: TeacherStores | None,
    verify: bool,
    targets: Targets | None = None,
) -> Targets | None:
    """The teacher's reader: `targets` when the caller already opened and checked it (`check_all_targets`:
    one open and one check per store per run, as `pipeline.chain.generation.prepare_generation` does), else
    opened and checked here."""
    if not loss_spec(gp.loss).needs_teacher:
        return None
    if targets is None:
        if teacher_store is None:
            raise ValueError(f"generation {gen}: loss {gp.loss!r} needs a teacher store")
        targets = open_teacher(data, recipe, teacher_store, verify, gp)
        check_all_targets(targets, gp, gen)
    return targets


def _build_model(data: PreparedData, recipe: TrainParams, gp: GenParams, device: torch.device) -> nn.Module:
    model = build_model(gp.arch or recipe.arch, data.input_shape, data.num_classes)
    if isinstance(model, ImageInput) and data.channel_mean is not None and data.channel_std is not None:
        model.set_stats(data.channel_mean, data.channel_std)
    return model.to(device)


def _restore(
    state: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gens: tuple[torch.Generator, ...],
    result: TrainResult,
) -> tuple[int, tuple[float, dict[str, torch.Tensor] | None]]:
    """Load a resume state into the run's objects; returns the first epoch to train and the best so far."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gens[0].set_state(state["generator"])
    gens[1].set_state(state["aug_generator"])
    gens[2].set_state(state["loss_generator"])
    torch.set_rng_state(state["torch_rng"])
    result.history = [EpochLog(**h) for h in state["history"]]
    result.selected_epoch = state["selected_epoch"]
    return state["epoch"] + 1, (state["best_acc"], state["best_state"])


def _wrap(model: nn.Module, recipe: TrainParams, ctx: DistContext, device: torch.device) -> nn.Module:
    """The module the training steps call: DistributedDataParallel under torchrun, torch.compile'd when
    `recipe.compile`; checkpoints and validation keep using the plain `model`."""
    net: nn.Module = model
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if recipe.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    return net


def _generators(
    seed: int, recipe: TrainParams, device: torch.device
) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """Seed everything; (shuffling, crops and flips, DKPP's permutations), three apart streams, so a
    label-only control sees the same batches as its student. Deterministic runs pin the thread count."""
    if recipe.deterministic and recipe.threads:
        torch.set_num_threads(recipe.threads)  # part of the recipe: CPU float sums depend on the thread count
    shuffle = seed_everything(seed, recipe.deterministic, device)
    return shuffle, torch.Generator().manual_seed(seed + 7919), torch.Generator().manual_seed(seed + 104729)


def train_generation(
    data: PreparedData,
    recipe: TrainParams,
    gen: int,
    gp: GenParams,
    teacher_store: TeacherStores | None,
    state_path: Path | None = None,
    state_key: str = "",
    ctx: DistContext = SINGLE_PROCESS,
    verify: bool = True,
    on_epoch: Callable[[EpochLog], None] | None = None,
    targets: Targets | None = None,
) -> TrainResult:
    """Train generation `gen` from scratch with seed recipe.seed + gen (or gp.seed).

    With `state_path`, the full training state is saved there (atomically) after every epoch, and a state
    saved by an interrupted run with the same `state_key` is resumed: on CPU in deterministic mode the
    result is bit-identical to an uninterrupted run. Under torchrun (`ctx.enabled`) the model is wrapped
    in DistributedDataParallel and each rank trains its DistributedSampler shard; rank 0 saves the state.
    `verify` False: the store is not hashed; `targets`: its reader, opened and checked; `on_epoch`: each epoch's log.
    """
    seed, device = generation_seed(recipe, gen, gp), resolve_device(recipe.device, ctx)
    gens = _generators(seed, recipe, device)
    targets = _open_targets(data, recipe, gen, gp, teacher_store, verify, targets)
    model = _build_model(data, recipe, gp, device)
    opts = step_options(recipe, data, device, gens[1])  # gens[1]: crops and flips, apart from shuffling
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    views = (
        None
        if targets is None or gp.view_policy == "clean"
        else ViewPolicy(gp.view_policy, views_of(targets.attrs, targets.split), seed)
    )
    source = make_input(data, recipe, gp, device, ctx, targets, views, gens[:2], opts.augment, seed)
    net, opt = _wrap(model, recipe, ctx, device), make_optimizer(model, recipe)
    sched, result = make_scheduler(opt, recipe), TrainResult(model=model)
    best: tuple[float, dict[str, torch.Tensor] | None] = (-1.0, None)
    start = 1
    if state_path is not None and (state := _load_state(state_path, state_key)) is not None:
        start, best = _restore(state, model, opt, sched, gens, result)
        log.info("gen %d: resuming after epoch %d from %s", gen, start - 1, state_path)
    criterion = make_criterion(gp, gens[2])
    for epoch in range(start, recipe.epochs + 1):
        t0, lr = time.perf_counter(), opt.param_groups[0]["lr"]
        if source.sampler is not None:
            source.sampler.set_epoch(epoch)
        loss = train_one_epoch(net, source.batches(epoch), opt, criterion, opts)
        check_finite_loss(loss, gen, epoch, recipe)
        sched.step()
        val_acc = source.validate(model)
        result.history.append(EpochLog(epoch, loss, val_acc, lr, time.perf_counter() - t0))
        log.info("gen %d epoch %d/%d loss %.4f val_acc %.4f", gen, epoch, recipe.epochs, loss, val_acc)
        if on_epoch is not None:
            on_epoch(result.history[-1])
        if recipe.select == "best_val" and val_acc > best[0]:
            best = (val_acc, copy.deepcopy(model.state_dict()))
            result.selected_epoch = epoch
        if state_path is not None and ctx.is_main:
            _save_state(state_path, state_key, epoch, model, opt, sched, gens, result, best)
    return _select(result, recipe, best)


def check_finite_loss(loss: float, gen: int, epoch: int, recipe: TrainParams) -> None:
    """Stop a run whose mean training loss is NaN or infinite: nothing after it (model, resume state) is
    written, so a diverged run never becomes a generation."""
    if not math.isfinite(loss):
        raise DivergedError(
            f"generation {gen}: the training loss became {loss} in epoch {epoch}; no model was written. "
            f"Lower train.lr (now {recipe.lr}) or check the teacher's store and the params of this generation"
        )


def _select(
    result: TrainResult, recipe: TrainParams, best: tuple[float, dict[str, torch.Tensor] | None]
) -> TrainResult:
    """The generation's weights: the best validation epoch's (select: best_val), else the last epoch's."""
    if recipe.select == "best_val" and best[1] is not None:
        result.model.load_state_dict(best[1])
    else:
        result.selected_epoch = recipe.epochs
    return result


def check_all_targets(targets: Targets, gp: GenParams, gen: int) -> None:
    """`check_targets` for every member of the teacher (one store, or each member of an ensemble), and an
    ensemble target the loss can take: a softmax mean (`ensemble: probs`) is a distribution, with no logits
    for a loss that matches logits (mse)."""
    for member in members_of(targets):
        check_targets(member, gp, gen)
    if isinstance(targets, EnsembleTargets) and loss_spec(gp.loss).needs_logits and gp.ensemble != "logits":
        raise ParamsError(
            f"{section_of(gen)}.loss = {gp.loss!r} matches the teacher's logits, and an ensemble teacher with "
            f"ensemble: {gp.ensemble} gives the mean of its members' softmax (no logits). Set "
            f"{section_of(gen)}.ensemble: logits (every member dense)"
        )


def check_targets(targets: CachedTargets, gp: GenParams, gen: int) -> None:
    """Refuse a loss, view policy or temperature the teacher's store cannot serve."""
    a = targets.attrs
    section = section_of(gen)
    if loss_spec(gp.loss).needs_logits and not targets.format.full_logits:
        full = " or ".join(name for name, f in LAYOUTS.items() if f.full_logits)
        raise ParamsError(
            f"{section}.loss = {gp.loss!r} matches the teacher's logits, and the teacher's store {targets.path} has "
            f"layout {targets.format.name!r}, which keeps only part of each row. Export it with export.layout: {full}"
        )
    if gp.view_policy != "clean" and not (views_of(a, targets.split) > 1 and has_aug(a, targets.split)):
        raise ParamsError(
            f"{section}.view_policy = {gp.view_policy!r}: the teacher's store {targets.path} has "
            f"{views_of(a, targets.split)} un-augmented view(s). Export it with export.views > 1 (image datasets) "
            f"or use view_policy: clean"
        )
    check_temperature(targets.path, targets.format, gp.temperature, f"{section}.temperature")


def checkpoint_meta(
    data: PreparedData, recipe: TrainParams, gen: int, gp: GenParams, teacher_sha: str | list[str] | None
) -> dict[str, Any]:
    """The provenance a generation's checkpoint (and its store's `trained_with`) records. An ensemble
    teacher records its members (`teacher` the list, `teacher_store_checkpoint_sha256` one per member) and
    how they were combined (`ensemble`); a single teacher's meta is unchanged, so its resume keys still hold."""
    return {
        "arch": gp.arch or recipe.arch,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "generation": gen,
        "teacher": gp.teacher,
        "teacher_store_checkpoint_sha256": teacher_sha,
        "seed": generation_seed(recipe, gen, gp),
        "loss": gp.loss,
        "temperature": gp.temperature,
        "alpha": gp.alpha,
        **({"beta": gp.beta} if "beta" in loss_spec(gp.loss).params else {}),  # keeps older resume keys
        "dataset_fingerprint": data.fingerprint,
        "recipe": {k: getattr(recipe, k) for k in recipe.__dataclass_fields__},
        **({"view_policy": gp.view_policy} if gp.view_policy != "clean" else {}),  # keeps older resume keys
        **({"ensemble": gp.ensemble} if isinstance(gp.teacher, list) else {}),
    }


def save_generation(path: Path, result: TrainResult, meta: dict[str, Any]) -> None:
    save_checkpoint(path, result.model, {**meta, "selected_epoch": result.selected_epoch})
