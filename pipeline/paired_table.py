"""The paired table: teacher, BAN-k, control-k, BAN-k minus control-k (paired mean and 95% t-interval over
seeds), Ens*k and the controls' Ens*k, with the number of seeds and test rows stated.

Each run is one seed's columns (accuracy, 0..1): Teacher, BAN-k, Ens*k (`pipeline.report.chain_columns`)
and Control-k, Control Ens*k (`pipeline.controls.control_columns`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.controls import CONTROL_ENS_PREFIX, CONTROL_PREFIX
from pipeline.stats import Paired, paired

DASH = "—"


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


def paired_columns(runs: Sequence[Mapping[str, float]], a: str, b: str) -> Paired | None:
    """Column `a` minus column `b` (accuracies 0..1) in points, paired over the runs that have both."""
    both = [r for r in runs if a in r and b in r]
    if not both:
        return None
    return paired([100.0 * r[a] for r in both], [100.0 * r[b] for r in both])


def student_generations(runs: Sequence[Mapping[str, float]]) -> list[int]:
    return sorted({int(c[4:]) for r in runs for c in r if c.startswith("BAN-") and c[4:].isdigit()})


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


def paired_rows(runs: Sequence[Mapping[str, float]]) -> list[PairedRow]:
    """One row per student generation k: the columns' values over seeds and the paired summaries."""
    rows = []
    for k in student_generations(runs):
        ban, ctl, ens, cens = f"BAN-{k}", f"{CONTROL_PREFIX}{k}", f"Ens*{k}", f"{CONTROL_ENS_PREFIX}{k}"
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


def format_paired_table(runs: Sequence[Mapping[str, float]], network: str, num_test: int | None) -> str:
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
        f"| Teacher | {_spread([r['Teacher'] for r in runs if 'Teacher' in r])} | | | | | |",
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
