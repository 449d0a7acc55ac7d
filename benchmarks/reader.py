"""Benchmark: shuffled reads of a logit store larger than the reader's memory budget.

Synthetic teacher-like float16 logits (`_benchlib.build_synthetic_store`: the library's layout, chunks of
1024 rows, zarr's default zstd) at CIFAR-100 scale (50,000 x 100) and ImageNet-1k scale (1,281,167 x 1000,
2.4 GiB). The reader's budget (`--budget-mib`, 1 MiB) is below either store, so `CachedTargets` streams it.
Arms, alternating in one process, batches of --batch rows, medians of --reps rounds:

  per-batch      the previous over-budget path: every batch is `zarr.Array.oindex[unique rows]` (zarr decodes
                 each touched chunk whole, for a few rows of it), in a uniform shuffle
  streaming      `CachedTargets(max_memory_bytes=budget)`: whole chunks through `pipeline.cache.stream.ChunkCache`
                 (40 chunks, 16 prefetched in the background), in the epoch order of
                 `pipeline.cache.stream.BlockShuffleSampler` (chunks shuffled, rows shuffled within blocks of 16)
  streaming, uniform order  the same reader in a uniform shuffle: what the block order buys
  in-memory      (stores up to 1 GiB) the split loaded whole within the default budget, numpy gathers

Each arm's rows are first checked against the store. Rows/s are compared with a student that consumes
3,000 images/s (ResNet-50 on one H100, the issue's reference; target >= 20x). Peak memory: tracemalloc's
peak over a fresh reader reading --mem-batches batches (numpy and zarr buffers, prefetch thread included),
and the process's VmHWM at the end. The stores were just written, so pages are cached: the cost measured
is decoding, not disk reads.

    .venv/bin/python benchmarks/reader.py                       # both scales (~5 min on 2 cores)
    .venv/bin/python benchmarks/reader.py --scales cifar100     # quick
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _benchlib import (
    FINGERPRINT,
    alternate,
    build_synthetic_store,
    dir_bytes,
    machine_info,
    median,
    peak_rss_mib,
    pick_workdir,
    set_threads,
    table,
    write_results,
)

from pipeline.cache.reader import CachedTargets
from pipeline.cache.stream import DEFAULT_WINDOW, BlockShuffleSampler

SCALES = {"cifar100": (50_000, 100), "imagenet": (1_281_167, 1000)}
CONSUMER = 3000.0  # images/s of a ResNet-50 student on one H100
TARGET_X = 20.0

Batches = Iterator[np.ndarray]


def uniform_batches(n: int, batch: int, seed: int) -> Batches:
    """Endless batches of a fresh random permutation per epoch, as DataLoader(shuffle=True) draws them."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for s in range(0, n - batch + 1, batch):
            yield perm[s : s + batch]


def block_batches(n: int, batch: int, targets: CachedTargets, seed: int) -> Batches:
    """Endless batches of the block-shuffled order, one epoch after another; each epoch schedules the
    reader's prefetch (`BlockShuffleSampler` with targets)."""
    sampler = BlockShuffleSampler(np.arange(n), targets.chunk_rows, DEFAULT_WINDOW, seed, targets)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        it = iter(sampler)
        while chunk := list(itertools.islice(it, batch)):
            yield np.asarray(chunk)


