"""Stage `inspect` (generation K): params inspect. Audits cache/gen-K into inspect/gen-K/; with `against`
J, compares it with cache/gen-J into inspect/gen-K-vs-J/ (and, when every store of the chain exists, each
consecutive pair of generations, which also reads params students). Named `audit` so that it does not
shadow the standard library's `inspect`; the command stays `bancache inspect`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.files import write_comparison, write_store_audit
from pipeline.audit.fitness import Fitness, store_fitness
from pipeline.audit.statistics import EnsembleRef, audit_store, compare_stores, open_checked
from pipeline.cache.store import MARKER, LogitStore
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import DatasetLabels, fit_rows, open_labels
from pipeline.params import InspectParams, parse_generation, parse_section, section_of, student_keys
from stages.common import ParamsFile
from stages.progress import Progress

log = logging.getLogger(__name__)


def run(
    params: ParamsFile, layout: ProjectPaths, gen: int, against: int | str | None = None, verify: bool = True
) -> dict[str, Any]:
    """Write the audit (or comparison) of generation `gen`; returns its metrics. `against` "teacher": the
    generation's own teacher from params (an ensemble teacher: the mean of its members; a label-trained
    member: generation 0). `verify` False skips re-hashing the stores against their markers (trusted stores)."""
    p = parse_section(InspectParams, "inspect", params.get("inspect"))
    out = layout.inspect(gen, against)
    label = f"inspect gen {gen}" + (f" vs {against}" if against is not None else "")
    with open_labels(layout.dataset) as labels, Progress(label, 2 if against is None else 3, unit="phase") as bar:
        store = open_checked(layout.store(gen), labels, verify)
        if against is None:
            stats, calib = audit_store(store, labels, p)
            bar.update()  # the statistics (reads the store), then the fitness, files and figures
            fitness = teacher_fitness_of(layout.store(gen), labels, p.temperature, verify, store)
            metrics = write_store_audit(out, gen, store.attrs, labels.class_names, stats, calib, p, fitness)
            bar.update()
            return metrics
        members = [against] if isinstance(against, int) else _teacher_of(params, gen)
        refs = [open_checked(layout.store(g), labels, verify) for g in members]
        ref = refs[0] if len(refs) == 1 else EnsembleRef(refs, p.temperature)
        pair = compare_stores(store, ref, labels, p.temperature)
        bar.update()
        chain = _chain(params, layout, labels, p.temperature, verify)
        bar.update()
        name = members[0] if len(members) == 1 else "ensemble " + "+".join(map(str, members))
        metrics = write_comparison(out, gen, name, labels.class_names, pair, chain, p)
        bar.update()
        return metrics


def _teacher_of(params: ParamsFile, gen: int) -> list[int]:
    """The generations `--against teacher` compares generation `gen` with: its teacher or ensemble members,
    or generation 0 for a generation trained from labels."""
    gp = parse_generation(gen, params.get(section_of(gen)))
    return list(gp.members) or [0]


def teacher_fitness_of(
    store: Path, labels: DatasetLabels, t: float, verify: bool = True, opened: LogitStore | None = None
) -> Fitness:
    """The store's teacher fitness (accuracy on its own fit rows, mean entropy at inspect.temperature, which
    should be the students' temperature); `verify` False (--trust-stores) skips hashing the store; `opened`:
    the audit's own open of it (one open per store per run)."""
    y = np.asarray(labels.train[:])
    fit = fit_rows(y, labels.val_index)  # labelled rows only: a transfer set's unlabelled ones have no accuracy
    return store_fitness(store, labels.fingerprint, y, fit, len(labels.class_names), t, verify=verify, opened=opened)


def _chain(
    params: ParamsFile, layout: ProjectPaths, labels: DatasetLabels, temperature: float, verify: bool = True
) -> list[dict] | None:
    """KL and agreement of every consecutive pair of generations, or None if a store is missing."""
    gens = [0, *student_keys(params.get("students"))]
    missing = [g for g in gens if not (layout.store(g) / MARKER).exists()]
    if missing or len(gens) < 2:
        log.info("chain summary skipped: no complete store for generations %s", missing)
        return None
    rows = []
    for ref, gen in zip(gens, gens[1:], strict=False):
        pair = compare_stores(
            open_checked(layout.store(gen), labels, verify),
            open_checked(layout.store(ref), labels, verify),
            labels,
            temperature,
        )
        row: dict[str, Any] = {"generation": gen, "against": ref}
        for split, acc in pair.items():
            m = acc.metrics()
            row[f"kl_{split}"], row[f"agreement_{split}"] = m["kl_mean"], m["agreement"]
        rows.append(row)
    return rows
