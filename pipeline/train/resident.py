"""Device-resident training input and teacher targets, for datasets and stores within a memory budget.

When the train images, labels and the teacher store's train split fit `train.memory_budget_mib`, they are
moved to the training device once (`ResidentInput`, `DeviceTargets`) and every batch is gathered there by
dataset index: no DataLoader, no per-batch host-to-device copy, no host synchronisation inside an epoch.
Beyond the budget, training takes the streaming path (DataLoader + `pipeline.cache.reader.CachedTargets`).

Both paths take what an epoch sees from `pipeline.train.epochs` (the order `epoch_order`, the crops and
flips `epoch_aug`, the stored views `pick_views`), so on the CPU they train bit-identically
(tests/test_device_data.py). Here the epoch's crop/flip table is drawn on the host before the epoch starts,
moved to the device once and applied there with `pipeline.data.augment.apply_params`.

The targets are those `CachedTargets.target` serves for the same (row, view): raw logits (float32) of a
dense store, the distribution rebuilt from a top-k or sampled layout, computed on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.cache.reader import CachedTargets, expand_sparse
from pipeline.cache.store import AUG_ARRAY
from pipeline.core.errors import CorruptStoreError
from pipeline.data.augment import AugParams, apply_params
from pipeline.data.prepared import PreparedData
from pipeline.losses import Teacher
from pipeline.train.epochs import ViewPolicy, batch_aug, epoch_aug, epoch_order, pick_views

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, Teacher | None]  # inputs, labels, teacher target (on the device)
MIB = 2**20


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without blocking the host (pinned staging on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _arrays(attrs: dict, split: str, all_views: bool) -> list[str]:
    layout = attrs.get("layout", "dense")
    names = [split, *([f"{split}_idx"] if layout != "dense" else []), *([f"{split}_mass"] if layout == "topk" else [])]
    return names + ([f"{split}_{AUG_ARRAY}"] if all_views else [])


def resident_bytes(data: PreparedData, source: CachedTargets | None, all_views: bool) -> int:
    """Device bytes the resident path needs: train images and labels, and the teacher arrays it serves
    (every view under a view policy, else one)."""
    total = data.x_train.nbytes + data.y_train.nbytes
    if source is not None:
        store = source.check()
        for name in _arrays(source.attrs, source.split, all_views):
            arr = store.array(name)
            total += int(np.prod(arr.shape)) * arr.dtype.itemsize // (1 if all_views else arr.shape[1])
    return total


class DeviceTargets:
    """One split of a teacher store in device memory, served by (row, view) as `CachedTargets.target`.

    Built from a `CachedTargets` (its validated store and in-memory tables); damaged rows among `rows`
    (the rows training will ask for) are refused here, once, as the streaming reader refuses a batch."""

    def __init__(self, source: CachedTargets, device: torch.device, rows: np.ndarray, all_views: bool) -> None:
        a = source.attrs
        self.path, self.attrs, self.layout = source.path, a, a.get("layout", "dense")
        self.recipe = a.get("augmentation")
        self.default_view = source.view if all_views else 0  # index of the reader's view in the tensors
        views = slice(None) if all_views else slice(source.view, source.view + 1)
        self.tensors: dict[str, torch.Tensor] = {}
        for name in _arrays(a, source.split, all_views):
            table = source._table(name)  # noqa: SLF001  (the reader's loaded, damage-checked array)
            if table is None:
                raise ValueError(f"{source.path}: array {name!r} is over the reader's memory budget")
            if (table.unreadable[rows] >= 0).any():
                err = table.errors[table.unreadable[rows].max()]
                raise CorruptStoreError(
                    f"{source.path}: cannot read rows of '{source.split}' ({err}); a chunk is damaged, "
                    "re-export the store"
                )
            bad = table.bad[rows][:, views].any(axis=1)
            if bad.any():
                raise CorruptStoreError(
                    f"{source.path}: rows {np.unique(rows[bad])[:5].tolist()} of '{name}' are not finite "
                    f"(damaged chunk?); re-export the store"
                )
            self.tensors[name.removeprefix(source.split).lstrip("_") or "values"] = to_device(
                torch.from_numpy(np.ascontiguousarray(table.values[:, views])), device
            )

    def _get(self, name: str, rows: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
        t = self.tensors[name]
        return t[rows, self.default_view] if views is None else t[rows, views]

    def target(self, rows: torch.Tensor, *, views: torch.Tensor | None, temperature: float) -> Teacher:
        """Teacher target of dataset rows `rows` (device int64), each at its view in `views` (None: the
        reader's default view); the same values as `CachedTargets.target` (see its docstring)."""
        if self.layout == "dense":
            return self._get("values", rows, views).float()
        values = self._get("values", rows, views).float()
        classes = self._get("idx", rows, views).long()
        mass = self._get("mass", rows, views).float() if self.layout == "topk" else None
        return expand_sparse(self.path, self.attrs, values, classes, mass, temperature)

    def aug(self, rows: torch.Tensor, views: torch.Tensor) -> AugParams:
        """The stored crop/flip of each (row, view), on the device."""
        assert self.recipe, "aug() needs a multi-view store with augmentation parameters"
        tlf = self._get(AUG_ARRAY, rows, views).long()
        return AugParams(tlf[:, 0], tlf[:, 1], tlf[:, 2].bool(), self.recipe["pad"], self.recipe["size"])


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
            aug = to_device(epoch_aug(n, bs, self.aug_gen, self.size), self.device)
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
                x = apply_params(x, batch_aug(aug[s : s + bs], self.size))
            yield x, y, teacher

    def val_xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation images and labels, gathered on the device."""
        return self.x[self.val], self.y[self.val]
