"""Device-resident training input and teacher targets, for datasets and stores within a memory budget.

When the train images, labels and the teacher store's train split fit `train.memory_budget_mib`, they are
moved to the training device once (`ResidentInput`, `DeviceTargets`) and every batch is gathered there by
dataset index: no DataLoader, no per-batch host-to-device copy, no host synchronisation inside an epoch.
Beyond the budget, training takes the streaming path (DataLoader + `pipeline.cache.reader.CachedTargets`).

Both paths take what an epoch sees from `pipeline.train.epochs` (the order `epoch_order`, the crops and
flips `epoch_aug`, the stored views `pick_views`), so on the CPU they train bit-identically
(tests/test_device_data.py). Here the epoch's crop/flip table is drawn on the host before the epoch starts,
moved to the device once and applied there with `pipeline.data.augment.apply_params`.

The targets are those `CachedTargets.teacher` serves for the same (row, view): raw logits (float32) of a
dense store, the distribution rebuilt from a top-k or sampled layout, computed on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.cache.device import DeviceEnsemble, DeviceTargets, to_device
from pipeline.data.augment import apply_params
from pipeline.data.prepared import PreparedData
from pipeline.losses import Teacher
from pipeline.train.epochs import ViewPolicy, batch_aug, epoch_aug, epoch_order, pick_views

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, Teacher | None]  # inputs, labels, teacher target (on the device)
MIB = 2**20


class ResidentInput:
    """Train images and labels on the device; `epoch` yields the fit rows' batches in seeded order."""

    def __init__(
        self,
        data: PreparedData,
        device: torch.device,
        batch_size: int,
        generator: torch.Generator,
        aug_gen: torch.Generator | None,
        rows: np.ndarray | None = None,
    ) -> None:
        """`rows`: the train rows an epoch visits (default `data.fit_index()`, the labelled fit rows)."""
        self.device, self.batch_size = device, batch_size
        self.generator, self.aug_gen = generator, aug_gen
        self.x = to_device(torch.from_numpy(np.ascontiguousarray(data.x_train)), device)
        self.y = to_device(torch.from_numpy(np.ascontiguousarray(data.y_train)), device)
        self.fit = torch.from_numpy(data.fit_index() if rows is None else rows)
        self.val = to_device(torch.from_numpy(data.val_index), device)
        self.size = data.x_train.shape[-1]

    def epoch(
        self,
        epoch: int,
        targets: DeviceTargets | DeviceEnsemble | None = None,
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
            aug = to_device(epoch_aug(n, bs, self.aug_gen, self.size), self.device)
        rows_all = to_device(rows_cpu, self.device)
        for s in range(0, n, bs):
            rows = rows_all[s : s + bs]
            x, y, teacher = self.x[rows], self.y[rows], None
            if targets is not None:
                vb = None if v is None else v[s : s + bs]
                teacher = targets.teacher(rows, views=vb, temperature=temperature)
                if vb is not None:
                    x = apply_params(x, targets.aug(rows, vb))  # the image the teacher's output was computed on
            if aug is not None:
                x = apply_params(x, batch_aug(aug[s : s + bs], self.size))
            yield x, y, teacher

    def val_xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation images and labels, gathered on the device."""
        return self.x[self.val], self.y[self.val]
