"""One split of a teacher store held in device memory, for training within `train.memory_budget_mib`.

When the train images, labels and the teacher store's train split fit the budget, training moves the
store's arrays to the device once (`DeviceTargets`) and gathers each batch's targets there by dataset
index: no per-batch host-to-device copy, no host synchronisation inside an epoch. The targets are those
`pipeline.cache.reader.CachedTargets.teacher` serves for the same (row, view): the store's format expands
the same stored rows (`pipeline.cache.formats`, `StoreFormat.expand`), here on the device.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.members import EnsembleTargets, Targets, combine, combine_logits, members_of
from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import AUG_ARRAY
from pipeline.core.errors import CorruptStoreError
from pipeline.data.augment import AugParams
from pipeline.data.prepared import PreparedData
from pipeline.losses import Teacher


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without blocking the host (pinned staging on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _arrays(source: CachedTargets, all_views: bool) -> list[str]:
    """The arrays of `source`'s split a target reads (its values and its format's `read` arrays), and with
    every view its crops and flips."""
    split = source.split
    names = [split, *(f"{split}_{name}" for name in source.format.read)]
    return names + ([f"{split}_{AUG_ARRAY}"] if all_views else [])


def resident_bytes(data: PreparedData, source: Targets | None, all_views: bool) -> int:
    """Device bytes the resident path needs: train images and labels, and the teacher arrays it serves
    (every view under a view policy, else one), of every member of an ensemble teacher."""
    total = data.x_train.nbytes + data.y_train.nbytes
    for member in members_of(source) if source is not None else []:
        store = member.check()
        for name in _arrays(member, all_views):
            arr = store.array(name)
            total += int(np.prod(arr.shape)) * arr.dtype.itemsize // (1 if all_views else arr.shape[1])
    return total


class DeviceTargets:
    """One split of a teacher store in device memory, served by (row, view) as `CachedTargets.teacher`.

    Built from a `CachedTargets` (its validated store and in-memory tables); damaged rows among `rows`
    (the rows training will ask for) are refused here, once, as the streaming reader refuses a batch."""

    def __init__(self, source: CachedTargets, device: torch.device, rows: np.ndarray, all_views: bool) -> None:
        a = source.attrs
        self.path, self.attrs, self.format = source.path, a, source.format
        self.augmentation = a["augmentation"]
        self.default_view = source.view if all_views else 0  # index of the reader's view in the tensors
        views = slice(None) if all_views else slice(source.view, source.view + 1)
        self.tensors: dict[str, torch.Tensor] = {}
        for name in _arrays(source, all_views):
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

    def teacher(self, rows: torch.Tensor, *, views: torch.Tensor | None, temperature: float) -> Teacher:
        """What the losses take for dataset rows `rows` (device int64), each at its view in `views` (None:
        the reader's default view); the same values as `CachedTargets.teacher` (see its docstring)."""
        values = self._get("values", rows, views)
        arrays = {name: self._get(name, rows, views) for name in self.format.read}
        return self.format.expand(self.path, self.attrs, values, arrays, temperature)

    def aug(self, rows: torch.Tensor, views: torch.Tensor) -> AugParams:
        """The stored crop/flip of each (row, view), on the device."""
        assert self.augmentation, "aug() needs a multi-view store with augmentation parameters"
        tlf = self._get(AUG_ARRAY, rows, views).long()
        return AugParams(tlf[:, 0], tlf[:, 1], tlf[:, 2].bool(), self.augmentation["pad"], self.augmentation["size"])


class DeviceEnsemble:
    """An ensemble teacher on the device: each member a `DeviceTargets`, combined as
    `EnsembleTargets.teacher` combines them (`pipeline.cache.members.combine`)."""

    def __init__(self, source: EnsembleTargets, device: torch.device, rows: np.ndarray, all_views: bool) -> None:
        self.members = [DeviceTargets(m, device, rows, all_views) for m in source.members]
        self.mode = source.mode
        self.stacked: torch.Tensor | None = None  # dense members: their logits as one (M, N, V, C) tensor
        if all(m.format.full_logits for m in self.members):
            self.stacked = torch.stack([m.tensors.pop("values") for m in self.members])  # held once, not twice

    def teacher(self, rows: torch.Tensor, *, views: torch.Tensor | None, temperature: float) -> Teacher:
        if self.stacked is not None:  # one gather and one softmax for every member
            v = self.members[0].default_view if views is None else views
            return combine_logits(self.stacked[:, rows, v], self.mode, temperature)
        parts = [m.teacher(rows, views=views, temperature=temperature) for m in self.members]
        return combine(parts, self.mode, temperature)

    def aug(self, rows: torch.Tensor, views: torch.Tensor) -> AugParams:
        return self.members[0].aug(rows, views)


def device_targets(
    source: Targets, device: torch.device, rows: np.ndarray, all_views: bool
) -> DeviceTargets | DeviceEnsemble:
    """`source`'s targets on the device: one store's, or every member's of an ensemble teacher."""
    if isinstance(source, EnsembleTargets):
        return DeviceEnsemble(source, device, rows, all_views)
    return DeviceTargets(source, device, rows, all_views)
