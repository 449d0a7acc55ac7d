"""Where a generation's training batches and validation come from: the device-resident path or the
streaming path, chosen by `train.memory_budget_mib`.

- resident (`pipeline.train.resident`): train images, labels and the teacher's targets moved to the training
  device once; batches gathered there by dataset index; validation counted on the device.
- streaming: a DataLoader of (x, y, dataset index) items, targets looked up per batch through
  `pipeline.cache.reader.CachedTargets` (`loader_batches`); the path beyond the budget, and under torchrun.

Both take each epoch's order, crops and flips and stored views from the same functions
(`pipeline.train.epochs`), so on the CPU they train bit-identically.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pipeline.cache.device import device_targets, resident_bytes
from pipeline.cache.members import Targets
from pipeline.cache.stream import BlockShuffleSampler, epoch_sampler
from pipeline.core.distributed import DistContext
from pipeline.data.augment import RESIZED_KIND, apply_params
from pipeline.data.files import CropRecipe, FilesDataset, ImageFiles
from pipeline.data.prepared import IndexedDataset, PreparedData
from pipeline.losses import Teacher, loss_spec
from pipeline.models.predict import device_accuracy, predict_accuracy
from pipeline.params import GenParams, TrainParams
from pipeline.train.epochs import EpochOrderSampler, LiveAugment, ViewPolicy, batch_aug, epoch_aug, pick_views
from pipeline.train.resident import MIB, Batch, ResidentInput

log = logging.getLogger(__name__)

PREFETCH = 4  # batches each DataLoader worker decodes ahead (files storage keeps the workers busy)


def loader_batches(
    loader: DataLoader,
    device: torch.device,
    targets: Targets | None = None,
    temperature: float = 1.0,
    augment: LiveAugment | None = None,
    views: ViewPolicy | None = None,
    epoch: int = 0,
) -> Iterator[Batch]:
    """The streaming path: (x, y, teacher) on `device` per batch of `loader`, whose items are (x, y,
    dataset index). Teacher rows are looked up by the batch's dataset indices and, under a view policy,
    the views `pick_views` chooses for `epoch` (each row's image rebuilt from that view's stored crop);
    else, with `augment`, each batch gets its slice of the epoch's `epoch_aug` table."""
    stored_views = views is not None and targets is not None
    aug = None if augment is None or stored_views else _loader_aug(loader, augment)
    in_dataset = isinstance(loader.dataset, FilesDataset) and loader.dataset.views is not None  # boxes cut there
    done = 0  # items of the epoch so far: this batch's rows of the crop/flip table start here
    for x, y, index in loader:
        v = pick_views(views, epoch, index.numpy()) if views is not None and targets is not None else None
        teacher: Teacher | None = None
        if targets is not None:
            teacher = targets.teacher(index, views=v, temperature=temperature).to(device, non_blocking=True)
        if v is not None and targets is not None and not in_dataset:
            x = apply_params(x, targets.aug(index, v))  # the very image the teacher's output was computed on
        elif aug is not None and augment is not None:
            x = apply_params(x, batch_aug(aug[done : done + len(x)], augment.size))
        done += len(x)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), teacher


def _loader_aug(loader: DataLoader, augment: LiveAugment) -> torch.Tensor:
    """The epoch's crop/flip table for `loader`'s batches: `len(loader.sampler)` items (this rank's share
    under DistributedSampler) in batches of `loader.batch_size`, the last one shorter (drop_last False)."""
    if loader.batch_size is None or loader.drop_last or not isinstance(loader.sampler, Sized):
        raise ValueError("loader_batches: live augmentation needs a sized sampler, a batch_size and drop_last False")
    return epoch_aug(len(loader.sampler), loader.batch_size, augment.generator, augment.size)


@dataclass
class TrainInput:
    """Where a run's batches and validation come from: the resident path (`pipeline.train.resident`) or the
    streaming path (DataLoader + CachedTargets)."""

    batches: Callable[[int], Iterable[Batch]]  # epoch -> (x, y, teacher) batches on the device
    validate: Callable[[nn.Module], float]  # model -> validation accuracy
    sampler: DistributedSampler | BlockShuffleSampler | None = None  # its set_epoch(epoch) is called per epoch


def _resident_input(
    data: PreparedData,
    recipe: TrainParams,
    gp: GenParams,
    device: torch.device,
    targets: Targets | None,
    views: ViewPolicy | None,
    gens: tuple[torch.Generator, torch.Generator | None],
    rows: np.ndarray,
) -> TrainInput:
    res = ResidentInput(data, device, recipe.batch_size, gens[0], gens[1], rows)
    dev_targets = None if targets is None else device_targets(targets, device, rows, views is not None)
    x_val, y_val = res.val_xy()
    return TrainInput(
        batches=lambda epoch: res.epoch(epoch, dev_targets, gp.temperature, views),
        validate=lambda model: device_accuracy(model, x_val, y_val, recipe.eval_batch_size),
    )


