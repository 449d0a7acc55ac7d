"""Stage `inspect` (generation K): params inspect. Audits cache/gen-K into inspect/gen-K/; with `against`
J, compares it with cache/gen-J into inspect/gen-K-vs-J/ (and, when every store of the chain exists, each
consecutive pair of generations, which also reads params students). `convert` exports a store to HDF5 or
npz and reads no params."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.files import metrics_only, write_comparison, write_store_audit
from pipeline.audit.fitness import fitness_warnings, store_fitness
from pipeline.audit.statistics import audit_store, compare_stores, open_checked
from pipeline.cache.convert import convert_store
from pipeline.cache.store import MARKER, LogitStore
from pipeline.core.errors import ParamsError
from pipeline.core.files import write_json, write_text
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import DatasetLabels, open_labels
from pipeline.losses import label_free_losses
from pipeline.params import InspectParams, parse_section, student_keys
from stages.common import ParamsFile
from stages.progress import Progress

log = logging.getLogger(__name__)


def run(
    params: ParamsFile, layout: ProjectPaths, gen: int, against: int | None = None, verify: bool = True
) -> dict[str, Any]:
    """Write the audit (or comparison) of generation `gen`; returns its metrics. `verify` False skips
    re-hashing the stores against their markers (trusted stores)."""
    p = parse_section(InspectParams, "inspect", params.get("inspect"))
    out = layout.inspect(gen, against)
    label = f"inspect gen {gen}" + (f" vs {against}" if against is not None else "")
    with open_labels(layout.dataset) as labels, Progress(label, 2 if against is None else 3, unit="phase") as bar:
        store = open_checked(layout.store(gen), labels, verify)
        if against is None:
            stats, calib = audit_store(store, labels, p)
            bar.update()  # the statistics (reads the store), then the files and figures
            metrics = write_store_audit(out, gen, store.attrs, labels.class_names, stats, calib, p)
            bar.update()
            return add_fitness(out, metrics, layout.store(gen), labels, p.temperature)
        ref = open_checked(layout.store(against), labels, verify)
        pair = compare_stores(store, ref, labels, p.temperature)
        bar.update()
        chain = _chain(params, layout, labels, p.temperature, verify)
        bar.update()
        metrics = write_comparison(out, gen, against, labels.class_names, pair, chain, p)
        bar.update()
        return metrics


def add_fitness(out: Path, metrics: dict[str, Any], store: Path, labels: DatasetLabels, t: float) -> dict[str, Any]:
    """Add the teacher fitness (accuracy on its own fit rows, mean entropy at inspect.temperature, which
    should be the students' temperature) to metrics.json and summary.md."""
    y = np.asarray(labels.train[:])
    fit = np.setdiff1d(np.arange(len(y)), labels.val_index if labels.val_index is not None else [])
    f = store_fitness(store, labels.fingerprint, y, fit, len(labels.class_names), t)
    metrics = {**metrics, "fitness": f.as_dict()}
    write_json(out / "metrics.json", metrics_only(metrics))
    label_free = ", ".join(label_free_losses())
    notes = [f"- {w}" for w in fitness_warnings(f, "ban")] or [f"- fit for a label-free ({label_free}) student"]
    lines = [
        "",
        "## Teacher fitness",
        "",
        f"Accuracy on its own fit rows (train minus validation, {f.rows} rows): {100 * f.fit_accuracy:.2f}%; "
        f"mean entropy of p_T at T = {t:g}: {f.entropy_mean:.4f} nats.",
        "",
        *notes,
    ]
    summary = out / "summary.md"
    write_text(summary, summary.read_text() + "\n".join(lines) + "\n")
    return metrics


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


def convert(layout: ProjectPaths, gen: int, fmt: str, out: str | Path, verify: bool = True) -> Path:
    """Export cache/gen-K to `out` as HDF5 (`h5`) or numpy (`npz`), checked against its marker as it is
    copied unless `verify` is False; `out` without an extension gets `.h5` / `.npz`, one with another
    extension is refused."""
    target = Path(out)
    if target.suffix == "":
        target = target.with_name(f"{target.name}.{fmt}")
    elif target.suffix.lower() not in CONVERT_SUFFIXES[fmt]:
        raise ParamsError(
            f"--out {out}: the extension {target.suffix!r} does not match --format {fmt}; "
            f"use {target.with_suffix('.' + fmt)} or --format {'npz' if fmt == 'h5' else 'h5'}"
        )
    return convert_store(LogitStore.open(layout.store(gen), verify=verify), target, fmt)


CONVERT_SUFFIXES = {"h5": (".h5", ".hdf5"), "npz": (".npz",)}
