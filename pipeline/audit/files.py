"""The files `bancache inspect` writes: JSON metrics (`dvc metrics`), CSV tables (`dvc plots`), PNG figures
and a one-page markdown summary that links them.

Figures are drawn on matplotlib's Agg canvas with the object API (no pyplot, no global state) and written
atomically like every other output.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.audit.fitness import Fitness, fitness_warnings
from pipeline.audit.statistics import VIEW, Agreement, Calibration, TargetStats
from pipeline.cache.store import taught_by
from pipeline.core.files import atomic_path, write_json, write_text
from pipeline.core.machine import with_machine
from pipeline.losses import label_free_losses
from pipeline.params import InspectParams

SUMMARY_NOISY_ROWS = 10  # likely-noisy samples shown in summary.md (noisy.csv lists up to max_listed)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([[f"{v:.6g}" if isinstance(v, float) else v for v in r] for r in rows])
    write_text(path, buf.getvalue())


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _hist_rows(edges: np.ndarray, counts: np.ndarray) -> list[list[Any]]:
    return [
        [float(edges[i]), float(edges[i + 1]), float((edges[i] + edges[i + 1]) / 2), int(counts[i])]
        for i in range(len(counts))
    ]


# -- one store -----------------------------------------------------------------------------------------
# Settings and counts kept in the summary but not in metrics.json, so `dvc metrics show` lists metrics only.
NOT_METRICS = (
    "generation",
    "against",
    "temperature",
    "view",
    "rows",
    "ece_bins",
    "noise_confidence",
    "entropy_uniform",
)


def metrics_only(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` without the keys in NOT_METRICS, at any depth."""
    return {k: metrics_only(v) if isinstance(v, dict) else v for k, v in metrics.items() if k not in NOT_METRICS}


def write_metrics(out: Path, statistics: dict[str, Any], headline: dict[str, Any]) -> None:
    """statistics.json (every statistic, nested by split) and metrics.json (the headline numbers under the
    names every metrics file of the chain shares, flat, for `dvc metrics show`; README "DVC tables")."""
    write_json(out / "statistics.json", with_machine(metrics_only(statistics)))
    write_json(out / "metrics.json", with_machine(headline))


def store_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """A store audit's headline: test_acc, val_acc, ece, noisy (likely-noisy train rows) and, as a teacher,
    fit_acc and entropy (accuracy and mean entropy of p_T on its fit rows)."""
    tr, te = metrics["train"], metrics["test"]
    head = {"test_acc": te["accuracy"], "val_acc": tr["accuracy_val"], "ece": te["ece"], "noisy": tr["likely_noisy"]}
    if "fitness" in metrics:
        head |= {"fit_acc": metrics["fitness"]["fit_accuracy"], "entropy": metrics["fitness"]["entropy_mean"]}
    return {k: v for k, v in head.items() if v is not None}


def write_store_audit(
    out: Path,
    gen: int,
    attrs: dict[str, Any],
    class_names: list[str],
    stats: TargetStats,
    calib: Calibration,
    params: InspectParams,
    fitness: Fitness | None = None,
) -> dict[str, Any]:
    """Write metrics.json, the CSVs, figures/*.png and summary.md of one store into `out`; returns metrics.
    `fitness` (the store as a teacher) joins metrics.json and ends summary.md, each file written once."""
    metrics = _finite(
        {
            "generation": gen,
            "temperature": params.temperature,
            "view": VIEW,
            "train": {**stats.metrics(), "noise_confidence": params.noise_confidence},
            "test": calib.metrics(),
        }
    )
    summary_metrics = metrics
    if fitness is not None:
        metrics = {**metrics, "fitness": fitness.as_dict()}
    write_metrics(out, metrics, store_headline(metrics))
    sim, noisy = _write_audit_csvs(out, class_names, stats, calib)
    _write_audit_figures(out / "figures", f"generation {gen}, T = {params.temperature:g}", class_names, stats, calib)
    summary = _store_summary(gen, attrs, summary_metrics, sim, class_names, noisy, params)
    if fitness is not None:
        summary += _fitness_section(fitness, params.temperature)
    write_text(out / "summary.md", summary)
    return metrics


