"""Controls: for each student generation k, the same network retrained from labels only.

Control-k trains with loss `ce` and generation k's seed and architecture, through the very same
`train_generation` code path: the seed is set before the model is built and the shuffling generator is
seeded from it, so control-k starts from BAN-k's initial weights and sees BAN-k's batches in the same
order (the tests spy on both). The only difference is the target: labels instead of the teacher's cached
logits. BAN-k minus control-k is then a paired difference whose spread over seeds separates a born-again
gain from seed luck; Ens*k of the controls separates a born-again ensemble gain from plain seed ensembling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipeline.data.prepared import PreparedData
from pipeline.params import GenParams, TrainParams, generation_seed
from pipeline.train.loop import EpochLog, TrainResult, train_generation

log = logging.getLogger(__name__)


def control_params(recipe: TrainParams, gen: int, gp: GenParams) -> GenParams:
    """Generation `gen`'s section turned into its label-only control: same seed and architecture."""
    return GenParams(loss="ce", teacher=None, seed=generation_seed(recipe, gen, gp), arch=gp.arch)


def train_control(
    data: PreparedData,
    recipe: TrainParams,
    gen: int,
    gp: GenParams,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> TrainResult:
    """Train control-`gen`: generation `gen`'s seed, initial weights and batch order, labels only
    (`on_epoch` as in `train_generation`: progress)."""
    log.info("control %d: labels only, seed %s", gen, control_params(recipe, gen, gp).seed)
    return train_generation(data, recipe, gen, control_params(recipe, gen, gp), None, on_epoch=on_epoch)
