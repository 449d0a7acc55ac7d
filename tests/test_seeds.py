"""mix64 (pipeline/data/seeds.py): one definition for one key tuple and for arrays of keys, and still the
function the stores' seeds and the random view policy were computed with (a regression guard against the
original pure-Python formula, on keys of any size and sign)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.augment import draw_params, view_params
from pipeline.data.seeds import mix64, mix64_array
from pipeline.train.epochs import ViewPolicy, pick_views

MASK = (1 << 64) - 1


def reference_mix64(*keys: int) -> int:
    """The formula as first written (Python ints masked to 64 bits after every step): the stores record
    seeds made by it, so the numpy implementation must reproduce it bit for bit."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & MASK)) & MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
        h ^= h >> 31
    return h >> 1


BIG = st.integers(min_value=-(2**80), max_value=2**80)  # wider than 64 bits both ways: taken mod 2^64
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=400, deadline=None)
@given(st.lists(BIG, max_size=6))
def test_scalar_mix64_is_the_reference_formula(keys: list[int]) -> None:
    assert mix64(*keys) == reference_mix64(*keys)


@settings(max_examples=200, deadline=None)
@given(BIG, BIG, st.lists(INT64, max_size=20), BIG)
def test_array_mix64_is_the_scalar_one_per_row(seed: int, epoch: int, rows: list[int], view: int) -> None:
    arr = np.array(rows, dtype=np.int64)
    got = mix64_array(seed, epoch, arr, view)
    assert got.dtype == np.uint64 and got.shape == arr.shape
    assert got.tolist() == [reference_mix64(seed, epoch, r, view) for r in rows]
    assert all(v < 2**63 for v in got.tolist())


@settings(max_examples=100, deadline=None)
@given(INT64, st.integers(min_value=0, max_value=10**6), st.lists(INT64, max_size=20), st.integers(1, 17))
def test_random_views_are_reference_mix64_mod_v(seed: int, epoch: int, rows: list[int], num_views: int) -> None:
    views = pick_views(ViewPolicy("random", num_views, seed), epoch, np.array(rows, dtype=np.int64))
    assert views.tolist() == [reference_mix64(seed, epoch, r) % num_views for r in rows]


def test_view_params_seed_each_row_with_reference_mix64() -> None:
    """The vectorised seeds of `view_params` are the per-row mix64 the stores document."""
    rows = np.array([0, 5, 2**40 + 1, 9])
    p = view_params(-3, 1, rows, 2, pad=4, size=16)
    for i, r in enumerate(rows.tolist()):
        one = draw_params(1, torch.Generator().manual_seed(reference_mix64(-3, 1, r, 2)), 4, 16)
        assert (int(p.top[i]), int(p.left[i]), bool(p.flip[i])) == (int(one.top), int(one.left), bool(one.flip))
