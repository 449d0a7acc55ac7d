"""An ensemble teacher: several generations' stores read side by side by dataset index, one target.

A student whose `teacher` is a list of generations learns from the mean of its members: by default the mean
of their softmax at T (Hinton et al. 2015's ensemble target, `mode` "probs"), or the softmax at T of the mean
of their logits ("logits", dense members only). Every member is its own `CachedTargets`, opened, budgeted and
verified exactly as a single teacher is; `EnsembleTargets` reads the same rows (and, under a view policy, the
same views) from each and combines them with `combine`. The device-resident path combines its members'
device tensors with the same function (`pipeline.cache.device.DeviceEnsemble`), so both paths give the
same targets.

The members must describe the same rows: the same dataset fingerprint, class count and rows of the split,
and for multi-view stores the same views (augmentation recipe, views per split and every row's stored crop
and flip, `train_aug`): a student replays one image per (row, view) and each member's output must be of
that image. `check_members` refuses anything else with one line naming the two stores and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.formats import StoreFormat
from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import AUG_ARRAY, LogitStore, has_aug
from pipeline.core.errors import ForeignStoreError, ParamsError
from pipeline.data.augment import AugParams
from pipeline.losses import Probs, Teacher, soften

REEXPORT_VIEWS = (
    "re-export the members with the same export settings (export.views, export.seed and the augmentation "
    "recipe: `bancache export-logits --gen J` for each member)"
)


def combine_logits(z: torch.Tensor, mode: str, temperature: float) -> Teacher:
    """The ensemble target of dense members' raw logits stacked as `z` (M, B, C): "probs",
    Probs((1/M) sum_j softmax(z_j / T)); "logits", the mean logits (B, C), which the loss softens at T
    (shifted float16 rows differ from raw ones by a per-row constant: the same softmax). One softmax over
    the stack, one sum: the host reader and the device path both end here, so they agree bit for bit."""
    z = z.float()
    if mode == "logits":
        return z.sum(0) / len(z)
    return Probs(torch.softmax(z / temperature, dim=-1).sum(0) / len(z))


def combine(teachers: Sequence[Teacher], mode: str, temperature: float) -> Teacher:
    """The ensemble target of the members' targets for the same rows (B, C) each: raw logits of dense
    members go through `combine_logits`; with a sparse member (a `Probs` rebuilt from its layout) the mean
    of the members' p_T, Probs((1/M) sum_j p_j,T). "logits" needs raw logits from every member."""
    if all(isinstance(t, torch.Tensor) for t in teachers):
        return combine_logits(torch.stack([t.float() for t in teachers]), mode, temperature)  # type: ignore[union-attr]
    if mode == "logits":
        raise ValueError("a logits-mean ensemble needs raw logits from every member (dense stores)")
    return Probs(torch.stack([soften(t, temperature) for t in teachers]).sum(0) / len(teachers))


def _views_signature(a: dict[str, Any]) -> tuple[Any, ...]:
    return (a["views"], a.get("split_views"), a.get("augmentation"))


def check_members(members: Sequence[CachedTargets], mode: str, generations: Sequence[int]) -> None:
    """Refuse members that do not describe the same rows, or a logits mean of sparse members; one line each."""
    first, a0 = members[0], members[0].attrs
    for m in members[1:]:
        a = m.attrs
        where = f"ensemble members {first.path} and {m.path}"
        if a["dataset_fingerprint"] != a0["dataset_fingerprint"]:
            raise ForeignStoreError(
                f"{where} were exported from different datasets (fingerprints {a0['dataset_fingerprint'][:12]}..., "
                f"{a['dataset_fingerprint'][:12]}...); re-export every member on this dataset"
            )
        if a["num_classes"] != a0["num_classes"]:
            raise ForeignStoreError(
                f"{where} have {a0['num_classes']} and {a['num_classes']} classes; re-export every member on this "
                "dataset"
            )
        if a["splits"] != a0["splits"]:
            raise ForeignStoreError(f"{where} hold different rows ({a0['splits']}, {a['splits']}); re-export them")
        if _views_signature(a) != _views_signature(a0) or not _same_aug(first, m):
            raise ForeignStoreError(
                f"{where} hold different views (views {a0['views']} vs {a['views']}, augmentation "
                f"{a0.get('augmentation')} vs {a.get('augmentation')}, or other crops and flips in train_aug): "
                f"a student replays one image per view; {REEXPORT_VIEWS}"
            )
    if mode == "logits":
        sparse = [(g, m) for g, m in zip(generations, members, strict=True) if not m.format.full_logits]
        if sparse:
            g, m = sparse[0]
            raise ParamsError(
                f"ensemble = 'logits' averages every member's C logits, but member generation {g} ({m.path}) is a "
                f"{m.format.name} store; use ensemble: probs, or export it with export.layout: dense"
            )


