"""BANE: test accuracy of every generation and of ensembles of generations, from exported test logits.

Ens*k = argmax of (1/k) * sum_{i=1..k} softmax(z_i) over the students 1..k (Furlanello et al. 2018);
'with teacher' variants also average generation 0. No model is built: only cached logits are read, one
chunk of rows at a time, so memory holds one block per generation. A missing or non-finite row refuses the
store (it would otherwise count as a wrong answer), and each store's test logits are checked against its
marker's sha256 as they are read (unless `verify=False`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.store import LogitStore, require_finite
from pipeline.data.prepared import PreparedData
from pipeline.losses import soften


def _probs(store: LogitStore, start: int, stop: int) -> np.ndarray:
    block = store.read("test", start, stop)[:, 0, :]
    require_finite(store.path, "test", start, block, "the ensemble would count them as wrong answers")
    return soften(torch.from_numpy(block.astype(np.float32))).numpy()


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
    groups: dict[str, list[int]] = {f"gen{g}": [g] for g in gens}
    for k in range(2, len(students) + 1):
        groups[f"ens{k}"] = students[:k]
        if 0 in opened:
            groups[f"ens{k}+teacher"] = [0, *students[:k]]
    correct = dict.fromkeys(groups, 0)
    y = data.y_test
    step = min(s.array("test").chunks[0] for s in opened.values()) if opened else 1
    for start in range(0, len(y), step):
        stop = min(start + step, len(y))
        probs = {g: _probs(s, start, stop) for g, s in opened.items()}
        for name, members in groups.items():
            total = np.zeros_like(probs[members[0]])
            for g in members:
                total += probs[g]
            mean = total / len(members)
            correct[name] += int((mean.argmax(-1) == y[start:stop]).sum())
    n = len(y)
    return {
        "num_test": n,
        "accuracy": {name: correct[name] / n for name in groups},
        "members": groups,
    }