def _fitness_section(f: Fitness, t: float) -> str:
    """summary.md's teacher-fitness section: judged for a label-free (ban) student, the strictest reader."""
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
    return "\n".join(lines) + "\n"


def _write_audit_csvs(
    out: Path, class_names: list[str], stats: TargetStats, calib: Calibration
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The audit's CSVs; returns the similarity matrix and the listed likely-noisy rows."""
    _write_csv(
        out / "entropy.csv",
        ["bin_lo", "bin_hi", "entropy", "count"],
        _hist_rows(stats.entropy_edges, stats.entropy_hist),
    )
    _write_csv(
        out / "max_prob.csv",
        ["bin_lo", "bin_hi", "max_prob", "count"],
        _hist_rows(stats.max_prob_edges, stats.max_prob_hist),
    )
    rel = calib.reliability()
    _write_csv(out / "reliability.csv", list(rel[0]) if rel else ["bin_lo"], [list(r.values()) for r in rel])
    sim = stats.similarity()
    _write_csv(
        out / "similarity.csv",
        ["class", *class_names],
        [[name, *map(float, sim[i])] for i, name in enumerate(class_names)],
    )
    noisy = stats.noisy_rows(class_names)
    _write_csv(out / "noisy.csv", list(noisy[0]) if noisy else ["index"], [list(r.values()) for r in noisy])
    return sim, noisy


def _write_audit_figures(
    figs: Path, title: str, class_names: list[str], stats: TargetStats, calib: Calibration
) -> None:
    sim = stats.similarity()
    _histogram(
        stats.entropy_edges,
        stats.entropy_hist,
        figs / "entropy.png",
        "entropy of p_T (nats)",
        f"Entropy of the cached targets (train, {title})",
        stats.metrics()["entropy_mean"],
        (float(np.log(stats.num_classes)), f"uniform: log C = {np.log(stats.num_classes):.2f}"),
    )
    _histogram(
        stats.max_prob_edges,
        stats.max_prob_hist,
        figs / "max_prob.png",
        "teacher max probability max_c p_T,c (CWTM weight before batch normalisation)",
        f"Max probability of the cached targets (train, {title})",
        stats.metrics()["max_prob_mean"],
        (1.0 / stats.num_classes, f"uniform: 1/C = {1 / stats.num_classes:.2f}"),
    )
    _similarity(sim, class_names, figs / "similarity.png", f"Class similarity from dark knowledge\n(train, {title})")
    _reliability(calib, figs / "reliability.png", f"Reliability (test, {title})")


def _histogram(
    edges: np.ndarray, counts: np.ndarray, path: Path, xlabel: str, title: str, mean: float, ref: tuple[float, str]
) -> None:
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    ax.stairs(counts, edges, fill=True, alpha=0.8, label="samples per bin")
    ax.axvline(mean, color="C3", linestyle="--", label=f"mean = {mean:.3f}")
    ax.axvline(ref[0], color="0.4", linestyle=":", label=ref[1])
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(0, max(int(counts.max()), 1) * 4)  # headroom above the tallest bar for the legend
    ax.set_xlabel(xlabel)
    ax.set_ylabel("train samples (log scale)")
    ax.set_title(title)
    ax.legend(loc="upper center")
    _save(fig, path)


def _similarity(sim: np.ndarray, names: list[str], path: Path, title: str) -> None:
    c = len(names)
    shown = np.ma.masked_invalid(np.where(np.eye(c, dtype=bool), np.nan, sim))
    side = min(12.0, max(4.2, 0.45 * c + 1.5))  # inches; past ~25 classes the cells shrink instead
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="0.85")  # the masked diagonal is grey
    im = ax.imshow(shown, cmap=cmap, vmin=0.0)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("mean probability of the other class\n(target removed, renormalised)")
    ticks = range(0, c, math.ceil(c / 40))  # at most 40 labelled classes per axis
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90 if max(map(len, names)) > 3 or c > 20 else 0)
    ax.set_yticks(ticks, [names[i] for i in ticks])
    ax.set_xlabel("other class")
    ax.set_ylabel("true class (samples of this class)")
    ax.set_title(title)
    if c <= 20:
        top = float(shown.max()) if shown.count() else 1.0
        for i in range(c):
            for j in range(c):
                if i != j and np.isfinite(sim[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{sim[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if sim[i, j] > 0.6 * top else "white",
                    )
    _save(fig, path)


def _reliability(calib: Calibration, path: Path, title: str) -> None:
    m = calib.metrics()
    edges = np.linspace(0.0, 1.0, calib.bins + 1)
    fig = Figure(figsize=(5.2, 6.0))
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        acc, conf = calib.correct / calib.counts, calib.conf_sum / calib.counts
    full = calib.counts > 0
    ax.bar(edges[:-1][full], acc[full], width=1 / calib.bins, align="edge", edgecolor="k", label="accuracy")
    ax.bar(
        edges[:-1][full],
        (conf - acc)[full],
        bottom=acc[full],
        width=1 / calib.bins,
        align="edge",
        color="C3",
        alpha=0.35,
        edgecolor="C3",
        hatch="//",
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"{title}\nECE = {m['ece']:.4f} ({calib.bins} bins), accuracy = {m['accuracy']:.4f}")
    ax.legend(loc="upper left")
    ax_n.stairs(calib.counts, edges, fill=True, color="0.5")
    ax_n.set_yscale("symlog", linthresh=1)
    ax_n.set_ylim(bottom=0)
    ax_n.set_xlabel("confidence (max probability)")
    ax_n.set_ylabel("test samples")
    _save(fig, path)


def _store_summary(
    gen: int,
    attrs: dict[str, Any],
    m: dict[str, Any],
    sim: np.ndarray,
    names: list[str],
    noisy: list[dict[str, Any]],
    params: InspectParams,
) -> str:
    tr, te = m["train"], m["test"]
    lines = [
        f"# Generation {gen}: what cache/gen-{gen} teaches",
        "",
        f"Store: arch `{attrs.get('arch')}`, loss `{attrs.get('loss')}`, learned from {taught_by(attrs)}, "
        f"seed {attrs.get('seed')}, {attrs.get('dtype')}; {tr['rows']} train and {te['rows']} test rows. "
        f"Statistics at temperature T = {params.temperature:g} (p_T = softmax(z / T)), view {VIEW}.",
        "",
        "| statistic | value |",
        "|---|---|",
        f"| train accuracy of the stored logits | {100 * tr['accuracy']:.2f}% (fitted rows {_pct(tr['accuracy_fit'])}, "
        f"validation rows {_pct(tr['accuracy_val'])}) |",
        f"| test accuracy | {100 * te['accuracy']:.2f}% |",
        f"| mean entropy, nats (uniform = log C = {tr['entropy_uniform']:.3f}) | "
        f"{tr['entropy_mean']:.4f} +- {tr['entropy_std']:.4f} |",
        f"| mean max probability (CWTM weight numerator) | {tr['max_prob_mean']:.4f} +- {tr['max_prob_std']:.4f} |",
        f"| CWTM weight spread (std / mean of max probability) | {tr['cwtm_weight_cv']:.4f} |",
        f"| mean dark knowledge mass, 1 - max p | {tr['dark_mass_mean']:.4f} |",
        f"| test ECE ({te['ece_bins']} bins) | {_fmt(te['ece'])} |",
        f"| likely label noise: wrong with max p >= {params.noise_confidence:g} | "
        f"{tr['likely_noisy']} ({100 * tr['likely_noisy_fraction']:.2f}%; {tr['likely_noisy_in_val']} on validation "
        "rows, which the teacher never fitted) |",
        "",
        "![entropy](figures/entropy.png) ![max probability](figures/max_prob.png)",
        "",
        "## Class similarity",
        "",
        "Row c: mean over train samples of class c of the teacher distribution with the target entry removed "
        "and renormalised ([similarity.csv](similarity.csv)).",
        "",
        "![similarity](figures/similarity.png)",
        "",
        "Closest other class: " + ", ".join(_closest(sim, names)) + ".",
        "",
        "## Calibration (test)",
        "",
        "![reliability](figures/reliability.png)",
        "",
        _noisy_heading(tr["likely_noisy"], min(len(noisy), SUMMARY_NOISY_ROWS), len(noisy)),
        "",
    ]
    lines += _noisy_table(noisy)
    lines += [
        "",
        "Data: [statistics.json](statistics.json) (every statistic; the headline in [metrics.json](metrics.json)), "
        "[entropy.csv](entropy.csv), [max_prob.csv](max_prob.csv), [reliability.csv](reliability.csv).",
    ]
    return "\n".join(lines) + "\n"


def _noisy_heading(found: int, shown: int, listed: int) -> str:
    """The likely-noise heading, saying what the table below (`shown` rows) and noisy.csv (`listed` rows, at
    most `inspect.max_listed`) hold of the `found` samples, most confident first in both."""
    if not found:
        return "## Likely label noise: none found"

    def part(n: int) -> str:
        return f"all {n}" if n == found else f"the {n} most confident"

    return f"## Likely label noise: {found} samples ({part(shown)} here, {part(listed)} in [noisy.csv](noisy.csv))"


def _noisy_table(noisy: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of the first likely-noisy samples, or "None."."""
    if not noisy:
        return ["None."]
    rows = [
        "| train index | label | teacher says | confidence | p(label) | validation row |",
        "|---|---|---|---|---|---|",
    ]
    return rows + [
        f"| {r['index']} | {r['label_name']} | {r['predicted_name']} | {r['confidence']:.4f} | "
        f"{r['label_prob']:.2e} | {'yes' if r['validation_row'] else 'no'} |"
        for r in noisy[:SUMMARY_NOISY_ROWS]
    ]


def _closest(sim: np.ndarray, names: list[str]) -> list[str]:
    out = []
    for i, name in enumerate(names):
        row = np.where(np.arange(len(names)) == i, -np.inf, np.nan_to_num(sim[i], nan=-np.inf))
        if np.isfinite(row.max()):
            j = int(row.argmax())
            out.append(f"{name} -> {names[j]} ({row[j]:.2f})")
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


# -- two stores and the chain --------------------------------------------------------------------------
def write_comparison(
    out: Path,
    gen: int,
    against: int | str,
    class_names: list[str],
    pair: dict[str, Agreement],
    chain: list[dict[str, Any]] | None,
    params: InspectParams,
) -> dict[str, Any]:
    """Write metrics.json, per_class.csv, chain.csv (if given), figures and summary.md of K vs J."""
    metrics = _finite(
        {
            "generation": gen,
            "against": against,
            "temperature": params.temperature,
            "view": VIEW,
            **{split: acc.metrics() for split, acc in pair.items()},
        }
    )
    test = metrics.get("test", {})  # the headline: the test split's agreement and KL
    write_metrics(out, metrics, {k: test[v] for k, v in (("agreement", "agreement"), ("kl", "kl_mean")) if v in test})
    per = {split: acc.per_class() for split, acc in pair.items()}
    rows = [[i, name, *(float(per[s][k][i]) for s in pair for k in (0, 1))] for i, name in enumerate(class_names)]
    header = ["class", "name", *(f"{k}_{s}" for s in pair for k in ("kl", "agreement"))]
    _write_csv(out / "per_class.csv", header, rows)
    figs = out / "figures"
    title = f"generation {gen} vs {against}, T = {params.temperature:g}"
    _per_class(per, class_names, figs / "per_class.png", title, gen, against)
    if chain:
        _write_csv(out / "chain.csv", list(chain[0]), [list(r.values()) for r in chain])
        _chain(chain, figs / "chain.png", params.temperature)
    write_text(out / "summary.md", _pair_summary(gen, against, metrics, chain))
    return metrics


def _per_class(
    per: dict[str, tuple[np.ndarray, np.ndarray]],
    names: list[str],
    path: Path,
    title: str,
    gen: int,
    against: int | str,
) -> None:
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6.4, 0.5 * len(names) + 2), 5.6))
    ax_kl, ax_ag = fig.subplots(2, 1, sharex=True)
    w = 0.8 / len(per)
    for i, (split, (kl, agree)) in enumerate(per.items()):
        ax_kl.bar(x + (i - (len(per) - 1) / 2) * w, kl, width=w, label=split)
        ax_ag.bar(x + (i - (len(per) - 1) / 2) * w, agree, width=w, label=split)
    ax_kl.set_ylabel(f"mean KL(p_{against} || p_{gen}), nats")
    ax_kl.set_title(f"Per-class divergence and top-1 agreement ({title})")
    ax_kl.legend()
    lows = [float(np.nanmin(a)) for _, a in per.values() if np.isfinite(a).any()]
    ax_ag.set_ylim(max(0.0, min(lows, default=0.0) - 0.05), 1.0)
    ax_ag.set_ylabel("top-1 agreement")
    ax_ag.set_xticks(x, names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax_ag.set_xlabel("class (true label)")
    _save(fig, path)


def _chain(chain: list[dict[str, Any]], path: Path, temperature: float) -> None:
    labels = [f"{r['against']} -> {r['generation']}" for r in chain]
    x = np.arange(len(chain))
    fig = Figure(figsize=(9.0, 3.8))
    ax_kl, ax_ag = fig.subplots(1, 2)
    for split, style in (("train", "o-"), ("test", "s--")):
        ax_kl.plot(x, [r[f"kl_{split}"] for r in chain], style, label=split)
        ax_ag.plot(x, [r[f"agreement_{split}"] for r in chain], style, label=split)
    for ax, ylabel in ((ax_kl, "mean KL(p_ref || p_gen), nats"), (ax_ag, "top-1 agreement")):
        ax.set_xticks(x, labels)
        ax.set_xmargin(0.15)
        ax.set_xlabel("consecutive generations (ref -> gen)")
        ax.set_ylabel(ylabel)
        ax.legend(title="split", fontsize=8)
        ax.grid(alpha=0.3)
    ax_kl.set_ylim(bottom=0)
    fig.suptitle(f"Divergence and agreement along the chain (T = {temperature:g})")
    _save(fig, path)


def _pair_summary(gen: int, against: int | str, m: dict[str, Any], chain: list[dict[str, Any]] | None) -> str:
    lines = [
        f"# Generation {gen} against {against if isinstance(against, str) else f'generation {against}'}",
        "",
        f"KL(p_{against} || p_{gen}) and top-1 agreement at T = {m['temperature']:g}, view {VIEW} "
        "([statistics.json](statistics.json), per class of the true label in [per_class.csv](per_class.csv)).",
        "",
        "| split | rows | mean KL, nats | top-1 agreement |",
        "|---|---|---|---|",
    ]
    for split in ("train", "test"):
        s = m[split]
        lines.append(f"| {split} | {s['rows']} | {_fmt(s['kl_mean'])} | {100 * s['agreement']:.2f}% |")
    lines += ["", "![per class](figures/per_class.png)", "", "## Along the chain", ""]
    if chain:
        lines += ["| pair | KL train | agreement train | KL test | agreement test |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['against']} -> {r['generation']} | {r['kl_train']:.4f} | {100 * r['agreement_train']:.2f}% "
            f"| {r['kl_test']:.4f} | {100 * r['agreement_test']:.2f}% |"
            for r in chain
        ]
        lines += ["", "![chain](figures/chain.png) ([chain.csv](chain.csv))"]
    else:
        lines.append("Not every store of the chain exists yet: export them all to get the consecutive-pair summary.")
    return "\n".join(lines) + "\n"