def per_batch_reader(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The previous over-budget read: one orthogonal zarr read of the batch's unique rows."""
    import zarr

    arr = zarr.open_group(str(path), mode="r")["train"]

    def rows(idx: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(idx, return_inverse=True)
        return np.asarray(arr.oindex[uniq])[inverse, 0].astype(np.float32)

    return rows


def make_arms(path: Path, n: int, c: int, batch: int, budget: int) -> dict[str, tuple[Callable, Batches]]:
    """name -> (read function of a batch of row indices, its endless batches)."""
    args = (path, "train", FINGERPRINT, n, c)
    streaming = CachedTargets(*args, max_memory_bytes=budget)
    uniform = CachedTargets(*args, max_memory_bytes=budget)
    assert streaming.streaming, f"the store fits the {budget} B budget; lower --budget-mib"
    arms: dict[str, tuple[Callable, Batches]] = {
        "per-batch": (per_batch_reader(path), uniform_batches(n, batch, 1)),
        "streaming": (streaming.rows, block_batches(n, batch, streaming, 2)),
        "streaming, uniform order": (uniform.rows, uniform_batches(n, batch, 3)),
    }
    if n * c * 2 <= 2**30:
        mem = CachedTargets(*args)
        arms["in-memory"] = (mem.rows, uniform_batches(n, batch, 4))
    return arms


def check_rows(arms: dict[str, tuple[Callable, Batches]], n: int) -> None:
    """Every arm returns the same rows for the same indices (any order, repeats)."""
    idx = np.concatenate([np.random.default_rng(5).integers(0, n, 300), [0, n - 1, 7, 7]])
    want = np.asarray(arms["per-batch"][0](idx))
    for name, (read, _) in arms.items():
        got = np.asarray(read(idx))
        assert got.dtype == np.float32 and np.array_equal(got, want), f"{name} returns other rows"


def timed_arm(read: Callable, batches: Batches, seconds: float) -> tuple[Callable[[], None], int]:
    """(callable reading k batches, rows per call), k sized so that a call takes about `seconds`."""
    read(next(batches))
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < min(0.5, seconds) or k < 2:
        read(next(batches))
        k += 1
    k = int(min(20000, max(3, math.ceil(seconds / ((time.perf_counter() - t0) / k)))))
    rows = [0]

    def run() -> None:
        for _ in range(k):
            rows[0] = len(read(next(batches)))

    run()
    return run, k * rows[0]


def traced_peak_mib(make: Callable[[], tuple[Callable, Batches]], batches: int) -> float:
    """tracemalloc's peak (MiB) while a fresh reader is built and reads `batches` batches."""
    tracemalloc.start()
    read, it = make()
    for _ in range(batches):
        read(next(it))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def bench_scale(scale: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    n, c = SCALES[scale]
    if args.rows:
        n = min(n, args.rows)
    path = root / scale
    t0 = time.perf_counter()
    build_synthetic_store(path, n, c)
    build_s = time.perf_counter() - t0
    print(f"[{scale}] built {n} x {c} store in {build_s:.0f}s ({dir_bytes(path) / 2**20:.0f} MiB)", flush=True)
    budget = args.budget_mib * 2**20
    arms = make_arms(path, n, c, args.batch, budget)
    check_rows(arms, n)
    peaks = {
        name: traced_peak_mib(lambda name=name: make_arms(path, n, c, args.batch, budget)[name], args.mem_batches)
        for name in arms
    }
    print(f"[{scale}] traced peaks (MiB): {peaks}", flush=True)
    runs = {name: timed_arm(read, it, args.seconds) for name, (read, it) in arms.items()}
    print(f"[{scale}] {len(runs)} arms x {args.reps} rounds ...", flush=True)
    times = alternate({k: fn for k, (fn, _) in runs.items()}, args.reps, warmup=0)
    out: dict[str, Any] = {"rows": n, "classes": c, "build_s": build_s, "store_bytes": dir_bytes(path), "arms": {}}
    base = [runs["per-batch"][1] / t for t in times["per-batch"]]
    for name, (_, rows) in runs.items():
        rates = [rows / t for t in times[name]]
        out["arms"][name] = {
            "rows_per_s": median(rates),
            "x_consumer": median(rates) / CONSUMER,
            "x_per_batch": median([r / b for r, b in zip(rates, base, strict=True)]),
            "traced_peak_mib": peaks[name],
        }
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return out


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    parts = []
    for scale, s in res["scales"].items():
        parts.append(
            f"\n{scale}: {s['rows']:,} x {s['classes']} float16, {s['store_bytes'] / 2**20:.0f} MiB on disk, "
            f"reader budget {args.budget_mib} MiB, batch {args.batch}; x consumer = rows/s over "
            f"{CONSUMER:,.0f} images/s\n\n"
        )
        rows = [
            [
                name,
                m["rows_per_s"],
                m["x_per_batch"],
                m["x_consumer"],
                "MET" if m["x_consumer"] >= TARGET_X else "MISSED",
                m["traced_peak_mib"],
            ]
            for name, m in s["arms"].items()
        ]
        head = ["arm", "rows/s", "x per-batch", "x consumer", f">= {TARGET_X:.0f}x", "peak traced MiB"]
        parts.append(table(head, rows))
    return "".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="cifar100,imagenet", help="comma list of " + ", ".join(SCALES))
    ap.add_argument("--rows", type=int, default=0, help="cap the rows of every scale (0: the full scale)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--budget-mib", type=int, default=1, help="the reader's max_memory_bytes, below the store")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="target seconds per measurement")
    ap.add_argument("--mem-batches", type=int, default=100, help="batches read for the traced memory peak")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--workdir", default=None, help="temporary stores go here (ImageNet scale needs ~3 GiB)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    scales = [s for s in args.scales.split(",") if s]
    set_threads(args.threads)
    info = machine_info()
    t_start = time.perf_counter()
    need = sum(SCALES[s][0] * SCALES[s][1] * 2 for s in scales) + 2**30
    root = pick_workdir(args.workdir, need, "bancache-reader-")
    res: dict[str, Any] = {"scales": {s: bench_scale(s, root, args) for s in scales}}
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    res["peak_rss_mib"] = peak_rss_mib()
    res["targets"] = {
        f"{s} streaming >= {TARGET_X:.0f}x {CONSUMER:.0f}/s": r["arms"]["streaming"]["x_consumer"] >= TARGET_X
        for s, r in res["scales"].items()
    }
    text = report(res, args)
    wall = time.perf_counter() - t_start
    print(
        f"\nreader on {info['device_name']} ({info['cpus_usable']} CPUs), torch {info['torch']}, zarr {info['zarr']}, "
        f"{info['date_utc']}, medians of {args.reps} alternating rounds, {wall:.0f}s, peak RSS "
        f"{res['peak_rss_mib']:.0f} MiB\n{text}"
    )
    path = write_results(
        "reader",
        {"benchmark": "reader", "machine": info, "args": vars(args), "wall_s": wall, **res, "table_markdown": text},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
