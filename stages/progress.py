"""Progress of long steps (train, export, inspect, sweep), printed by the stages, never by the library.

On a terminal: a tqdm bar on stderr. Otherwise (under `dvc repro`, in a log file): one concise line per
step, e.g. `gen 1 epoch 3/60: loss 0.4123, val acc 0.8120, 1.2 s, ETA 1m10s`. `bancache -q` silences both.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("bancache_quiet", default=False)


@contextlib.contextmanager
def quiet_output(quiet: bool) -> Iterator[None]:
    """Silence every Progress and note for one invocation (`bancache -q`), restored when it ends: a
    context variable, not a module flag, so one CLI call cannot leave the next one quiet."""
    token = _QUIET.set(quiet)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _stream() -> TextIO:
    return sys.stderr


def fmt_seconds(s: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """`total` steps named `unit`; call `update(**values)` after each step, then `close()`.

    The line mode reports each step's values, its seconds and an ETA from the mean step time so far."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "step",
        initial: int = 0,
        enabled: bool = True,
        lines: int | None = None,
    ) -> None:
        self.label, self.total, self.unit, self.done = label, total, unit, initial
        self.lines = lines  # line mode: at most this many lines (at each 1/lines of the total); None: every step
        self.printed = 0
        self.quiet = _QUIET.get() or not enabled  # e.g. torchrun workers other than rank 0
        self.stream = _stream()
        self.t_start = self.t_last = time.perf_counter()
        self.steps = 0
        self.bar: Any = None
        if not self.quiet and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=label, unit=unit, file=self.stream, leave=False)

    def update(self, n: int = 1, /, **values: float) -> None:
        now = time.perf_counter()
        step_s, self.t_last = now - self.t_last, now
        self.done += n
        self.steps += n
        if self.quiet:
            return
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(shown, refresh=False)
            self.bar.update(n)
            return
        if (
            self.lines is not None
            and self.done < self.total
            and self.done * self.lines < (self.printed + 1) * self.total
        ):
            return
        self.printed = self.done * self.lines // max(self.total, 1) if self.lines is not None else self.printed + 1
        eta = (now - self.t_start) / self.steps * (self.total - self.done)
        step = f"{step_s:.1f} s" if self.lines is None else f"{now - self.t_start:.1f} s so far"
        parts = [p for p in (shown, step, f"ETA {fmt_seconds(eta)}") if p]
        print(f"{self.label} {self.unit} {self.done}/{self.total}: {', '.join(parts)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def note(message: str) -> None:
    """One status line (a sweep's current step), unless quiet."""
    if not _QUIET.get():
        (tqdm.write if _stream().isatty() else print)(message, file=_stream())
