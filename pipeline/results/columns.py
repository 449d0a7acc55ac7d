"""The columns of bancache's results as typed objects: a generation, an ensemble of generations, a control,
an ensemble of controls, a loss variant of generation 1.

Tables, runs and paired rows hold these objects (a run is `dict[Column, float]`); text appears only when a
table is formatted or a file is written. Two string forms exist on disk and neither changes: the keys of
metrics/ensemble/ (`key`, its files' names: "gen1", "ens2", "ens2+teacher") and the keys of a sweep's runs in sweep.json
(`label`, the table's column name: "Teacher", "BAN-1", "Ens*2", "BAN+L", "Control-1", "Control Ens*2").
`parse_column` is the one place that reads either back; every object gives its own strings.

A column's `sort_key` is its place in the BAN paper's Table 2: the teacher, the loss variants, BAN-k, Ens*k,
then the controls (which the paired table shows, not Table 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from pipeline.core.errors import ResultsError

V = TypeVar("V")


@dataclass(frozen=True)
class Generation:
    """Generation `g` alone: the teacher (g = 0) or student BAN-g."""

    g: int

    @property
    def label(self) -> str:
        return "Teacher" if self.g == 0 else f"BAN-{self.g}"

    @property
    def key(self) -> str:
        return f"gen{self.g}"

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (0, 0, self.label) if self.g == 0 else (2, self.g, self.label)


@dataclass(frozen=True)
class Ensemble:
    """Ens*k: the mean softmax of students 1..k; `with_teacher` also averages generation 0."""

    k: int
    with_teacher: bool = False

    @property
    def label(self) -> str:
        return f"Ens*{self.k}" + ("+teacher" if self.with_teacher else "")

    @property
    def key(self) -> str:
        return f"ens{self.k}" + ("+teacher" if self.with_teacher else "")

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (3, self.k, self.label)


@dataclass(frozen=True)
class Control:
    """Control-k: generation k's network, seed and batch order trained from labels only."""

    k: int

    @property
    def label(self) -> str:
        return f"Control-{self.k}"

    @property
    def key(self) -> str:
        return self.label  # not in metrics/ensemble/: its label is its only string

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (4, self.k, self.label)


@dataclass(frozen=True)
class ControlEnsemble:
    """Control Ens*k: the mean softmax of controls 1..k, the controls' counterpart of Ens*k."""

    k: int

    @property
    def label(self) -> str:
        return f"Control Ens*{self.k}"

    @property
    def key(self) -> str:
        return self.label

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (5, self.k, self.label)


@dataclass(frozen=True)
class LossVariant:
    """Generation 1 trained from the teacher's cache with loss `name`, shown as `label` (Table 2's BAN+L)."""

    name: str
    label: str

    @property
    def key(self) -> str:
        return self.label

    @property
    def sort_key(self) -> tuple[int, int, str]:
        # Among themselves the loss columns follow the loss registry's order, which the table applies.
        return (1, 0, self.label)


Column = Generation | Ensemble | Control | ControlEnsemble | LossVariant

# Each string form once: a pattern and the column it names. parse_column accepts a match only if the column
# gives back exactly that text (so "gen01" or "BAN-0" are not silently read as generation 1 or the teacher).
_FORMS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Column]]] = [
    (re.compile(r"gen(\d+)|BAN-(\d+)"), lambda m: Generation(int(m[1] or m[2]))),
    (re.compile(r"Teacher"), lambda m: Generation(0)),
    (re.compile(r"(?:ens|Ens\*)(\d+)(\+teacher)?"), lambda m: Ensemble(int(m[1]), m[2] is not None)),
    (re.compile(r"Control-(\d+)"), lambda m: Control(int(m[1]))),
    (re.compile(r"Control Ens\*(\d+)"), lambda m: ControlEnsemble(int(m[1]))),
]
KNOWN_FORMS = (
    "gen{g}, ens{k}, ens{k}+teacher as metrics/ensemble/<key>.json; Teacher, BAN-{g}, Ens*{k}, Ens*{k}+teacher, "
    "Control-{k}, Control Ens*{k} in a sweep's runs (numbers without leading zeros; gen0 is the Teacher)"
)


def parse_column(text: str, losses: Mapping[str, str] | None = None, where: str = "a results file") -> Column:
    """The column that `text` (a metrics/ensemble/<key>.json name or a sweep run's label) names. `losses` maps loss
    names to their column labels (the loss variants a sweep may hold). Anything else is refused: a key this
    version does not know would otherwise vanish from the tables without a word."""
    for pattern, build in _FORMS:
        m = pattern.fullmatch(text)
        if m:
            column = build(m)
            if text in (column.key, column.label):
                return column
    for name, label in (losses or {}).items():
        if text == label:
            return LossVariant(name, label)
    loss_labels = ", ".join(sorted((losses or {}).values())) or "none expected here"
    raise ResultsError(
        f"{where} names an unknown result column {text!r}; known columns: {KNOWN_FORMS}; loss columns: "
        f"{loss_labels}. Correct the key or re-run the stage that wrote the file with this version"
    )


def parse_columns(
    values: Mapping[str, V], losses: Mapping[str, str] | None = None, where: str = "a results file"
) -> dict[Column, V]:
    """`values` keyed by columns instead of their strings, in the same order."""
    return {parse_column(k, losses, where): v for k, v in values.items()}


def labelled(run: Mapping[Column, V]) -> dict[str, V]:
    """A run keyed by its columns' labels, in the same order: the form a sweep's JSON holds."""
    return {c.label: v for c, v in run.items()}


def is_control(column: Column) -> bool:
    """Whether `column` belongs to the controls (the paired table), not to Table 2."""
    return isinstance(column, Control | ControlEnsemble)