def _fit_dataset(
    data: PreparedData,
    recipe: TrainParams,
    targets: Targets | None,
    views: ViewPolicy | None,
    seed: int,
    rows: np.ndarray | None = None,
) -> IndexedDataset | FilesDataset:
    """The fit rows (`rows`, default the labelled ones: `data.fit_index()`) as (x, y, index) items: in-memory
    arrays, or files decoded in the workers. On files,
    `train.crop: resized` cuts a fresh RandomResizedCrop per (epoch, row); under a view policy a stored
    resized-crop view is cut from its (i, j, h, w, flip), drawn again from the store's recipe and seed."""
    rows = data.fit_index() if rows is None else rows
    if not isinstance(data.x_train, ImageFiles):
        return IndexedDataset(data.x_train, data.y_train, rows)
    crop = CropRecipe(data.x_train.size, recipe.crop_scale, recipe.crop_ratio)
    live = crop if recipe.augment and recipe.crop == "resized" else None
    recipe_of_views = None if targets is None else targets.attrs.get("augmentation")
    if views is None or not recipe_of_views or recipe_of_views.get("kind") != RESIZED_KIND:
        return FilesDataset(data.x_train, data.y_train, rows, live, seed)
    stored = CropRecipe(int(recipe_of_views["size"]), *(tuple(recipe_of_views[k]) for k in ("scale", "ratio")))  # type: ignore[arg-type]
    keys = (int(recipe_of_views["seed"]), int(recipe_of_views["split_ids"]["train"]))
    return FilesDataset(data.x_train, data.y_train, rows, stored, seed, functools.partial(pick_views, views), keys)


def _sampler(
    fit: IndexedDataset | FilesDataset,
    ctx: DistContext,
    targets: Targets | None,
    seed: int,
    generator: torch.Generator,
) -> Sampler[int]:
    """The streaming loader's order: `epoch_order` from the shuffling generator (`EpochOrderSampler`, the
    resident path's very order); under torchrun a DistributedSampler (per-rank batch = batch_size /
    world_size, so the global batch matches one process); a store streamed by chunk (over its reader's
    budget) is read in block-shuffled order."""
    if ctx.enabled:
        return DistributedSampler(fit, ctx.world_size, ctx.rank, shuffle=True, seed=seed)
    chunked = epoch_sampler(targets, fit.rows, seed)
    return EpochOrderSampler(len(fit), generator) if chunked is None else chunked


def _streaming_input(
    data: PreparedData,
    recipe: TrainParams,
    gp: GenParams,
    device: torch.device,
    ctx: DistContext,
    targets: Targets | None,
    views: ViewPolicy | None,
    generator: torch.Generator,
    augment: LiveAugment | None,
    seed: int,
    rows: np.ndarray,
) -> TrainInput:
    fit = _fit_dataset(data, recipe, targets, views, seed, rows)
    sampler = _sampler(fit, ctx, targets, seed, generator)
    loader = DataLoader(
        fit,
        batch_size=max(1, recipe.batch_size // ctx.world_size),
        shuffle=False,
        sampler=sampler,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),  # the loader's own: its workers' base seeds, nothing else
        num_workers=recipe.num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH if recipe.num_workers > 0 else None,
    )

    def batches(epoch: int) -> Iterator[Batch]:
        if isinstance(fit, FilesDataset):
            fit.set_epoch(epoch)  # workers start per epoch (not persistent), so they see it
        return loader_batches(loader, device, targets, gp.temperature, augment, views, epoch)

    x_val, y_val = data.x_train[data.val_index], data.y_train[data.val_index]
    return TrainInput(
        batches=batches,
        validate=lambda model: predict_accuracy(model, x_val, y_val, recipe.eval_batch_size, device)[1],
        sampler=sampler if isinstance(sampler, DistributedSampler | BlockShuffleSampler) else None,
    )


def make_input(
    data: PreparedData,
    recipe: TrainParams,
    gp: GenParams,
    device: torch.device,
    ctx: DistContext,
    targets: Targets | None,
    views: ViewPolicy | None,
    gens: tuple[torch.Generator, torch.Generator],
    augment: LiveAugment | None,
    seed: int,
) -> TrainInput:
    """Batches and validation of a run: the resident path when a single process's train data and teacher arrays fit
    `recipe.memory_budget_mib` on `device`, else the streaming path (and always under torchrun). The rows are
    the fit rows with a label, and on a transfer set also those without when the loss learns from a teacher
    there (`fit_rows`)."""
    rows = fit_rows(data, gp, targets)
    if isinstance(data.x_train, ImageFiles):  # decoded in the loader's workers, never held whole
        log.info("training input decoded from %d files by %d workers", len(data.x_train), recipe.num_workers)
        return _streaming_input(data, recipe, gp, device, ctx, targets, views, gens[0], augment, seed, rows)
    need = resident_bytes(data, targets, views is not None)
    if not ctx.enabled and need <= recipe.memory_budget_mib * MIB:
        log.info("training input resident on %s (%.1f MiB)", device, need / MIB)
        aug_gen = gens[1] if augment is not None else None
        return _resident_input(data, recipe, gp, device, targets, views, (gens[0], aug_gen), rows)
    log.info(
        "training input streamed (%.1f MiB over the %d MiB budget, or torchrun)", need / MIB, recipe.memory_budget_mib
    )
    return _streaming_input(data, recipe, gp, device, ctx, targets, views, gens[0], augment, seed, rows)


def fit_rows(data: PreparedData, gp: GenParams, targets: Targets | None) -> np.ndarray:
    """The train rows a generation fits: the labelled ones except validation (generation 0, label-trained
    members, controls, CWTM), plus a transfer set's unlabelled rows for a student whose loss learns from its
    teacher's targets there (`LossSpec.learns_unlabelled`): every row with a teacher row."""
    unlabelled = targets is not None and loss_spec(gp.loss).learns_unlabelled and data.num_unlabelled > 0
    rows = data.fit_index(unlabelled=unlabelled)
    if unlabelled:
        log.info("transfer set: %d fit rows, %d of them without a label", len(rows), data.num_unlabelled)
    return rows
