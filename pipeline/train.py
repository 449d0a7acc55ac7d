"""Training one generation: from labels (generation 0) or from a teacher's cached logits (K >= 1).

A student never builds, loads or even opens its teacher's checkpoint: its targets come only from the
teacher's logit store, read by dataset index (`pipeline.reader.CachedTargets`). With a multi-view store and
view_policy "cycle" or "random", each sample trains on one stored view: its image is rebuilt from the
stored crop/flip (no fresh augmentation) and its target is that view's teacher output.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.augment import apply_params, augment_batch, mix64
from pipeline.checkpoint import save_atomic, save_checkpoint
from pipeline.data import IndexedDataset, PreparedData
from pipeline.distributed import SINGLE_PROCESS, DistContext
from pipeline.errors import DivergedError, ParamsError
from pipeline.losses import Teacher, generation_loss
from pipeline.models import ImageInput, build_model
from pipeline.params import GenParams, TrainParams
from pipeline.reader import CachedTargets
from pipeline.schedules import warmup_scheduler

log = logging.getLogger(__name__)

STATE_FORMAT = "bancache-train-state-v2"  # v2: adds the loss generator


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    if p.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov, weight_decay=p.weight_decay
        )
    if p.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, p: TrainParams) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: cosine to 0, constant, or step (x0.2 at 50% and 75% of the epochs); with
    warmup_epochs or one-cycle, `pipeline.schedules.warmup_scheduler`."""
    if p.schedule == "onecycle" or p.warmup_epochs > 0:
        return warmup_scheduler(opt, p)
    if p.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs)
    if p.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [p.epochs // 2, (3 * p.epochs) // 4], gamma=0.2)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


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
    """Per-step input handling: augmentation (images), autocast dtype and memory format (CUDA)."""

    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    view_policy: str = "clean"  # cycle / random: replay stored views of a multi-view store (`pick_views`)
    num_views: int = 1
    view_seed: int = 0


def pick_views(opts: StepOptions, epoch: int, index: torch.Tensor) -> np.ndarray | None:
    """The stored view each row of the batch trains on, or None for "clean" (view 0 + live augmentation):
    "cycle" gives every row view epoch % V, "random" view mix64(seed, epoch, row) % V (the same for a row
    and epoch whatever the batch, so a resumed run replays the same views)."""
    if opts.view_policy == "clean":
        return None
    rows = index.cpu().numpy().astype(np.int64)
    if opts.view_policy == "cycle":
        return np.full(len(rows), epoch % opts.num_views, dtype=np.int64)
    return np.array([mix64(opts.view_seed, epoch, r) % opts.num_views for r in rows], dtype=np.int64)


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
    if images and recipe.augment:
        size = data.x_train.shape[-1]
        opts.augment = lambda x: augment_batch(x, aug_gen, pad=4, size=size)
    if device.type == "cuda":
        if recipe.amp in ("auto", "bf16"):
            opts.amp_dtype = torch.bfloat16 if _bf16_ok() else torch.float16
        elif recipe.amp == "fp16":
            opts.amp_dtype = torch.float16
        opts.channels_last = images and recipe.channels_last
    return opts


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    gp: GenParams,
    device: torch.device,
    targets: CachedTargets | None,
    generator: torch.Generator,
    opts: StepOptions | None = None,
    epoch: int = 0,
) -> float:
    """One pass over `loader`; each batch's teacher rows are looked up by the batch's dataset indices
    (and, under a view policy, the views `pick_views` chooses for `epoch`)."""
    opts = opts or StepOptions()
    model.train()
    scaler = torch.amp.GradScaler("cuda", enabled=opts.amp_dtype == torch.float16)
    total, count = 0.0, 0
    for x, y, index in loader:
        views = pick_views(opts, epoch, index) if targets is not None else None
        teacher: Teacher | None = None
        if targets is not None:
            teacher = targets.target(index, views=views, temperature=gp.temperature).to(device, non_blocking=True)
        if views is not None and targets is not None:
            x = apply_params(x, targets.aug(index, views))  # the very image the teacher's output was computed on
        elif opts.augment is not None:
            x = opts.augment(x)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if opts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=opts.amp_dtype or torch.float32, enabled=opts.amp_dtype is not None):
            out = model(x)
        loss = generation_loss(
            gp.loss, out, teacher, y, temperature=gp.temperature, alpha=gp.alpha, generator=generator
        )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(count, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits (N, C) of `model` in eval mode, in row order, float32."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(device)
        out.append(model(xb).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label (divided by samples, not batches)."""
    return float((logits.argmax(axis=-1) == y).mean()) if len(y) else float("nan")


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


def train_generation(
    data: PreparedData,
    recipe: TrainParams,
    gen: int,
    gp: GenParams,
    teacher_store: Path | None,
    state_path: Path | None = None,
    state_key: str = "",
    ctx: DistContext = SINGLE_PROCESS,
    verify: bool = True,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> TrainResult:
    """Train generation `gen` from scratch with seed recipe.seed + gen (or gp.seed).

    With `state_path`, the full training state is saved there (atomically) after every epoch, and a state
    saved by an interrupted run with the same `state_key` is resumed: on CPU in deterministic mode the
    result is bit-identical to an uninterrupted run. Under torchrun (`ctx.enabled`) the model is wrapped
    in DistributedDataParallel and each rank trains its DistributedSampler shard; rank 0 saves the state.
    `on_epoch` is called with each epoch's log (progress display).
    """
    seed = gp.seed if gp.seed is not None else recipe.seed + gen
    generator = seed_everything(seed, recipe.deterministic)
    if recipe.deterministic and recipe.threads:
        torch.set_num_threads(recipe.threads)  # part of the recipe: CPU float sums depend on the thread count
    device = resolve_device(recipe.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    targets = None
    if gp.loss != "ce":
        if teacher_store is None:
            raise ValueError(f"generation {gen}: loss {gp.loss!r} needs a teacher store")
        n = len(data.y_train)
        targets = CachedTargets(teacher_store, "train", data.fingerprint, n, data.num_classes, verify=verify)
        _check_targets(targets, gp, gen)
    arch = gp.arch or recipe.arch
    model = build_model(arch, data.input_shape, data.num_classes)
    if isinstance(model, ImageInput) and data.channel_mean is not None and data.channel_std is not None:
        model.set_stats(data.channel_mean, data.channel_std)
    model = model.to(device)
    aug_gen = torch.Generator().manual_seed(seed + 7919)  # crops and flips, apart from the shuffling stream
    # dkpp's permutations: apart from the shuffling stream, so a label-only control sees the same batches
    loss_gen = torch.Generator().manual_seed(seed + 104729)
    opts = step_options(recipe, data, device, aug_gen)
    if targets is not None and gp.view_policy != "clean":
        opts.view_policy, opts.num_views, opts.view_seed = gp.view_policy, targets.attrs["views"], seed
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    fit = IndexedDataset(data.x_train, data.y_train, data.fit_index())
    sampler = None
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # Per-rank batch = batch_size / world_size, so the global batch matches a single process.
        sampler = DistributedSampler(fit, ctx.world_size, ctx.rank, shuffle=True, seed=seed)
    loader = DataLoader(
        fit,
        batch_size=max(1, recipe.batch_size // ctx.world_size),
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=False,
        generator=generator,
        num_workers=recipe.num_workers,
        pin_memory=device.type == "cuda",
    )
    opt = make_optimizer(model, recipe)
    sched = make_scheduler(opt, recipe)
    x_val, y_val = data.x_train[data.val_index], data.y_train[data.val_index]
    result = TrainResult(model=model)
    best: tuple[float, dict[str, torch.Tensor] | None] = (-1.0, None)
    start = 1
    state = _load_state(state_path, state_key) if state_path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        aug_gen.set_state(state["aug_generator"])
        loss_gen.set_state(state["loss_generator"])
        torch.set_rng_state(state["torch_rng"])
        result.history = [EpochLog(**h) for h in state["history"]]
        result.selected_epoch = state["selected_epoch"]
        best = (state["best_acc"], state["best_state"])
        start = state["epoch"] + 1
        log.info("gen %d: resuming after epoch %d from %s", gen, state["epoch"], state_path)
    for epoch in range(start, recipe.epochs + 1):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        if sampler is not None:
            sampler.set_epoch(epoch)
        loss = train_one_epoch(net, loader, opt, gp, device, targets, loss_gen, opts, epoch=epoch)
        check_finite_loss(loss, gen, epoch, recipe)
        sched.step()
        val_acc = accuracy(predict_logits(model, x_val, recipe.eval_batch_size, device), y_val)
        result.history.append(EpochLog(epoch, loss, val_acc, lr, time.perf_counter() - t0))
        log.info("gen %d epoch %d/%d loss %.4f val_acc %.4f", gen, epoch, recipe.epochs, loss, val_acc)
        if on_epoch is not None:
            on_epoch(result.history[-1])
        if recipe.select == "best_val" and val_acc > best[0]:
            best = (val_acc, copy.deepcopy(model.state_dict()))
            result.selected_epoch = epoch
        if state_path is not None and ctx.is_main:
            gens = (generator, aug_gen, loss_gen)
            _save_state(state_path, state_key, epoch, model, opt, sched, gens, result, best)
    if recipe.select == "best_val" and best[1] is not None:
        model.load_state_dict(best[1])
    else:
        result.selected_epoch = recipe.epochs
    return result


def check_finite_loss(loss: float, gen: int, epoch: int, recipe: TrainParams) -> None:
    """Stop a run whose mean training loss is NaN or infinite: nothing after it (model, resume state) is
    written, so a diverged run never becomes a generation."""
    if not math.isfinite(loss):
        raise DivergedError(
            f"generation {gen}: the training loss became {loss} in epoch {epoch}; no model was written. "
            f"Lower train.lr (now {recipe.lr}) or check the teacher's store and the params of this generation"
        )


def _check_targets(targets: CachedTargets, gp: GenParams, gen: int) -> None:
    """Refuse a view policy or temperature the teacher's store cannot serve."""
    a = targets.attrs
    section = f"students.{gen}"
    if gp.view_policy != "clean" and not (a["views"] > 1 and a.get("augmentation")):
        raise ParamsError(
            f"{section}.view_policy = {gp.view_policy!r}: the teacher's store {targets.path} has {a['views']} "
            f"un-augmented view(s). Export it with export.views > 1 (image datasets) or use view_policy: clean"
        )
    if a.get("layout") == "sampled" and gp.temperature != 1.0:
        raise ParamsError(
            f"{section}.temperature = {gp.temperature}: the teacher's store {targets.path} holds sampled targets, "
            f"an estimate of the teacher distribution at T = 1 only. Use temperature: 1.0 or a dense or topk store"
        )


def checkpoint_meta(
    data: PreparedData, recipe: TrainParams, gen: int, gp: GenParams, teacher_sha: str | None
) -> dict[str, Any]:
    return {
        "arch": gp.arch or recipe.arch,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "generation": gen,
        "teacher": gp.teacher,
        "teacher_store_checkpoint_sha256": teacher_sha,
        "seed": gp.seed if gp.seed is not None else recipe.seed + gen,
        "loss": gp.loss,
        "temperature": gp.temperature,
        "alpha": gp.alpha,
        "dataset_fingerprint": data.fingerprint,
        "recipe": {k: getattr(recipe, k) for k in recipe.__dataclass_fields__},
        **({"view_policy": gp.view_policy} if gp.view_policy != "clean" else {}),  # keeps older resume keys
    }


def save_generation(path: Path, result: TrainResult, meta: dict[str, Any]) -> None:
    save_checkpoint(path, result.model, {**meta, "selected_epoch": result.selected_epoch})
