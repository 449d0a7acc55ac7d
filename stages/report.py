"""Stage `report`: the BAN-style table from the ensemble metrics and the stores' provenance."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.audit.fitness import split_warning
from pipeline.cache.store import LogitStore, taught_by
from pipeline.core.files import write_text
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import open_labels
from pipeline.results.columns import Ensemble, Generation
from pipeline.results.ensemble import read_ensemble_metrics
from pipeline.results.paired import control_columns, format_paired_table
from pipeline.results.tables import chain_accuracy, chain_columns, format_table


def run(layout: ProjectPaths) -> str:
    metrics = read_ensemble_metrics(layout.ensemble_metrics)
    accuracy = chain_accuracy(metrics, where=str(layout.ensemble_metrics))
    gens = sorted(c.g for c in accuracy if isinstance(c, Generation))
    lines = ["# bancache report", "", format_table([chain_columns(metrics)], _network(layout, gens)), ""]
    lines += ["| generation | arch | loss | learned from | seed | test acc % |", "|---|---|---|---|---|---|"]
    label_trained = []
    for g in gens:
        a = LogitStore.open(layout.store(g)).attrs
        acc = 100 * accuracy[Generation(g)]
        lines.append(f"| {g} | {a['arch']} | {a['loss']} | {taught_by(a)} | {a['seed']} | {acc:.2f} |")
        if g > 0 and a["teacher"] is None:
            label_trained.append(str(g))
    if label_trained:  # the table's BAN-k column of such a generation holds a network trained from labels
        lines += ["", f"Generations {', '.join(label_trained)} train from labels (loss ce, no teacher): their "]
        lines[-1] += "BAN-k columns are label-trained networks (ensemble members), not born-again students."
    lines += [
        "",
        "Ens*k averages the softmax outputs of generations 1..k; '+teacher' rows also average generation 0:",
        "",
    ]
    for column, acc in accuracy.items():
        if isinstance(column, Ensemble):
            lines.append(f"- {column.key} (generations {metrics['members'][column.key]}): {100 * acc:.2f}%")
    lines += controls_section(layout, metrics, gens) + fitness_flags(layout, gens)
    text = "\n".join(lines) + "\n"
    write_text(layout.report, text)
    return text


def headline(layout: ProjectPaths, text: str) -> str:
    """One line for the console (the report itself is in the file): where it is, the teacher, the last
    student and the last Ens*k of its table, and how many teacher-fitness flags it holds."""
    columns = chain_columns(read_ensemble_metrics(layout.ensemble_metrics))
    gens = [c for c in columns if isinstance(c, Generation)]
    ens = [c for c in columns if isinstance(c, Ensemble)]
    picks = [gens[0]] + gens[1:][-1:] + ens[-1:]
    numbers = ", ".join(f"{c.label} {100 * columns[c]:.2f}" for c in picks)
    _, _, flagged = text.partition("## Teacher fitness flags")
    flags = sum(line.startswith("- **generation") for line in flagged.splitlines())
    return f"wrote {layout.report}: test acc % {numbers}" + (f"; {flags} teacher-fitness flags" if flags else "")


def controls_section(layout: ProjectPaths, metrics: dict[str, Any], gens: list[int]) -> list[str]:
    """The paired table of this run (one seed) when controls/gen-K/test_logits.npy exist for its students."""
    logits = {}
    for g in gens[1:]:
        path = layout.control_logits(g)
        if path.exists():
            logits[g] = np.load(path)
    if not logits:
        return []
    with open_labels(layout.dataset) as labels:
        y = np.asarray(labels.test[:])
    run = {**chain_columns(metrics), **control_columns(logits, y)}
    return ["", format_paired_table([run], _network(layout, gens), len(y))]


def fitness_flags(layout: ProjectPaths, gens: list[int]) -> list[str]:
    """The teacher-fitness warnings each student's training recorded (metrics/train/gen-K.json), each
    advice in full once: a chain of near one-hot teachers gets the same advice for every student, and
    repeating it buried the numbers that differ, so later students give their finding and point back."""
    flags, first = [], {}  # advice -> the generation it was given in full for
    for g in gens[1:]:
        path = layout.train_metrics(g)
        fitness = json.loads(path.read_text()).get("teacher") if path.exists() else None
        for w in (fitness or {}).get("warnings", []):
            finding, advice = split_warning(w)
            if advice in first:
                flags.append(f"- **generation {g}**: {finding}; the same advice as for generation {first[advice]}")
            else:
                first[advice] = g
                flags.append(f"- **generation {g}**: {w}")
    return ["", "## Teacher fitness flags", "", *flags] if flags else []


def _network(layout: ProjectPaths, gens: list[int]) -> str:
    archs = [LogitStore.open(layout.store(g)).attrs["arch"] for g in gens]
    return archs[0] if len(set(archs)) == 1 else " -> ".join(archs)
