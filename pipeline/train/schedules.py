"""Learning-rate schedules with warmup, and one-cycle: per-epoch multipliers of train.lr.

`make_scheduler` in pipeline.train.optim keeps torch's own schedulers for cosine, step and constant without
warmup (bit-identical to earlier runs); with `warmup_epochs` > 0 or `schedule: onecycle` it uses
`lr_factor` below through a LambdaLR. Epoch e (0-based: the e-th call of sched.step() has happened)
trains at lr * lr_factor(e).
"""

from __future__ import annotations

import math

import torch

from pipeline.params import TrainParams

ONECYCLE_START = 1.0 / 25.0  # one-cycle starts at lr / 25 (torch's OneCycleLR div_factor)
ONECYCLE_RISE = 0.3  # of the epochs, when warmup_epochs is 0 (torch's pct_start)


def _after_warmup(schedule: str, e: int, epochs: int) -> float:
    """Multiplier `e` epochs into the `epochs` that follow the warmup."""
    if schedule in ("cosine", "onecycle"):
        return 0.5 * (1.0 + math.cos(math.pi * e / max(epochs, 1)))
    if schedule == "step":
        return 0.2 ** sum(e >= m for m in (epochs // 2, (3 * epochs) // 4))
    return 1.0


def lr_factor(p: TrainParams, e: int) -> float:
    """Linear warmup over the first w epochs (from lr / w, or lr / 25 for one-cycle, up to lr), then
    `p.schedule` over the remaining epochs: cosine to 0, step (x0.2 at 50% and 75%) or constant.
    One-cycle is warmup then cosine, with w = warmup_epochs or 30% of the epochs."""
    w = p.warmup_epochs
    if p.schedule == "onecycle" and w == 0:
        w = max(1, round(ONECYCLE_RISE * p.epochs))
    if e < w:
        if p.schedule == "onecycle":
            return ONECYCLE_START + (1.0 - ONECYCLE_START) * e / w
        return (e + 1) / w
    return _after_warmup(p.schedule, e - w, p.epochs - w)


def warmup_scheduler(opt: torch.optim.Optimizer, p: TrainParams) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR following `lr_factor` (stepped once per epoch, as every bancache schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(p, e))
