"""The optimizers and learning-rate schedules by name: one builder for each name params allows.

params sits below train and validates `train.optimizer` / `train.schedule` against its OPTIMIZERS and
SCHEDULES tuples; the builders here are keyed by exactly those names (tests/test_registry.py checks that
the two agree), and a name with no builder is refused with the known ones instead of falling through to
some default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch
from torch import nn

from pipeline.core.errors import ParamsError
from pipeline.params import TrainParams
from pipeline.train.schedules import warmup_scheduler

Optimizer = torch.optim.Optimizer
Scheduler = torch.optim.lr_scheduler.LRScheduler
B = TypeVar("B")

OPTIMIZER_BUILDERS: dict[str, Callable[[Iterator[nn.Parameter], TrainParams], Optimizer]] = {
    "sgd": lambda params, p: torch.optim.SGD(
        params, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov, weight_decay=p.weight_decay
    ),
    "adam": lambda params, p: torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay),
    "adamw": lambda params, p: torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay),
}

# Per-epoch schedules: cosine to 0, constant, step (x0.2 at 50% and 75% of the epochs), one-cycle
# (`pipeline.train.schedules.warmup_scheduler`, which also serves any schedule with warmup_epochs > 0).
SCHEDULE_BUILDERS: dict[str, Callable[[Optimizer, TrainParams], Scheduler]] = {
    "cosine": lambda opt, p: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs),
    "constant": lambda opt, p: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    "step": lambda opt, p: torch.optim.lr_scheduler.MultiStepLR(opt, [p.epochs // 2, (3 * p.epochs) // 4], gamma=0.2),
    "onecycle": warmup_scheduler,
}


def builder(builders: Mapping[str, B], where: str, name: str) -> B:
    """The builder of `name`; an unknown name is refused with the known ones (params' wording)."""
    if name not in builders:
        raise ParamsError(f"{where} = {name!r}: allowed values are {', '.join(builders)}")
    return builders[name]


def make_optimizer(model: nn.Module, p: TrainParams) -> Optimizer:
    """The optimizer `p.optimizer` over the model's parameters, with the recipe's lr and weight decay."""
    return builder(OPTIMIZER_BUILDERS, "train.optimizer", p.optimizer)(model.parameters(), p)


def make_scheduler(opt: Optimizer, p: TrainParams) -> Scheduler:
    """Per-epoch schedule `p.schedule`; with warmup_epochs, `warmup_scheduler` (warmup, then the schedule).
    Without warmup, cosine, step and constant stay torch's own schedulers (bit-identical to earlier runs)."""
    build = builder(SCHEDULE_BUILDERS, "train.schedule", p.schedule)
    if p.warmup_epochs > 0:
        return warmup_scheduler(opt, p)
    return build(opt, p)
