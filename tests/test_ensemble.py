"""BANE arithmetic: accuracy of each generation and of Ens*k (the argmax of the mean softmax of students
1..k, '+teacher' also averaging generation 0) on hand-made test logits, checked against values worked out
by hand below."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.store import LogitStore
from pipeline.data.prepared import PreparedData
from pipeline.results.ensemble import evaluate_chain

FP = "ab" * 32
Y = np.array([0, 0, 1, 1])
# p(class 0) per test row of each generation, two classes: the logits are log([p, 1 - p]), so softmax gives
# back p. Hand-worked predictions (0 if the mean p(class 0) > 1/2) and hits against Y = 0, 0, 1, 1:
#   gen0 .8 .9 .9 .9                                   -> 0 0 0 0: hits rows 0, 1      -> 2/4
#   gen1 .6 .2 .7 .1                                   -> 0 1 0 1: hits rows 0, 3      -> 2/4
#   gen2 .2 .7 .2 .3                                   -> 1 0 1 1: hits rows 1, 2, 3   -> 3/4
#   gen3 .3 .3 .7 .6                                   -> 1 1 0 0: no hit              -> 0/4
#   ens2 = (g1 + g2) / 2:          .40 .45 .45 .20     -> 1 1 1 1: hits rows 2, 3      -> 2/4
#   ens2+teacher = (g0+g1+g2) / 3: .533 .6 .6 .433     -> 0 0 0 1: hits rows 0, 1, 3   -> 3/4
#   ens3 = (g1+g2+g3) / 3:         .367 .4 .533 .333   -> 1 1 0 1: hits row 3          -> 1/4
#   ens3+teacher = all four / 4:   .475 .525 .625 .475 -> 1 0 0 1: hits rows 1, 3      -> 2/4
P0 = {
    0: [0.8, 0.9, 0.9, 0.9],
    1: [0.6, 0.2, 0.7, 0.1],
    2: [0.2, 0.7, 0.2, 0.3],
    3: [0.3, 0.3, 0.7, 0.6],
}
EXPECTED = {
    "gen0": 2 / 4,
    "gen1": 2 / 4,
    "gen2": 3 / 4,
    "gen3": 0 / 4,
    "ens2": 2 / 4,
    "ens2+teacher": 3 / 4,
    "ens3": 1 / 4,
    "ens3+teacher": 2 / 4,
}


def data() -> PreparedData:
    x = np.zeros((len(Y), 1, 4), np.float32)
    return PreparedData(x[:1], Y[:1], x, Y, np.zeros(0, np.int64), ["a", "b"], FP, "hand-made")


def write_store(path: Path, gen: int, p0: list[float], chunk_rows: int) -> Path:
    p = np.array(p0)
    logits = np.log(np.stack([p, 1.0 - p], axis=1)).astype(np.float32)
    attrs = {
        "generation": gen,
        "arch": "hand",
        "seed": gen,
        "temperature": 1.0,
        "checkpoint_sha256": "00" * 32,
        "dataset_fingerprint": FP,
        "class_names": ["a", "b"],
    }
    store = LogitStore.create(path, {"train": 1, "test": len(p)}, 2, 1, "float32", chunk_rows, attrs)
    store.write("train", 0, logits[:1])
    store.write("test", 0, logits)
    store.seal()
    return path


@pytest.mark.parametrize("chunk_rows", [4, 3, 1])  # one block, a block across the end, one row per block
def test_ensemble_accuracies_match_hand_worked_values(tmp_path: Path, chunk_rows: int) -> None:
    stores = {g: write_store(tmp_path / f"gen-{g}", g, p, chunk_rows) for g, p in P0.items()}
    m = evaluate_chain(stores, data())
    assert m["num_test"] == 4
    assert m["accuracy"] == pytest.approx(EXPECTED, abs=0)
    assert m["members"] == {
        "gen0": [0],
        "gen1": [1],
        "gen2": [2],
        "gen3": [3],
        "ens2": [1, 2],
        "ens2+teacher": [0, 1, 2],
        "ens3": [1, 2, 3],
        "ens3+teacher": [0, 1, 2, 3],
    }


def test_without_generation_0_there_are_no_teacher_ensembles(tmp_path: Path) -> None:
    stores = {g: write_store(tmp_path / f"gen-{g}", g, P0[g], 4) for g in (1, 2)}
    m = evaluate_chain(stores, data())
    assert m["accuracy"] == {"gen1": 2 / 4, "gen2": 3 / 4, "ens2": 2 / 4}


def test_ensemble_averages_probabilities_not_logits(tmp_path: Path) -> None:
    """Three classes, one row, label 0. Student 1 is sure of class 1 (logits 0, 5, -5: p = .007, .993, 0),
    student 2 leans to class 2 (logits 2, -5, 2.5: p = .377, .0003, .622); each alone is wrong. Their mean
    logits (1, 0, -1.25) would pick class 0, the label; the mean softmax (.192, .497, .311) picks class 1.
    So Ens*2, which averages probabilities, is wrong on this row."""
    rows = {1: [0.0, 5.0, -5.0], 2: [2.0, -5.0, 2.5]}
    attrs = {"arch": "hand", "temperature": 1.0, "checkpoint_sha256": "00" * 32, "dataset_fingerprint": FP}
    stores = {}
    for g, z in rows.items():
        names = ["a", "b", "c"]
        path = tmp_path / f"gen-{g}"
        s = LogitStore.create(
            path,
            {"train": 1, "test": 1},
            3,
            1,
            "float32",
            1,
            {**attrs, "generation": g, "seed": g, "class_names": names},
        )
        s.write("train", 0, np.array([z], np.float32))
        s.write("test", 0, np.array([z], np.float32))
        s.seal()
        stores[g] = path
    x = np.zeros((1, 1, 4), np.float32)
    y = np.array([0])
    d = PreparedData(x, y, x, y, np.zeros(0, np.int64), ["a", "b", "c"], FP, "hand-made")
    assert evaluate_chain(stores, d)["accuracy"] == {"gen1": 0.0, "gen2": 0.0, "ens2": 0.0}
