"""Stage `report`: the BAN-style table from the ensemble metrics and the stores' provenance."""

from __future__ import annotations

import json

from pipeline.io import write_text
from pipeline.layout import Layout
from pipeline.report import chain_columns, format_table
from pipeline.store import LogitStore


def run(layout: Layout) -> str:
    metrics = json.loads(layout.ensemble_metrics.read_text())
    gens = sorted(int(k[3:]) for k in metrics["accuracy"] if k.startswith("gen"))
    lines = ["# bancache report", "", format_table([chain_columns(metrics)], _network(layout, gens)), ""]
    lines += ["| generation | arch | loss | teacher | seed | test acc % |", "|---|---|---|---|---|---|"]
    for g in gens:
        a = LogitStore.open(layout.store(g)).attrs
        acc = 100 * metrics["accuracy"][f"gen{g}"]
        lines.append(f"| {g} | {a['arch']} | {a['loss']} | {a['teacher']} | {a['seed']} | {acc:.2f} |")
    lines += [
        "",
        "Ens*k averages the softmax outputs of generations 1..k; '+teacher' rows also average generation 0:",
        "",
    ]
    for name, acc in metrics["accuracy"].items():
        if name.startswith("ens"):
            lines.append(f"- {name} (generations {metrics['members'][name]}): {100 * acc:.2f}%")
    text = "\n".join(lines) + "\n"
    write_text(layout.report, text)
    return text


def _network(layout: Layout, gens: list[int]) -> str:
    archs = [LogitStore.open(layout.store(g)).attrs["arch"] for g in gens]
    return archs[0] if len(set(archs)) == 1 else " -> ".join(archs)
