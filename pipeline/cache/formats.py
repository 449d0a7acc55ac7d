"""The store formats: how a store keeps a teacher's output per row and view, one object per format.

A store's attribute `layout` (and `export.layout`) names its format in `LAYOUTS`, the one place a format
is added. Each format knows everything that differs between formats, so the store, the export, the
readers (host and device) and the params ask it instead of comparing names:

- the arrays it stores beside each split's values (`extra_arrays`) and how many values a row keeps
  (`slots`);
- how float32 logits (B, V, C) become those arrays (`encode`), and which store attributes the reader
  needs for them (`attributes`: topk's `topk_rest`, sampled's `samples`);
- how stored rows become the teacher target the losses take (`expand`: raw logits, or a `Probs`
  distribution), which temperatures that target has (`t1_only`), and whether the values are all C logits
  (`full_logits`: the ensemble and inspect need them).

The formats of this version: "dense" (all C raw logits), "topk" (the k largest raw logits, their classes
and kept mass) and "sampled" (counts of the classes drawn from the teacher distribution, Anshumann et al.
2025). `StoreSpec` is what an export hands `LogitStore.create`: the format and the store's views.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.core.errors import CorruptStoreError, ParamsError
from pipeline.losses import Probs, Teacher

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def index_dtype(num_classes: int) -> str:
    """The smallest integer dtype that holds every class index."""
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


@dataclass(frozen=True)
class FormatOptions:
    """The export settings a format may use (`export.topk`, `export.topk_rest`, `export.samples`), as plain
    values: the cache part does not know the params."""

    topk: int
    topk_rest: str
    samples: int


@dataclass(frozen=True)
class ExtraArray:
    """An array `<split>_<suffix>` a format stores beside a split's values: (N, V, S) like the values when
    `per_slot`, else (N, V); `fill_value` is what an unwritten chunk holds (refused by validation)."""

    suffix: str
    per_slot: bool
    dtype: str
    fill_value: float


class StoreFormat:
    """One store format. Subclasses set the class attributes and override what differs from a dense store."""

    name: ClassVar[str]
    full_logits: ClassVar[bool] = False  # the values are all C raw logits of each row
    logit_values: ClassVar[bool] = True  # the values are logits, so float16 ones are stored minus their row max
    t1_only: ClassVar[str | None] = None  # why the target exists at T = 1 only (None: any temperature)
    read: ClassVar[tuple[str, ...]] = ()  # the extra arrays `expand` takes, in the order the readers load them

    def extra_arrays(self, num_classes: int) -> tuple[ExtraArray, ...]:
        """The arrays beside each split's values; a format without `full_logits` stores a `mass` array, the
        teacher probability (T = 1) each (row, view) keeps (the store's `retained_mass`)."""
        return ()

    def slots(self, num_classes: int, options: FormatOptions) -> int:
        """The values per row and view, or a ParamsError naming the setting that does not fit the dataset."""
        return num_classes

    def attributes(self, options: FormatOptions) -> dict[str, Any]:
        """Store attributes `expand` reads besides `num_classes`."""
        return {}

    def encode(
        self, logits: torch.Tensor, dtype: str, slots: int, options: FormatOptions, generator: torch.Generator
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(values (B, V, slots), extra arrays by suffix) of float32 logits (B, V, C). float16 logits are
        stored shifted by each (row, view)'s max (export attribute `logit_shift` "row_max"): softmax(z - max z)
        = softmax(z), and z - max z lies in [-65504, 0] (clamped below; exp(-65504 / T) is 0 in float32 for
        any T <= 700), so no finite logit overflows float16."""
        if dtype == "float16" and self.logit_values:
            logits = (logits - logits.amax(dim=-1, keepdim=True)).clamp_min(-FLOAT16_MAX)
        return self._encode(logits, slots, options, generator)

    def _encode(
        self, logits: torch.Tensor, slots: int, options: FormatOptions, generator: torch.Generator
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return logits.numpy(), {}

    def expand(
        self,
        path: str | os.PathLike[str],
        attrs: Mapping[str, Any],
        values: torch.Tensor,
        arrays: dict[str, torch.Tensor],
        temperature: float,
    ) -> Teacher:
        """The teacher target of B stored rows for the losses, on the device of `values`: `values` (B, S) and
        `arrays` (the `read` ones, (B, S) or (B,)) as stored, in the store's dtypes. A dense store gives its
        raw logits as float32 (the loss softens them)."""
        return values.float()


class Dense(StoreFormat):
    """All C raw logits of each row and view."""

    name = "dense"
    full_logits = True


class Sparse(StoreFormat):
    """Part of each row: `slots` values, their classes (`idx`) and the teacher probability they keep (`mass`)."""

    def extra_arrays(self, num_classes: int) -> tuple[ExtraArray, ...]:
        return (ExtraArray("idx", True, index_dtype(num_classes), -1), ExtraArray("mass", False, "float32", np.nan))

    def _encode(
        self, logits: torch.Tensor, slots: int, options: FormatOptions, generator: torch.Generator
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        b, v, c = logits.shape
        p = torch.softmax(logits.double(), dim=-1).reshape(b * v, c)  # T = 1
        values, idx, kept = self._select(logits.reshape(b * v, c), p, slots, options, generator)
        mass = (p.gather(1, idx) * kept).sum(dim=-1)
        return values.reshape(b, v, slots).numpy(), {
            "idx": idx.reshape(b, v, slots).numpy().astype(index_dtype(c)),
            "mass": mass.reshape(b, v).numpy().astype(np.float32),
        }

    def _select(
        self, logits: torch.Tensor, p: torch.Tensor, slots: int, options: FormatOptions, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """(values, classes, weight of each kept class in the mass) of rows `logits` (R, C), `p` their softmax."""
        raise NotImplementedError


class TopK(Sparse):
    """The k largest raw logits of each row and view; the target keeps their mass m (T = 1)."""

    name = "topk"
    read = ("idx", "mass")

    def slots(self, num_classes: int, options: FormatOptions) -> int:
        if options.topk > num_classes:
            raise ParamsError(
                f"export.topk = {options.topk}: the dataset has only {num_classes} classes; use 1..{num_classes}"
            )
        return options.topk

    def attributes(self, options: FormatOptions) -> dict[str, Any]:
        return {"topk_rest": options.topk_rest}

    def _select(
        self, logits: torch.Tensor, p: torch.Tensor, slots: int, options: FormatOptions, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        values, idx = logits.topk(slots, dim=-1)
        return values, idx, 1

    def expand(
        self,
        path: str | os.PathLike[str],
        attrs: Mapping[str, Any],
        values: torch.Tensor,
        arrays: dict[str, torch.Tensor],
        temperature: float,
    ) -> Teacher:
        """k kept logits z_K with kept mass m: the kept classes get m * softmax(z_K / T), the other C - k
        classes share 1 - m equally (`topk_rest` "uniform"), or the kept classes get softmax(z_K / T) and the
        others 0 ("renorm"). With k = C this is softmax(z / T)."""
        values, classes, mass = values.float(), arrays["idx"].long(), arrays["mass"].float()
        b, c = len(values), attrs["num_classes"]
        order = classes.argsort(dim=1)  # class order, so that k = C reproduces the dense softmax bit for bit
        classes, values = classes.gather(1, order), values.gather(1, order)
        kept = torch.softmax(values / temperature, dim=-1)
        k = classes.shape[1]
        if attrs.get("topk_rest", "uniform") == "renorm" or k == c:
            return Probs(torch.zeros(b, c, device=values.device).scatter_(1, classes, kept))
        rest = ((1.0 - mass) / (c - k)).clamp_min(0.0)
        return Probs(rest[:, None].expand(b, c).clone().scatter_(1, classes, kept * mass[:, None]))


class Sampled(Sparse):
    """Counts n_c of the classes drawn `samples` times with replacement from the teacher distribution at T = 1,
    the most drawn first (Anshumann et al. 2025); the values are counts, not logits."""

    name = "sampled"
    logit_values = False
    t1_only = "an estimate of the teacher distribution at T = 1 only"
    read = ("idx",)

    def slots(self, num_classes: int, options: FormatOptions) -> int:
        return min(options.samples, num_classes)  # at most `samples` distinct classes are drawn

    def attributes(self, options: FormatOptions) -> dict[str, Any]:
        return {"samples": options.samples}

    def _select(
        self, logits: torch.Tensor, p: torch.Tensor, slots: int, options: FormatOptions, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        draws = torch.multinomial(p, options.samples, replacement=True, generator=generator)
        counts = torch.zeros(p.shape, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.float64)
        )
        values, idx = counts.topk(slots, dim=-1)
        return values, idx, values > 0  # slots no draw reached keep no mass

    def expand(
        self,
        path: str | os.PathLike[str],
        attrs: Mapping[str, Any],
        values: torch.Tensor,
        arrays: dict[str, torch.Tensor],
        temperature: float,
    ) -> Teacher:
        """p = n / S, an unbiased estimate of p_1. It has no temperature: T != 1 raises ValueError."""
        if temperature != 1.0:
            raise ValueError(
                f"{path}: a sampled store estimates the teacher distribution at T = 1 only; got T = "
                f"{temperature}. Set the student's temperature to 1.0 or export a topk or dense store"
            )
        values, classes = values.float(), arrays["idx"].long()
        b, c = len(values), attrs["num_classes"]
        return Probs(torch.zeros(b, c, device=values.device).scatter_add_(1, classes, values) / attrs["samples"])


LAYOUTS: dict[str, StoreFormat] = {f.name: f for f in (Dense(), TopK(), Sampled())}  # name -> format


def format_of(attrs: Mapping[str, Any], path: str | os.PathLike[str]) -> StoreFormat:
    """The format of the store at `path` with attributes `attrs`; a layout this version does not know is
    refused with the known ones."""
    name = attrs["layout"]
    if name not in LAYOUTS:
        raise CorruptStoreError(
            f"{path}: store layout {name!r} is not one this version reads (known: {', '.join(LAYOUTS)}); "
            f"re-export the store with this version"
        )
    return LAYOUTS[name]


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds per split besides its rows and dtype: its format, `slots` values per row and view,
    `views` views (`split_views`: per split, at most `views`) and the augmentation recipe of views 1..V-1
    (None: one clean view)."""

    format: StoreFormat
    slots: int
    views: int
    split_views: dict[str, int]
    augmentation: dict[str, Any] | None
