"""What each epoch of training sees: the fit rows' order, their fresh crops and flips, their stored views.

Both input paths (`pipeline.train.resident.ResidentInput` on the device, and the streaming DataLoader of
`pipeline.train.inputs`) take these from the functions below, so they agree because they share this code,
not because one imitates the other or torch's samplers:

- the order (`epoch_order`): bancache's own definition, drawn from the run's shuffling generator. The
  streaming loader gets it through `EpochOrderSampler` (and a generator of its own for its workers' seeds,
  so the loader draws nothing from the shuffling generator or from torch's global RNG);
- fresh crops and flips (`epoch_aug`): the whole epoch's `(top, left, flip)` drawn before it starts, batch
  by batch from the augmentation generator, then applied per batch (`batch_aug`), padding `augment.PAD`;
- the stored view of each row under a view policy (`ViewPolicy`, `pick_views`): a function of (seed, epoch,
  row) only, whatever the batch, the process or the path.

Under torchrun (DistributedSampler) and for a store streamed by chunk (`pipeline.cache.stream`'s
BlockShuffleSampler) the order is the sampler's own (neither has a resident twin); crops and flips still
come from `epoch_aug`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from pipeline.data.augment import PAD, AugParams, draw_params
from pipeline.data.seeds import mix64_array


@dataclass(frozen=True)
class ViewPolicy:
    """Which stored view of a multi-view store each row trains on (`GenParams.view_policy`):
    cycle gives every row view epoch % V, random view mix64(seed, epoch, row) % V."""

    policy: str
    num_views: int
    seed: int


def pick_views(policy: ViewPolicy, epoch: int, rows: np.ndarray) -> np.ndarray:
    """The stored view (int64) each dataset row in `rows` trains on in `epoch`: the same for a row and
    epoch whatever the batch, so a resumed run replays the same views."""
    if policy.policy == "cycle":
        return np.full(len(rows), epoch % policy.num_views, dtype=np.int64)
    return (mix64_array(policy.seed, epoch, rows) % np.uint64(policy.num_views)).astype(np.int64)


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """Positions 0..n-1 in the order one epoch visits them (int64), drawn from the shuffling `generator`.

    This draw sequence is bancache's definition of an epoch's order: one int64 (discarded), `randperm(n)`
    (the order), a second `randperm(n)` (discarded). The discarded draws stay because the committed results
    were trained with them (the first implementation's DataLoader drew a worker seed and an end-of-epoch
    permutation there): dropping them would move every later epoch's order. Every path takes its order from
    here (or from its own seeded sampler), never from a torch sampler's internals."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    return order


class EpochOrderSampler(Sampler[int]):
    """The streaming loader's sampler: each iteration is one epoch's `epoch_order` of the loader's n items,
    drawn from the same shuffling generator the resident path draws from. Used with
    DataLoader(shuffle=False, sampler=...) and a loader generator of its own, which only seeds workers."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.generator).tolist())


def epoch_aug(n: int, batch_size: int, generator: torch.Generator, size: int) -> torch.Tensor:
    """(n, 3) int64 (top, left, flip) of an epoch of n images in batches of `batch_size` (the last one
    shorter), drawn with `draw_params` batch by batch in batch order, padding `PAD`."""
    parts = [draw_params(min(batch_size, n - s), generator, PAD, size) for s in range(0, n, batch_size)]
    if not parts:
        return torch.zeros((0, 3), dtype=torch.int64)
    columns = [torch.cat([p.top for p in parts]), torch.cat([p.left for p in parts])]
    return torch.stack([*columns, torch.cat([p.flip for p in parts]).long()], dim=1)


def batch_aug(aug: torch.Tensor, size: int) -> AugParams:
    """The `AugParams` of rows of an `epoch_aug` table (a batch's slice of it), on the table's device."""
    return AugParams(aug[:, 0], aug[:, 1], aug[:, 2].bool(), PAD, size)


@dataclass(frozen=True)
class LiveAugment:
    """Fresh crops and flips of training images of side `size`: `epoch_aug` tables drawn from `generator`
    (a generator of their own, so the shuffle and the crops are independent streams)."""

    generator: torch.Generator
    size: int
