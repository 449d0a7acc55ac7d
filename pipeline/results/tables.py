"""The report: a table in the shape of Table 2 of the BAN paper (test accuracy in %, mean +- std over
seeds when several runs are given)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.results.columns import Column, Ensemble, Generation, parse_columns


def chain_accuracy(ensemble: Mapping[str, Any], where: str = "metrics/ensemble") -> dict[Column, float]:
    """Every accuracy of one run's ensemble metrics (its `accuracy` keys read back into columns), in order."""
    return parse_columns(ensemble["accuracy"], where=where)


def chain_columns(ensemble: Mapping[str, Any]) -> dict[Column, float]:
    """Map one run's ensemble metrics to the table's columns: Teacher, BAN-k, Ens*k (accuracy, 0..1); the
    '+teacher' ensembles are not Table 2 columns."""
    acc = chain_accuracy(ensemble)
    gens = sorted((c for c in acc if isinstance(c, Generation)), key=lambda c: c.g)
    ens = sorted((c for c in acc if isinstance(c, Ensemble) and not c.with_teacher), key=lambda c: c.k)
    table: list[Column] = [*gens, *ens]
    return {c: acc[c] for c in table}


def _order(columns: Iterable[Column]) -> list[Column]:
    """Table 2's order: each column's own sort key (Teacher, the loss columns by name: BAN, BAN+L, CWTM,
    DKD, DKPP, KD, MSE, then BAN-k, Ens*k, the rest)."""

    return sorted(columns, key=lambda column: column.sort_key)


def format_table(runs: Sequence[Mapping[Column, float]], network: str, error: bool = False) -> str:
    """Markdown table, one row for `network`: each column's mean (+- sample std if >1 run), in %."""
    columns = _order({c for r in runs for c in r})
    cells = []
    for c in columns:
        vals = [100.0 * (1.0 - r[c] if error else r[c]) for r in runs if c in r]
        if len(vals) > 1:
            cells.append(f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}")
        else:
            cells.append(f"{vals[0]:.2f}")
    what = "test error" if error else "test accuracy"
    labels = " | ".join(c.label for c in columns)
    head = f"| Network ({what} %, {len(runs)} seed{'s' if len(runs) != 1 else ''}) | " + labels + " |"
    sep = "|---" * (len(columns) + 1) + "|"
    return "\n".join([head, sep, f"| {network} | " + " | ".join(cells) + " |"])
