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
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from pipeline.data import PreparedData
from pipeline.losses import soften
from pipeline.params import GenParams, TrainParams, generation_seed
from pipeline.train import EpochLog, TrainResult, train_generation

log = logging.getLogger(__name__)

CONTROL_PREFIX = "Control-"
CONTROL_ENS_PREFIX = "Control Ens*"


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


def ensemble_accuracy(logits: Sequence[np.ndarray], y: np.ndarray) -> float:
    """Accuracy of the argmax of the mean softmax of `logits` (each (N, C)): Ens*k of those models."""
    probs = [soften(torch.from_numpy(np.asarray(z, dtype=np.float32))).numpy() for z in logits]
    mean = sum(probs) / len(probs)
    return float((np.asarray(mean).argmax(-1) == y).mean())


def control_columns(test_logits: Mapping[int, np.ndarray], y: np.ndarray) -> dict[str, float]:
    """Columns Control-k (accuracy of each control) and Control Ens*k (k >= 2, controls 1..k)."""
    gens = sorted(test_logits)
    cols = {f"{CONTROL_PREFIX}{g}": float((test_logits[g].argmax(-1) == y).mean()) for g in gens}
    for k in range(2, len(gens) + 1):
        cols[f"{CONTROL_ENS_PREFIX}{k}"] = ensemble_accuracy([test_logits[g] for g in gens[:k]], y)
    return cols
