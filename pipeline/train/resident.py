"""Device-resident training input and teacher targets, for datasets and stores within a memory budget.

When the train images, labels and the teacher store's train split fit `train.memory_budget_mib`, they are
moved to the training device once (`ResidentInput`, `DeviceTargets`) and every batch is gathered there by
dataset index: no DataLoader, no per-batch host-to-device copy, no host synchronisation inside an epoch.
Beyond the budget, training takes the streaming path (DataLoader + `pipeline.cache.reader.CachedTargets`).

The resident path draws its randomness exactly as the streaming path does, so on the CPU both train
bit-identically (tests/test_device_data.py):

- the epoch's order: what a DataLoader with `shuffle=True` draws from the shuffling generator
  (`epoch_order`: its workers' base seed, then RandomSampler's permutations);
- crops and flips: `pipeline.data.augment.draw_params` per batch, in batch order, from the augmentation
  generator, drawn for the whole epoch on the host before it starts (`epoch_aug`) and applied on the device
  with `pipeline.data.augment.apply_params`;
- stored views (view policy cycle / random): `pick_views`, the view `mix64(seed, epoch, row) % V`, vectorised.

The targets are those `CachedTargets.target` serves for the same (row, view): raw logits (float32) of a
dense store, the distribution rebuilt from a top-k or sampled layout, computed on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache.device import DeviceTargets, to_device
from pipeline.data.augment import AugParams, apply_params, draw_params
from pipeline.data.prepared import PreparedData
from pipeline.losses import Teacher

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, Teacher | None]  # inputs, labels, teacher target (on the device)
_MASK64 = (1 << 64) - 1
MIB = 2**20


@dataclass(frozen=True)
class ViewPolicy:
    """Which stored view of a multi-view store each row trains on (`GenParams.view_policy`):
    cycle gives every row view epoch % V, random view mix64(seed, epoch, row) % V."""

    policy: str
    num_views: int
    seed: int


def mix64_rows(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """`pipeline.data.augment.mix64(seed, epoch, r)` for every r in `rows`, as uint64 (numpy wraps mod 2^64)."""
    h = np.full(rows.shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for key in (np.uint64(seed & _MASK64), np.uint64(epoch & _MASK64), rows.astype(np.int64).astype(np.uint64)):
        h = h ^ key
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return h >> np.uint64(1)  # type: ignore[no-any-return]


def pick_views(policy: ViewPolicy, epoch: int, rows: np.ndarray) -> np.ndarray:
    """The stored view (int64) each dataset row in `rows` trains on in `epoch`: the same for a row and
    epoch whatever the batch, so a resumed run replays the same views."""
    if policy.policy == "cycle":
        return np.full(len(rows), epoch % policy.num_views, dtype=np.int64)
    return (mix64_rows(policy.seed, epoch, rows) % np.uint64(policy.num_views)).astype(np.int64)


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """Positions 0..n-1 in the order a DataLoader(shuffle=True, generator=generator) visits them in one
    epoch, drawing from `generator` as it does: its base seed (one int64), RandomSampler's randperm, and
    the second, empty-sliced randperm that RandomSampler draws when the epoch's iteration reaches its end."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    return order


def epoch_aug(n: int, batch_size: int, generator: torch.Generator, pad: int, size: int) -> torch.Tensor:
    """(n, 3) int64 (top, left, flip) of an epoch's batches, drawn batch by batch as `augment_batch` does."""
    parts = [draw_params(min(batch_size, n - s), generator, pad, size) for s in range(0, n, batch_size)]
    if not parts:
        return torch.zeros((0, 3), dtype=torch.int64)
    columns = [torch.cat([p.top for p in parts]), torch.cat([p.left for p in parts])]
    return torch.stack([*columns, torch.cat([p.flip for p in parts]).long()], dim=1)


class ResidentInput:
    """Train images and labels on the device; `epoch` yields the fit rows' batches in seeded order."""

    def __init__(
        self,
        data: PreparedData,
        device: torch.device,
        batch_size: int,
        generator: torch.Generator,
        aug_gen: torch.Generator | None,
    ) -> None:
        self.device, self.batch_size = device, batch_size
        self.generator, self.aug_gen = generator, aug_gen
        self.x = to_device(torch.from_numpy(np.ascontiguousarray(data.x_train)), device)
        self.y = to_device(torch.from_numpy(np.ascontiguousarray(data.y_train)), device)
        self.fit = torch.from_numpy(data.fit_index())
        self.val = to_device(torch.from_numpy(data.val_index), device)
        self.size = data.x_train.shape[-1]

    def epoch(
        self,
        epoch: int,
        targets: DeviceTargets | None = None,
        temperature: float = 1.0,
        views: ViewPolicy | None = None,
    ) -> Iterator[Batch]:
        """One epoch of (x, y, teacher) batches on the device. With `views` (and targets) each row trains
        on its stored view; else, with an augmentation generator, on a fresh crop and flip."""
        rows_cpu = self.fit[epoch_order(len(self.fit), self.generator)]
        n, bs = len(rows_cpu), self.batch_size
        v = None
        if views is not None and targets is not None:
            v = to_device(torch.from_numpy(pick_views(views, epoch, rows_cpu.numpy())), self.device)
        aug = None
        if v is None and self.aug_gen is not None:
            aug = to_device(epoch_aug(n, bs, self.aug_gen, 4, self.size), self.device)
        rows_all = to_device(rows_cpu, self.device)
        for s in range(0, n, bs):
            rows = rows_all[s : s + bs]
            x, y, teacher = self.x[rows], self.y[rows], None
            if targets is not None:
                vb = None if v is None else v[s : s + bs]
                teacher = targets.target(rows, views=vb, temperature=temperature)
                if vb is not None:
                    x = apply_params(x, targets.aug(rows, vb))  # the image the teacher's output was computed on
            if aug is not None:
                a = aug[s : s + bs]
                x = apply_params(x, AugParams(a[:, 0], a[:, 1], a[:, 2].bool(), 4, self.size))
            yield x, y, teacher

    def val_xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation images and labels, gathered on the device."""
        return self.x[self.val], self.y[self.val]
