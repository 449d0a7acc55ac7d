"""Audit the dark knowledge a logit store carries, streamed one chunk of rows at a time.

Notation: z = raw logits of one sample (C,), y its label, T the temperature, p = softmax(z / T).
- entropy H(p) = -sum_c p_c log p_c, in nats: log C for a uniform row, 0 for a one-hot row.
- max probability m = max_c p_c: the numerator of the CWTM sample weight m_s / sum_u m_u
  (Furlanello et al. 2018), taken even where the teacher is wrong.
- dark mass 1 - m: the probability outside the argmax, the "dark knowledge" a student can learn from.
- similarity S[c, :] = mean over samples of class c of softmax(z_{-c} / T), the teacher distribution with
  the target entry removed and renormalised (computed on the logits, so it stays exact for one-hot rows);
  S[c, c] = 0.
- ECE = sum_b (n_b / n) |acc_b - conf_b| over equal-width confidence bins [b/B, (b+1)/B), the last bin
  closed (Guo et al. 2017, "On Calibration of Modern Neural Networks").
- KL(p_J || p_K) = sum_c p_J,c (log p_J,c - log p_K,c) of generation K from reference generation J: at
  T = 1 and J = K's teacher, the BAN loss minus the teacher's entropy.

Every statistic is a sum over rows, so the accumulators add up chunk results and hold O(C^2 + bins +
max_listed) numbers, never a split: a 10^6 x 100 store is read in memory of a few chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.store import LogitStore, require_finite
from pipeline.core.labels import UNLABELLED
from pipeline.data.prepared import DatasetLabels, Labels
from pipeline.params import InspectParams

HIST_BINS = 50  # bins of the entropy and max-probability histograms
VIEW = 0  # the view of (N, V, C) stores that is audited: the un-augmented input
NEEDS_FINITE = "the audit needs finite logits"  # what non-finite rows would break (CorruptStoreError)


# -- pure statistics on a block of logits (B, C) -------------------------------------------------------
def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(z / T) in float64, from raw (possibly float16) logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def entropy(logp: np.ndarray) -> np.ndarray:
    """H(p) = -sum_c p_c log p_c per row, in nats."""
    return -(np.exp(logp) * logp).sum(axis=-1)


def max_prob(logp: np.ndarray) -> np.ndarray:
    """max_c p_c per row: the CWTM weight before normalisation over the batch."""
    return np.exp(logp.max(axis=-1))


def dark_mass(logp: np.ndarray) -> np.ndarray:
    """1 - max_c p_c per row: the probability outside the argmax."""
    return 1.0 - max_prob(logp)


def non_target_probs(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(z_{-y} / T) per row: the distribution with the target entry removed and renormalised (0 at y)."""
    z = np.array(logits, dtype=np.float64)
    z[np.arange(len(z)), labels] = -np.inf
    return np.exp(log_softmax(z, temperature))


