"""The paired table: teacher, BAN-k, control-k, BAN-k minus control-k (paired mean and 95% t-interval over
seeds), Ens*k and the controls' Ens*k, with the number of seeds and test rows stated.

Each run is one seed's columns (accuracy, 0..1; `pipeline.results.columns`): Teacher, BAN-k, Ens*k
(`pipeline.results.tables.chain_columns`) and Control-k, Control Ens*k (`control_columns` below).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from pipeline.core.stats import Paired, paired
from pipeline.results.columns import Column, Control, ControlEnsemble, Ensemble, Generation
from pipeline.results.ensemble import mean_probs, softmax

DASH = "—"
TEACHER = Generation(0)
K = TypeVar("K")


def ensemble_accuracy(logits: Sequence[np.ndarray], y: np.ndarray) -> float:
    """Accuracy of the argmax of the mean softmax of `logits` (each (N, C)): Ens*k of those models, by the
    chain's own `mean_probs`."""
    mean = mean_probs([softmax(z) for z in logits])
    return float((np.asarray(mean).argmax(-1) == y).mean())


def control_columns(test_logits: Mapping[int, np.ndarray], y: np.ndarray) -> dict[Column, float]:
    """Columns Control-k (accuracy of each control) and Control Ens*k (k >= 2, controls 1..k)."""
    gens = sorted(test_logits)
    cols: dict[Column, float] = {Control(g): float((test_logits[g].argmax(-1) == y).mean()) for g in gens}
    for k in range(2, len(gens) + 1):
        cols[ControlEnsemble(k)] = ensemble_accuracy([test_logits[g] for g in gens[:k]], y)
    return cols


def _spread(vals: Sequence[float]) -> str:
    """Mean (+- sample std over seeds when there are several) of accuracies in %."""
    if not vals:
        return DASH
    pct = [100.0 * v for v in vals]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def format_diff(p: Paired | None) -> str:
    """A paired difference in points: mean [95% t-interval], or the mean alone for one seed."""
    if p is None:
        return DASH
    if p.n == 1 or math.isnan(p.half_width):
        return f"{p.mean:+.2f} (1 seed, no interval)"
    return f"{p.mean:+.2f} [{p.low:+.2f}, {p.high:+.2f}]"


def paired_columns(runs: Sequence[Mapping[K, float]], a: K, b: K) -> Paired | None:
    """Column `a` minus column `b` (accuracies 0..1) in points, paired over the runs that have both (any
    key type: the columns of `pipeline.results.columns`, or a benchmark's own names)."""
    both = [r for r in runs if a in r and b in r]
    if not both:
        return None
    return paired([100.0 * r[a] for r in both], [100.0 * r[b] for r in both])


def student_generations(runs: Sequence[Mapping[Column, float]]) -> list[int]:
    """The student generations (BAN-k, k >= 1) that any of the runs has."""
    return sorted({c.g for r in runs for c in r if isinstance(c, Generation) and c.g >= 1})


@dataclass(frozen=True)
class PairedRow:
    """Generation k's accuracies over seeds (0..1) and its paired differences (percentage points)."""

    k: int
    ban: list[float]
    control: list[float]
    ban_minus_control: Paired | None
    ens: list[float]
    control_ens: list[float]
    ens_minus_control_ens: Paired | None


def paired_rows(runs: Sequence[Mapping[Column, float]]) -> list[PairedRow]:
    """One row per student generation k: the columns' values over seeds and the paired summaries."""
    rows = []
    for k in student_generations(runs):
        ban, ctl, ens, cens = Generation(k), Control(k), Ensemble(k), ControlEnsemble(k)
        rows.append(
            PairedRow(
                k=k,
                ban=[r[ban] for r in runs if ban in r],
                control=[r[ctl] for r in runs if ctl in r],
                ban_minus_control=paired_columns(runs, ban, ctl),
                ens=[r[ens] for r in runs if ens in r],
                control_ens=[r[cens] for r in runs if cens in r],
                ens_minus_control_ens=paired_columns(runs, ens, cens),
            )
        )
    return rows


def format_paired_table(runs: Sequence[Mapping[Column, float]], network: str, num_test: int | None) -> str:
    """Markdown: the paired table for `network` over `runs` (one per seed), with seeds and test rows stated."""
    n = len(runs)
    rows_note = f"{num_test} test rows" if num_test is not None else "test rows unknown"
    lines = [
        f"Paired table, {network}: test accuracy %, mean ± sample std over {n} seed{'s' if n != 1 else ''}, "
        f"{rows_note}. Differences are paired per seed (same seed, initial weights and batch order): "
        "mean [95% t-interval].",
        "",
        "| k | BAN-k | Control-k | BAN-k − Control-k | Ens*k | Control Ens*k | Ens*k − Control Ens*k |",
        "|---|---|---|---|---|---|---|",
        f"| Teacher | {_spread([r[TEACHER] for r in runs if TEACHER in r])} | | | | | |",
    ]
    for row in paired_rows(runs):
        cells = [
            _spread(row.ban),
            _spread(row.control),
            format_diff(row.ban_minus_control),
            _spread(row.ens),
            _spread(row.control_ens),
            format_diff(row.ens_minus_control_ens),
        ]
        lines.append(f"| {row.k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