def _aug_array(m: CachedTargets) -> np.ndarray:
    name = f"{m.split}_{AUG_ARRAY}"
    table = m._table(name)  # noqa: SLF001  (the reader's loaded, hashed array, when it fits its budget)
    return table.values if table is not None else np.asarray(m.check().array(name)[:])


def _same_aug(a: CachedTargets, b: CachedTargets) -> bool:
    if not has_aug(a.attrs, a.split):
        return not has_aug(b.attrs, b.split)
    return bool(np.array_equal(_aug_array(a), _aug_array(b)))


class EnsembleTargets:
    """The ensemble teacher of one split: `members` (each a `CachedTargets` of one generation's store, in
    the order params lists them) read by the same dataset rows and views and combined by `combine`."""

    def __init__(self, members: Sequence[CachedTargets], mode: str = "probs", generations: Sequence[int] = ()) -> None:
        if not members:
            raise ValueError("an ensemble teacher needs at least one member store")
        self.members = list(members)
        self.mode = mode
        self.generations = list(generations) or list(range(len(members)))
        self.split = self.members[0].split
        self.view = self.members[0].view
        check_members(self.members, mode, self.generations)

    @property
    def path(self) -> Path:
        """The first member's store (messages about views and temperatures name it; the members agree)."""
        return self.members[0].path

    @property
    def attrs(self) -> dict[str, Any]:
        """The first member's attributes: rows, classes and views are the same for every member."""
        return self.members[0].attrs

    @property
    def format(self) -> StoreFormat:
        return self.members[0].format

    @property
    def checkpoint_sha256(self) -> list[str]:
        """The sha256 of every member's checkpoint, in member order (the student's provenance)."""
        return [m.attrs["checkpoint_sha256"] for m in self.members]

    def check(self) -> LogitStore:
        for m in self.members:
            m.check()
        return self.members[0].check()

    @property
    def streaming(self) -> bool:
        return any(m.streaming for m in self.members)

    @property
    def chunk_rows(self) -> int:
        return self.members[0].chunk_rows

    def schedule(self, chunks: list[int]) -> None:
        for m in self.members:
            m.schedule(chunks)

    def close(self) -> None:
        for m in self.members:
            m.close()

    def __len__(self) -> int:
        return len(self.members[0])

    def teacher(
        self,
        index: torch.Tensor | np.ndarray,
        *,
        views: torch.Tensor | np.ndarray | None = None,
        temperature: float = 1.0,
    ) -> Teacher:
        """The ensemble target of rows `index` (at `views`): see `combine`."""
        parts = [m.teacher(index, views=views, temperature=temperature) for m in self.members]
        return combine(parts, self.mode, temperature)

    def target(
        self,
        index: torch.Tensor | np.ndarray,
        *,
        views: torch.Tensor | np.ndarray | None = None,
        temperature: float = 1.0,
    ) -> Probs:
        """The ensemble's distribution p_T (B, C) of rows `index`, for either mode."""
        return Probs(soften(self.teacher(index, views=views, temperature=temperature), temperature))

    def aug(self, index: torch.Tensor | np.ndarray, views: torch.Tensor | np.ndarray | None = None) -> AugParams:
        """The crop/flip of each row's view (the same in every member: `check_members`)."""
        return self.members[0].aug(index, views)


Targets = CachedTargets | EnsembleTargets  # what a student learns from: one store, or an ensemble of stores


def members_of(targets: Targets) -> list[CachedTargets]:
    """The stores a student's targets read: one, or every member of an ensemble."""
    return targets.members if isinstance(targets, EnsembleTargets) else [targets]