def kl_divergence(logp_ref: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(p_ref || p) = sum_c p_ref,c (log p_ref,c - log p_c) per row, in nats."""
    return (np.exp(logp_ref) * (logp_ref - logp)).sum(axis=-1)


def expected_calibration_error(counts: np.ndarray, conf_sum: np.ndarray, correct: np.ndarray) -> float:
    """ECE = sum_b (n_b / n) |acc_b - conf_b| from per-bin sample counts, confidence sums and correct counts
    (= sum_b |correct_b - conf_sum_b| / n)."""
    n = counts.sum()
    return float(np.abs(correct - conf_sum).sum() / n) if n else float("nan")


def _bin(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Index of equal-width bin [lo + b w, lo + (b+1) w) of each value; the last bin is closed."""
    idx = np.floor((values - lo) / (hi - lo) * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


# -- streaming accumulators ----------------------------------------------------------------------------
@dataclass
class TargetStats:
    """Train-split statistics of one store (what a student learns from), added up chunk by chunk."""

    num_classes: int
    temperature: float = 1.0
    noise_confidence: float = 0.9
    max_listed: int = 50
    hist_bins: int = HIST_BINS
    n: int = 0
    correct: int = 0
    n_val: int = 0  # rows of the validation split (not fitted by the teacher)
    correct_val: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    noisy_count: int = 0
    n_unlabelled: int = 0  # a transfer set's rows without a label (in `n`, not in any label statistic)

    def __post_init__(self) -> None:
        c, b = self.num_classes, self.hist_bins
        self.entropy_edges = np.linspace(0.0, np.log(c), b + 1)
        self.max_prob_edges = np.linspace(0.0, 1.0, b + 1)
        self.entropy_hist = np.zeros(b, np.int64)
        self.max_prob_hist = np.zeros(b, np.int64)
        self.similarity_sum = np.zeros((c, c))
        self.class_counts = np.zeros(c, np.int64)
        self.sums = dict.fromkeys(("entropy", "entropy_sq", "max_prob", "max_prob_sq", "dark_mass"), 0.0)
        self.noisy: dict[str, np.ndarray] = {}
        self.noisy_val = 0

    def update(self, start: int, logits: np.ndarray, labels: np.ndarray, val: np.ndarray | None = None) -> None:
        """Add rows [start, start + B) with logits (B, C), labels (B,) and `val` (B,), True on the rows of the
        validation split."""
        labels = np.asarray(labels, dtype=np.int64)
        val = np.zeros(len(labels), bool) if val is None else val
        logp = log_softmax(logits, self.temperature)
        h, m, pred = entropy(logp), max_prob(logp), logp.argmax(axis=-1)
        c, b = self.num_classes, self.hist_bins
        known = labels != UNLABELLED  # a transfer set's unlabelled rows count in the label-free statistics only
        self.n += len(labels)
        self.n_unlabelled += int(len(labels) - known.sum())
        self.correct += int((pred == labels).sum())  # an argmax is never -1: unlabelled rows add nothing
        self.n_val += int(val.sum())
        self.correct_val += int((pred == labels)[val].sum())
        for key, v in (("entropy", h), ("entropy_sq", h * h), ("max_prob", m), ("max_prob_sq", m * m)):
            self.sums[key] += float(v.sum())
        self.sums["dark_mass"] += float((1.0 - m).sum())
        self.entropy_hist += np.bincount(_bin(h, 0.0, float(np.log(c)), b), minlength=b)
        self.max_prob_hist += np.bincount(_bin(m, 0.0, 1.0, b), minlength=b)
        lk, yk = (logits, labels) if known.all() else (logits[known], labels[known])
        onehot = np.zeros((len(yk), c))
        onehot[np.arange(len(yk)), yk] = 1.0
        self.similarity_sum += onehot.T @ non_target_probs(lk, yk, self.temperature)
        self.class_counts += np.bincount(yk, minlength=c)
        wrong = (pred != labels) & (m >= self.noise_confidence) & known
        self.noisy_count += int(wrong.sum())
        self.noisy_val += int((wrong & val).sum())
        if self.max_listed and wrong.any():
            rows = np.flatnonzero(wrong)
            found = {
                "index": start + rows,
                "label": labels[rows],
                "predicted": pred[rows],
                "confidence": m[rows],
                "label_prob": np.exp(logp[rows, labels[rows]]),
                "val": val[rows],
            }
            self._keep_most_confident(found)

    def _keep_most_confident(self, found: dict[str, np.ndarray]) -> None:
        merged = {k: np.concatenate([self.noisy[k], v]) if self.noisy else v for k, v in found.items()}
        order = np.lexsort((merged["index"], -merged["confidence"]))[: self.max_listed]
        self.noisy = {k: v[order] for k, v in merged.items()}

    def similarity(self) -> np.ndarray:
        """S (C, C): row c is the mean renormalised non-target distribution of class c (NaN if c is absent)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.similarity_sum / self.class_counts[:, None]

    def noisy_rows(self, class_names: list[str]) -> list[dict[str, Any]]:
        rows = []
        for i in range(len(self.noisy.get("index", []))):
            label, pred = int(self.noisy["label"][i]), int(self.noisy["predicted"][i])
            rows.append(
                {
                    "index": int(self.noisy["index"][i]),
                    "label": label,
                    "label_name": class_names[label],
                    "predicted": pred,
                    "predicted_name": class_names[pred],
                    "confidence": float(self.noisy["confidence"][i]),
                    "label_prob": float(self.noisy["label_prob"][i]),
                    "validation_row": bool(self.noisy["val"][i]),
                }
            )
        return rows

    def metrics(self) -> dict[str, Any]:
        """Label-free statistics over every row; accuracy and noise over the labelled rows only (a transfer
        set's store adds `rows_unlabelled`; a labelled dataset's metrics keep their keys)."""
        n = max(self.n, 1)
        labelled = max(self.n - self.n_unlabelled, 1)
        mean = {k: v / n for k, v in self.sums.items()}
        mp_std = _std(mean["max_prob"], mean["max_prob_sq"])
        return {
            "rows": self.n,
            **({"rows_unlabelled": self.n_unlabelled} if self.n_unlabelled else {}),
            "accuracy": self.correct / labelled,
            "accuracy_fit": (self.correct - self.correct_val) / max(self.n - self.n_unlabelled - self.n_val, 1),
            "accuracy_val": self.correct_val / self.n_val if self.n_val else float("nan"),
            "entropy_mean": mean["entropy"],
            "entropy_std": _std(mean["entropy"], mean["entropy_sq"]),
            "entropy_uniform": float(np.log(self.num_classes)),
            "max_prob_mean": mean["max_prob"],
            "max_prob_std": mp_std,
            # Spread of the CWTM weights: 0 when every sample would get the same weight.
            "cwtm_weight_cv": mp_std / mean["max_prob"] if mean["max_prob"] else 0.0,
            "dark_mass_mean": mean["dark_mass"],
            "likely_noisy": self.noisy_count,
            "likely_noisy_fraction": self.noisy_count / labelled,
            "likely_noisy_in_val": self.noisy_val,
        }


@dataclass
class Calibration:
    """Reliability bins of the argmax confidence (test split), added up chunk by chunk."""

    bins: int = 15
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.bins, np.int64)
        self.conf_sum = np.zeros(self.bins)
        self.correct = np.zeros(self.bins)

    def update(self, start: int, logits: np.ndarray, labels: np.ndarray) -> None:
        logp = log_softmax(logits, self.temperature)
        conf, hit = max_prob(logp), logp.argmax(axis=-1) == np.asarray(labels)
        b = _bin(conf, 0.0, 1.0, self.bins)
        self.counts += np.bincount(b, minlength=self.bins)
        self.conf_sum += np.bincount(b, weights=conf, minlength=self.bins)
        self.correct += np.bincount(b, weights=hit, minlength=self.bins)

    def reliability(self) -> list[dict[str, float]]:
        """One row per non-empty bin: its edges, sample count, mean confidence and accuracy."""
        edges = np.linspace(0.0, 1.0, self.bins + 1)
        return [
            {
                "bin_lo": float(edges[b]),
                "bin_hi": float(edges[b + 1]),
                "count": int(n),
                "confidence": float(self.conf_sum[b] / n),
                "accuracy": float(self.correct[b] / n),
            }
            for b in np.flatnonzero(self.counts)
            for n in [self.counts[b]]
        ]

    def metrics(self) -> dict[str, Any]:
        n = int(self.counts.sum())
        return {
            "rows": n,
            "accuracy": float(self.correct.sum() / max(n, 1)),
            "confidence_mean": float(self.conf_sum.sum() / max(n, 1)),
            "ece": expected_calibration_error(self.counts, self.conf_sum, self.correct),
            "ece_bins": self.bins,
        }


@dataclass
class Agreement:
    """KL(p_J || p_K) and top-1 agreement of generation K with reference J, per class of the label (over the
    labelled rows: a transfer set's unlabelled rows have no class)."""

    num_classes: int
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.kl_sum = np.zeros(self.num_classes)
        self.agree = np.zeros(self.num_classes, np.int64)
        self.counts = np.zeros(self.num_classes, np.int64)

    def update(self, start: int, logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        known = labels != UNLABELLED  # per class by label: a transfer set's unlabelled rows are left out
        if not known.all():
            logits, ref_logits, labels = logits[known], ref_logits[known], labels[known]
        logp, logp_ref = log_softmax(logits, self.temperature), log_softmax(ref_logits, self.temperature)
        c = self.num_classes
        self.kl_sum += np.bincount(labels, weights=kl_divergence(logp_ref, logp), minlength=c)
        self.agree += np.bincount(labels, weights=logp.argmax(-1) == logp_ref.argmax(-1), minlength=c).astype(np.int64)
        self.counts += np.bincount(labels, minlength=c)

    def per_class(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean KL, agreement) per class; NaN for a class with no samples."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.kl_sum / self.counts, self.agree / self.counts

    def metrics(self) -> dict[str, Any]:
        n = max(int(self.counts.sum()), 1)
        return {
            "rows": int(self.counts.sum()),
            "kl_mean": float(self.kl_sum.sum() / n),
            "agreement": float(self.agree.sum() / n),
        }


def _std(mean: float, mean_sq: float) -> float:
    return float(np.sqrt(max(mean_sq - mean * mean, 0.0)))


# -- streaming drivers ---------------------------------------------------------------------------------
def stream(
    store: LogitStore, split: str, labels: Labels, acc: TargetStats | Calibration, val_index: np.ndarray | None = None
) -> None:
    """Feed `split` of `store` to `acc` one zarr chunk of rows at a time, with the matching labels (and, for
    TargetStats, which rows are in the sorted `val_index`)."""
    for start, block in store.blocks(split):
        require_finite(store.path, split, start, block, NEEDS_FINITE)
        stop = start + len(block)
        y = np.asarray(labels[start:stop])
        if isinstance(acc, TargetStats):
            val = np.zeros(len(block), bool)
            if val_index is not None:
                lo, hi = np.searchsorted(val_index, [start, stop])
                val[val_index[lo:hi] - start] = True
            acc.update(start, block[:, VIEW, :], y, val)
        else:
            acc.update(start, block[:, VIEW, :], y)


class EnsembleRef:
    """The mean teacher of several dense stores, read as `stream_pair` reads a reference store: `read` gives
    T * log((1/n) sum_j softmax(z_j / T)) (N, 1, C), whose softmax at T is the members' mean p_T (an
    ensemble teacher's `probs` target), so KL and agreement are against the ensemble itself."""

    def __init__(self, stores: list[LogitStore], temperature: float) -> None:
        self.stores, self.temperature = stores, temperature
        self.path = stores[0].path

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        total = None
        for s in self.stores:
            block = s.read(split, start, stop)[:, VIEW, :]
            require_finite(s.path, split, start, block, NEEDS_FINITE)
            p = np.exp(log_softmax(block, self.temperature))
            total = p if total is None else total + p
        mean = np.asarray(total) / len(self.stores)
        return (self.temperature * np.log(np.maximum(mean, np.finfo(np.float32).tiny)))[:, None, :]


Reference = LogitStore | EnsembleRef  # what a store is compared with: another store, or an ensemble's mean


def stream_pair(store: LogitStore, ref: Reference, split: str, labels: Labels, acc: Agreement) -> None:
    """Feed the same rows of two stores to `acc`, in the chunks of `store` (at most two chunks of `ref`)."""
    for start, block in store.blocks(split):
        stop = start + len(block)
        ref_block = ref.read(split, start, stop)
        require_finite(store.path, split, start, block, NEEDS_FINITE)
        require_finite(ref.path, split, start, ref_block, NEEDS_FINITE)
        acc.update(start, block[:, VIEW, :], ref_block[:, VIEW, :], np.asarray(labels[start:stop]))


def open_checked(path: Path, labels: DatasetLabels, verify: bool = True) -> LogitStore:
    """Open a complete dense store and check it was exported from the dataset whose labels are read
    (`verify`: and, while it is streamed, against its marker's sha256)."""
    rows = {"train": len(labels.train), "test": len(labels.test)}
    n = len(labels.class_names)
    store = LogitStore.open(path, fingerprint=labels.fingerprint, rows=rows, num_classes=n, verify=verify)
    store.require_dense("the audit (`bancache convert` reads any layout)")
    return store


def audit_store(store: LogitStore, labels: DatasetLabels, params: InspectParams) -> tuple[TargetStats, Calibration]:
    """Target statistics of the train split and calibration of the test split, each in one streamed pass."""
    stats = TargetStats(len(labels.class_names), params.temperature, params.noise_confidence, params.max_listed)
    stream(store, "train", labels.train, stats, labels.val_index)
    calib = Calibration(params.ece_bins, params.temperature)
    stream(store, "test", labels.test, calib)
    return stats, calib


def compare_stores(
    store: LogitStore, ref: Reference, labels: DatasetLabels, temperature: float
) -> dict[str, Agreement]:
    """KL(p_ref || p_store) and top-1 agreement per split, per class."""
    out = {}
    for split, y in (("train", labels.train), ("test", labels.test)):
        acc = Agreement(len(labels.class_names), temperature)
        stream_pair(store, ref, split, y, acc)
        out[split] = acc
    return out
