"""Typed result columns: every kind reads back from each of its strings (metrics/ensemble/ file names, sweep
labels), unknown or non-canonical strings are refused with the known forms, and the chain's Ens*k and the
controls' Ens*k are one computation (same logits, same answers, argmax ties included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.store import LogitStore
from pipeline.core.errors import ResultsError
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import PreparedData
from pipeline.losses import loss_columns
from pipeline.results.columns import (
    Column,
    Control,
    ControlEnsemble,
    Ensemble,
    Generation,
    LossVariant,
    is_control,
    labelled,
    parse_column,
    parse_columns,
)
from pipeline.results.ensemble import evaluate_chain
from pipeline.results.paired import control_columns

EVERY_KIND: list[Column] = [
    Generation(0),
    Generation(1),
    Generation(12),
    Ensemble(2),
    Ensemble(3, with_teacher=True),
    Control(1),
    ControlEnsemble(4),
    *(LossVariant(name, label) for name, label in loss_columns().items()),
]


@pytest.mark.parametrize("column", EVERY_KIND, ids=lambda c: c.label)
def test_every_column_reads_back_from_its_key_and_its_label(column: Column) -> None:
    assert parse_column(column.key, loss_columns()) == column
    assert parse_column(column.label, loss_columns()) == column


def test_the_strings_on_disk_are_the_ones_bancache_has_always_written() -> None:
    assert [Generation(0).key, Generation(2).key, Ensemble(2).key, Ensemble(2, True).key] == [
        "gen0",
        "gen2",
        "ens2",
        "ens2+teacher",
    ]
    labels = [c.label for c in (Generation(0), Generation(2), Ensemble(3), Control(1), ControlEnsemble(2))]
    assert labels == ["Teacher", "BAN-2", "Ens*3", "Control-1", "Control Ens*2"]
    assert labelled({Generation(0): 0.5, LossVariant("ban+l", "BAN+L"): 0.25}) == {"Teacher": 0.5, "BAN+L": 0.25}


@pytest.mark.parametrize("text", ["bogus", "gen", "gen01", "BAN-0", "ens2+student", "Control-", "ens", "BAN+L"])
def test_an_unknown_or_non_canonical_string_is_refused_with_the_known_forms(text: str) -> None:
    # "BAN+L" without the loss columns: metrics/ensemble/ never holds a loss column.
    with pytest.raises(ResultsError, match="unknown result column") as info:
        parse_column(text, where="metrics/ensemble/gen1x.json")
    message = str(info.value)
    assert repr(text) in message and "metrics/ensemble/gen1x.json" in message
    assert "gen{g}" in message and "Control Ens*{k}" in message and "\n" not in message


def test_a_loss_column_needs_the_loss_registry_and_names_the_loss() -> None:
    assert parse_column("BAN+L", loss_columns()) == LossVariant("ban+l", "BAN+L")
    assert parse_column("DKD", loss_columns()) == LossVariant("dkd", "DKD")
    assert parse_column("MSE", loss_columns()) == LossVariant("mse", "MSE")
    with pytest.raises(ResultsError, match=r"loss columns: BAN, BAN\+L, CWTM, DKD, DKPP, KD, MSE\."):
        parse_column("XYZ", loss_columns())


def test_parse_columns_keeps_the_order_and_controls_are_told_apart() -> None:
    run = {"Control Ens*2": 0.1, "Teacher": 0.2, "BAN": 0.3, "Control-1": 0.4, "Ens*2": 0.5}
    cols = parse_columns(run, loss_columns())
    assert list(cols) == [ControlEnsemble(2), Generation(0), LossVariant("ban", "BAN"), Control(1), Ensemble(2)]
    assert labelled(cols) == run and list(labelled(cols)) == list(run)
    assert [is_control(c) for c in cols] == [True, False, False, True, False]


def test_the_report_refuses_an_unknown_key_in_the_ensemble_metrics(tmp_path: Path) -> None:
    from stages import report

    layout = ProjectPaths(tmp_path)
    layout.ensemble_metrics.mkdir(parents=True)
    for key, acc in (("gen0", 0.5), ("gen1x", 0.6)):
        (layout.ensemble_metrics / f"{key}.json").write_text(json.dumps({"test_acc": acc, "members": [0]}))
    with pytest.raises(ResultsError, match="'gen1x'") as info:
        report.run(layout)
    assert str(layout.ensemble_metrics / "gen1x.json") in str(info.value)


FP = "cd" * 32


def _store(path: Path, gen: int, logits: np.ndarray, chunk_rows: int) -> Path:
    n, c = logits.shape
    attrs = {
        "generation": gen,
        "arch": "hand",
        "seed": gen,
        "temperature": 1.0,
        "checkpoint_sha256": "00" * 32,
        "dataset_fingerprint": FP,
        "class_names": [str(i) for i in range(c)],
    }
    store = LogitStore.create(path, {"train": 1, "test": n}, c, 1, "float32", chunk_rows, attrs)
    store.write("train", 0, logits[:1])
    store.write("test", 0, logits)
    store.seal()
    return path


def test_control_ensembles_and_chain_ensembles_agree_on_the_same_logits(tmp_path: Path) -> None:
    """Three models' logits serve both as a chain's students 1..3 (read back from stores in chunks of 7
    rows) and as controls 1..3 (whole arrays in memory): every Ens*k must count the same rows right. Rows
    0-3 are exact ties (equal logits within a row, so the mean softmax ties and argmax takes the first
    class); the rest are random with close runners-up, where the members disagree and the mean decides."""
    rng = np.random.default_rng(7)
    n, c = 60, 5
    logits = {g: rng.normal(0.0, 0.05, (n, c)).astype(np.float32) for g in (1, 2, 3)}
    for g in logits:
        logits[g][:4] = np.float32(g)  # a tie over all classes in every member
    y = rng.integers(0, c, n)
    y[:4] = [0, 1, 0, 2]  # the ties answer class 0: rows 0 and 2 right
    x = np.zeros((n, 1, 4), np.float32)
    data = PreparedData(x[:1], y[:1], x, y, np.zeros(0, np.int64), [str(i) for i in range(c)], FP, "hand-made")
    stores = {g: _store(tmp_path / f"gen-{g}", g, z, chunk_rows=7) for g, z in logits.items()}

    chain = evaluate_chain(stores, data)["accuracy"]
    controls = control_columns(logits, y)
    for k in (2, 3):
        assert controls[ControlEnsemble(k)] == chain[Ensemble(k).key]
    # The data is not trivial: the ensembles differ from their members on some rows.
    mean3 = sum(np.exp(z) / np.exp(z).sum(-1, keepdims=True) for z in logits.values())
    assert any((mean3.argmax(-1) != z.argmax(-1)).any() for z in logits.values())
    assert (mean3[:4].argmax(-1) == 0).all()
