"""BANE: test accuracy of every generation and of ensembles of generations, from exported test logits.

Ens*k = argmax of (1/k) * sum_{i=1..k} softmax(z_i) over the students 1..k (Furlanello et al. 2018);
'with teacher' variants also average generation 0. No model is built: only cached logits are read, one
chunk of rows at a time, so memory holds one block per generation. A missing or non-finite row refuses the
store (it would otherwise count as a wrong answer), and each store's test logits are checked against its
marker's sha256 as they are read (unless `verify=False`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.store import LogitStore, require_finite
from pipeline.core.errors import ResultsError
from pipeline.core.files import replace_dir, write_json
from pipeline.core.machine import with_machine
from pipeline.data.prepared import PreparedData
from pipeline.losses import soften
from pipeline.results.columns import Column, Ensemble, Generation, parse_column


def softmax(logits: np.ndarray) -> np.ndarray:
    """softmax(z) of (N, C) logits in float32 on the host, as a numpy array."""
    return soften(torch.from_numpy(np.asarray(logits, dtype=np.float32))).numpy()


def mean_probs(probs: Sequence[np.ndarray]) -> np.ndarray:
    """(1/k) sum_i p_i of k members' (N, C) probabilities: summed in member order in their dtype (float32),
    then divided once. Ens*k of the chain and of the controls both take their argmax from this, so the two
    agree bit for bit on the same logits (argmax ties included)."""
    total = np.zeros_like(probs[0])
    for p in probs:
        total += p
    return total / len(probs)


def _probs(store: LogitStore, start: int, stop: int) -> np.ndarray:
    block = store.read("test", start, stop)[:, 0, :]
    require_finite(store.path, "test", start, block, "the ensemble would count them as wrong answers")
    return softmax(block.astype(np.float32))


def evaluate_chain(stores: dict[int, Path], data: PreparedData, verify: bool = True) -> dict[str, Any]:
    """Accuracy of each generation and each ensemble; `stores` maps generation -> store path. `verify`:
    check each store's test logits against its marker's sha256 while reading them."""
    rows = {"test": len(data.y_test)}
    opened = {
        g: LogitStore.open(p, fingerprint=data.fingerprint, rows=rows, num_classes=data.num_classes, verify=verify)
        for g, p in sorted(stores.items())
    }
    for g, s in opened.items():
        s.require_dense(f"the ensemble of generation {g}")
    gens = sorted(opened)
    students = [g for g in gens if g >= 1]
    groups: dict[Column, list[int]] = {Generation(g): [g] for g in gens}
    for k in range(2, len(students) + 1):
        groups[Ensemble(k)] = students[:k]
        if 0 in opened:
            groups[Ensemble(k, with_teacher=True)] = [0, *students[:k]]
    correct = dict.fromkeys(groups, 0)
    y = data.y_test
    step = min(s.array("test").chunks[0] for s in opened.values()) if opened else 1
    for start in range(0, len(y), step):
        stop = min(start + step, len(y))
        probs = {g: _probs(s, start, stop) for g, s in opened.items()}
        for column, members in groups.items():
            mean = mean_probs([probs[g] for g in members])
            correct[column] += int((mean.argmax(-1) == y[start:stop]).sum())
    n = len(y)
    # The metrics file's form: the columns' keys (gen1, ens2, ens2+teacher), read back by parse_column.
    return {
        "num_test": n,
        "accuracy": {column.key: correct[column] / n for column in groups},
        "members": {column.key: members for column, members in groups.items()},
    }


def write_ensemble_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """`folder` (metrics/ensemble/) holds one file per column of `evaluate_chain`'s metrics, named by its
    key (gen1.json, ens2.json, ens2+teacher.json), each {"test_acc", "members", "machine"}: `dvc metrics
    show` gives every column a row and they all share one `test_acc` column with the other metrics files.
    The folder is replaced as a whole (no file of an older chain stays behind)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for key, acc in metrics["accuracy"].items():
            write_json(tmp / f"{key}.json", with_machine({"test_acc": acc, "members": metrics["members"][key]}))
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_ensemble_metrics(folder: Path) -> dict[str, Any]:
    """metrics/ensemble/ read back as `evaluate_chain` returned it: {"accuracy": {key: test_acc},
    "members": {key: generations}}, in the columns' table order."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise ResultsError(f"{folder}: no ensemble metrics (a folder of <column>.json); run `bancache ensemble` first")
    records = {f.stem: json.loads(f.read_text()) for f in files}
    keys = sorted(records, key=lambda k: parse_column(k, where=str(folder / f"{k}.json")).sort_key)
    return {
        "accuracy": {k: records[k]["test_acc"] for k in keys},
        "members": {k: records[k]["members"] for k in keys},
    }
