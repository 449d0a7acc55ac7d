"""Teacher fitness: is a teacher's cache worth learning from without labels?

Two numbers, both from the cached train logits on the teacher's own fit rows (train minus validation):
its accuracy there, and the mean entropy of p_T = softmax(z / T) at the student's temperature, in nats.
A label-free student (`ban`, `dkpp`) copies the teacher's argmax: a teacher below 99% on the rows it was
fit to hands its errors on as targets. A teacher whose p_T is one-hot (entropy near 0) carries no dark
knowledge: its student is a label-trained network with the teacher's mistakes, and any gain over the
teacher is seed luck (compare with the controls, `pipeline.train.controls`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.members import Targets
from pipeline.cache.reader import DEFAULT_MAX_MEMORY_BYTES, CachedTargets
from pipeline.cache.store import LogitStore
from pipeline.data.prepared import PreparedData
from pipeline.losses import loss_spec

log = logging.getLogger(__name__)

MIN_FIT_ACCURACY = 0.99
MIN_ENTROPY = 0.05  # nats; a softmax with max prob 0.995 over 10 classes has about 0.04


@dataclass(frozen=True)
class Fitness:
    """The teacher's accuracy on its fit rows (0..1) and mean entropy of p_T there (nats)."""

    fit_accuracy: float
    entropy_mean: float
    temperature: float
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def teacher_fitness(
    targets: Targets, labels: np.ndarray, fit_index: np.ndarray, temperature: float, batch: int = 4096
) -> Fitness:
    """Fitness from `targets` (the teacher's train split, view 0) on rows `fit_index` with train `labels`."""
    correct, entropy = 0, 0.0
    for start in range(0, len(fit_index), batch):
        idx = np.asarray(fit_index[start : start + batch], dtype=np.int64)
        p = targets.target(torch.from_numpy(idx), views=None, temperature=temperature).p
        correct += int((p.argmax(-1).numpy() == labels[idx]).sum())
        logp = torch.log(p.clamp_min(1e-30))
        entropy += float(-(p * logp).sum(-1).sum())
    n = len(fit_index)
    return Fitness(correct / n if n else math.nan, entropy / n if n else math.nan, temperature, n)


def store_fitness(
    store: Path,
    fingerprint: str,
    y_train: np.ndarray,
    fit_index: np.ndarray,
    num_classes: int,
    temperature: float,
    verify: bool = True,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    opened: LogitStore | None = None,
) -> Fitness:
    """`teacher_fitness` of the logit store at `store` (any layout), opened with the caller's `verify` (False:
    a trusted store, not re-hashed) and memory budget, so that --trust-stores and the budget reach it;
    `opened`: the caller's own open of that store, read through instead of opening it again."""
    targets = CachedTargets(
        store,
        "train",
        fingerprint,
        len(y_train),
        num_classes,
        max_memory_bytes=max_memory_bytes,
        verify=verify,
        opened=opened,
    )
    return teacher_fitness(targets, y_train, fit_index, temperature)


@dataclass(frozen=True)
class Flag:
    """One fitness warning: what was measured (`finding`), its consequence in a few words (`gist`, with
    the finding the console's one line) and the full explanation with the fix (`advice`, in the metrics and
    the report). Its recorded text is `finding: advice`; the finding holds no ': ', so `split_warning`
    recovers both parts from the recorded text."""

    finding: str
    gist: str
    advice: str

    @property
    def text(self) -> str:
        return f"{self.finding}: {self.advice}"

    @property
    def short(self) -> str:
        return f"{self.finding}: {self.gist}"


def split_warning(text: str) -> tuple[str, str]:
    """(finding, advice) of a recorded warning `Flag.text`: the report lists a repeated advice once."""
    finding, _, advice = text.partition(": ")
    return finding, advice


def fitness_flags(f: Fitness, loss: str, teacher: int | list[int] | None = None) -> list[Flag]:
    """Why a student with `loss` should not trust this teacher: empty when it fits or the loss uses labels."""
    if not loss_spec(loss).label_free:  # a label term corrects the teacher's errors
        return []
    who = "the teacher" if teacher is None else f"teacher generation {teacher}"
    if isinstance(teacher, list):
        who = f"the ensemble teacher of generations {', '.join(map(str, teacher))}"
    out = []
    if f.fit_accuracy < MIN_FIT_ACCURACY:
        out.append(
            Flag(
                f"{who} is {100 * f.fit_accuracy:.2f}% accurate on its own fit rows (< {100 * MIN_FIT_ACCURACY:.0f}%)",
                f"a {loss!r} student will copy its errors",
                f"a {loss!r} student learns no labels and will copy its errors. Train the teacher longer or to "
                f"convergence (train.schedule, train.epochs), or use a loss with a label term (ban+l, kd)",
            )
        )
    if f.entropy_mean < MIN_ENTROPY:
        out.append(
            Flag(
                f"{who}'s outputs at T = {f.temperature:g} have mean entropy {f.entropy_mean:.4f} nats "
                f"(< {MIN_ENTROPY})",
                f"near one-hot, no dark knowledge for a {loss!r} student",
                f"they are near one-hot and carry no dark knowledge, so a {loss!r} student is a label-trained "
                f"network with the teacher's errors. Raise the student's temperature, regularise the teacher "
                f"(weight decay, augmentation) or compare against controls",
            )
        )
    return out


def fitness_warnings(f: Fitness, loss: str, teacher: int | list[int] | None = None) -> list[str]:
    """The full texts of `fitness_flags`, as the metrics record them."""
    return [flag.text for flag in fitness_flags(f, loss, teacher)]


def check_teacher(
    data: PreparedData, targets: Targets, loss: str, temperature: float, teacher: int | list[int]
) -> dict[str, Any]:
    """Fitness of the teacher store a student is about to learn from, each warning's short form logged at
    WARNING (one line from `bancache train`); returns both, with the warnings' full texts, for the student's
    metrics and the report. `targets` is the student's own reader of the store (train split), so the store
    is opened, budgeted and verified once:
    the arrays this loads (and hashes) are the ones training then reads."""
    f = teacher_fitness(targets, data.y_train, data.fit_index(), temperature)
    flags = fitness_flags(f, loss, teacher)
    for flag in flags:
        log.warning("%s", flag.short)  # one line on the console; the full text goes to the metrics and report
    return {**f.as_dict(), "loss": loss, "warnings": [flag.text for flag in flags]}
