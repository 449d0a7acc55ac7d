"""The report: a table in the shape of Table 2 of the BAN paper (test accuracy in %, mean +- std over
seeds when several runs are given)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.losses import loss_columns


def chain_columns(ensemble: Mapping[str, Any]) -> dict[str, float]:
    """Map one run's ensemble metrics to the table's columns: Teacher, BAN-k, Ens*k (accuracy, 0..1)."""
    acc = ensemble["accuracy"]
    cols: dict[str, float] = {}
    gens = sorted(int(k[3:]) for k in acc if k.startswith("gen"))
    for g in gens:
        cols["Teacher" if g == 0 else f"BAN-{g}"] = acc[f"gen{g}"]
    for k in sorted(int(n[3:]) for n in acc if n.startswith("ens") and n[3:].isdigit()):
        cols[f"Ens*{k}"] = acc[f"ens{k}"]
    return cols


def _order(columns: Iterable[str]) -> list[str]:
    """Teacher, the loss columns (the registry's, by name: BAN, BAN+L, CWTM, DKPP, KD), BAN-k, Ens*k, the rest."""
    losses = set(loss_columns().values())

    def key(c: str) -> tuple[int, int, str]:
        if c == "Teacher":
            return (0, 0, c)
        if c in losses:
            return (1, 0, c)
        if c.startswith("BAN-"):
            return (2, int(c[4:]), c)
        if c.startswith("Ens*"):
            return (3, int(c[4:]), c)
        return (4, 0, c)

    return sorted(columns, key=key)


def format_table(runs: Sequence[Mapping[str, float]], network: str, error: bool = False) -> str:
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
    head = f"| Network ({what} %, {len(runs)} seed{'s' if len(runs) != 1 else ''}) | " + " | ".join(columns) + " |"
    sep = "|---" * (len(columns) + 1) + "|"
    return "\n".join([head, sep, f"| {network} | " + " | ".join(cells) + " |"])
