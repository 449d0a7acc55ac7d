"""Stable 63-bit seeds from integer keys: the one definition of `mix64`, for one key tuple or a whole array.

Stores record their view seeds as `mix64(seed, split_id, row, view)` and training picks random views with
`mix64(seed, epoch, row) % V`, so the function is part of the file formats: a single body (`mix64_array`,
numpy uint64 arithmetic, which wraps mod 2^64 as the hash needs) serves both the vectorised callers and the
scalar `mix64`, so the two can never drift apart.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S1 = (np.uint64(s) for s in (30, 27, 31, 1))


def _as_u64(key: int | np.ndarray) -> np.ndarray:
    """A key as uint64 with its two's complement bits (a negative or over-wide int is taken mod 2^64)."""
    if isinstance(key, np.ndarray):
        return key.astype(np.int64).astype(np.uint64)
    return np.array([int(key) & _MASK64], dtype=np.uint64)


def mix64_array(*keys: int | np.ndarray) -> np.ndarray:
    """mix64 of every key tuple, broadcast over the array keys (ints are scalars): uint64 values < 2^63.

    The splitmix64 finaliser folded over the keys. Arrays only (never numpy scalars): array arithmetic
    wraps silently mod 2^64, scalar arithmetic would warn on every overflow."""
    h = np.array([_GOLDEN], dtype=np.uint64)
    for key in keys:
        h = h ^ _as_u64(key)
        h = (h ^ (h >> _S30)) * _M1
        h = (h ^ (h >> _S27)) * _M2
        h = h ^ (h >> _S31)
    return h >> _S1  # type: ignore[no-any-return]


def mix64(*keys: int) -> int:
    """A 63-bit seed from integer keys: stable across runs, processes and platforms, unlike `hash()`."""
    return int(mix64_array(*keys)[0])
