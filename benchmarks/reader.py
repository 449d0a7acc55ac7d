"""Benchmark: how fast the logit cache streams shuffled rows, against how fast a student consumes them.

1. Student consumption: samples/s of one training step (forward, backward, Adam step; batch 128, inputs
   already in memory, so an upper bound on what a student can take) for cnn1d on MNIST-1D and for small
   ResNet-style CNNs on 32x32x3 images (benchmarks/_benchlib.py; pipeline's resnet20 when available).
2. Reader rows/s on synthetic teacher-like float16 logits written with LogitStore.create/write/seal (the
   library's layout: chunks of 1024 rows, zarr's default zstd) at CIFAR-100 scale (50,000 x 100) and
   ImageNet-1k scale (1,281,167 x 1000, 2.4 GiB), batches of 128 and 256 random row indices drawn as a
   shuffled DataLoader draws them. Arms (benchmarks/_prototypes.py), alternating, medians of --reps:
     current       pipeline.reader.CachedTargets.rows
     handle        the same read path with the zarr array handle opened once, not once per batch
     in-memory     the split read once into RAM, batches gathered with numpy (the recommended change)
     block-shuffle quasi-random order (chunks shuffled, rows shuffled within windows of 16 chunks) and an LRU
                   of decoded chunks: one decode per chunk per epoch, for stores larger than RAM
   plus, at CIFAR scale, other zarr layouts read by the current reader (smaller chunks, sharding with
   16-row inner chunks, no compression).
3. Growth: current vs in-memory rows/s as the number of rows N and classes C grow.

Reads hit the page cache (the stores were just written): the current reader's cost is decoding, not I/O.
Each measurement reads a fixed number of batches sized to take about --seconds, so ImageNet scale fits in
the default run.

    .venv/bin/python benchmarks/reader.py                       # both scales, growth table (~6-8 min)
    .venv/bin/python benchmarks/reader.py --scales cifar100     # quick
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _benchlib import (
    FINGERPRINT,
    alternate,
    build_synthetic_store,
    dir_bytes,
    dir_files,
    machine_info,
    median,
    pick_workdir,
    rss_mib,
    set_threads,
    table,
    write_results,
)
from _prototypes import BlockShuffleSampler, ChunkCacheTargets, HandleTargets, InMemoryTargets

from pipeline.models import ARCHS, build_model
from pipeline.params import TrainParams
from pipeline.reader import CachedTargets
from pipeline.train import make_optimizer

SCALES = {"cifar100": (50_000, 100), "imagenet": (1_281_167, 1000)}
WINDOW = 16  # chunks per block-shuffle window (16 x 1024 rows)
TARGET_X = 20.0
REFERENCE_CONSUMER = "bench_resnet8"  # the "ResNet-ish small CNN" of the 20x target


# -- 1. student consumption -----------------------------------------------------------------------------
def consumers(classes: list[int]) -> list[tuple[str, tuple[int, ...], int]]:
    out: list[tuple[str, tuple[int, ...], int]] = [("cnn1d", (1, 40), 10)]
    for c in classes:
        out += [("bench_cnn2d", (3, 32, 32), c), ("bench_resnet8", (3, 32, 32), c)]
    try:
        import pipeline.cifar_models  # noqa: F401  (registers resnet20 & co. when that module exists)
    except ImportError:
        pass
    if "resnet20" in ARCHS:
        out.append(("resnet20", (3, 32, 32), classes[0]))
    return out


def consumer_step(arch: str, shape: tuple[int, ...], classes: int, batch: int = 128) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, Adam) on a fixed in-memory batch."""
    torch.manual_seed(0)
    model = build_model(arch, shape, classes)
    opt = make_optimizer(model, TrainParams())
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    return step


def consumer_arm(
    arch: str, shape: tuple[int, ...], classes: int, seconds: float, batch: int = 128
) -> tuple[Callable[[], None], int]:
    """(callable running k steps, samples per call), k sized so that a call takes about `seconds`."""
    step = consumer_step(arch, shape, classes, batch)
    t0 = time.perf_counter()
    step()
    k = max(1, round(seconds / (time.perf_counter() - t0)))

    def run() -> None:
        for _ in range(k):
            step()

    return run, k * batch


def measure_consumption(
    specs: list[tuple[str, tuple[int, ...], int]], reps: int, seconds: float, batch: int = 128
) -> dict[str, dict[str, Any]]:
    arms = {f"{a}/C={c}": consumer_arm(a, sh, c, seconds, batch) for a, sh, c in specs}
    rates = measure_rates(arms, reps)
    return {
        k: {"step_ms": 1e3 * batch / r["per_s"], "samples_per_s": r["per_s"], "batch": batch} for k, r in rates.items()
    }


def measure_rates(arms: dict[str, tuple[Callable[[], None], int]], reps: int) -> dict[str, dict[str, Any]]:
    """Items/s of each arm (callable, items per call), alternating; per-round rates kept for pairing."""
    times = alternate({k: fn for k, (fn, _) in arms.items()}, reps, warmup=0)
    return {
        k: {"per_s": arms[k][1] / median(t), "per_s_rounds": [arms[k][1] / x for x in t], "items_per_call": arms[k][1]}
        for k, t in times.items()
    }


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over rounds of rate_a / rate_b, both measured in the same round."""
    return median([x / y for x, y in zip(a["per_s_rounds"], b["per_s_rounds"], strict=True)])


# -- 2. reader ------------------------------------------------------------------------------------------
def shuffled_batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of a fresh random permutation per epoch, as DataLoader(shuffle=True) draws them."""
    while True:
        perm = rng.permutation(n)
        for s in range(0, n - batch + 1, batch):
            yield perm[s : s + batch]


def block_batches(n: int, batch: int, chunk_rows: int, seed: int) -> Iterator[np.ndarray]:
    sampler = BlockShuffleSampler(np.arange(n), chunk_rows, WINDOW, torch.Generator().manual_seed(seed))
    while True:
        it = iter(sampler)
        while chunk := list(itertools.islice(it, batch)):
            yield np.asarray(chunk)


def reader_arm(targets: CachedTargets, batches: Iterator[np.ndarray], seconds: float) -> tuple[Callable[[], None], int]:
    """(callable reading k batches, rows per call), k sized so that a call takes about `seconds` (k >= 3)."""
    targets.rows(next(batches))
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < min(0.3, seconds) or k < 2:
        first = targets.rows(next(batches))
        k += 1
    k = int(min(5000, max(3, math.ceil(seconds / ((time.perf_counter() - t0) / k)))))

    def run() -> None:
        for _ in range(k):
            targets.rows(next(batches))

    return run, k * len(first)


def open_arms(path: Path, n: int, c: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The four reader arms on one store, and facts about loading the in-memory table."""
    args = (path, "train", FINGERPRINT, n, c)
    mem = InMemoryTargets(*args)
    rss0, t0 = rss_mib(), time.perf_counter()
    mem.load()
    facts = {
        "in_memory_load_s": time.perf_counter() - t0,
        "in_memory_rss_added_mib": rss_mib() - rss0,
        "in_memory_table_mib": mem.load().numel() * mem.load().element_size() / 2**20,
    }
    chunk_rows = int(CachedTargets(*args).check().array("train").chunks[0])
    return {
        "current": CachedTargets(*args),
        "handle": HandleTargets(*args),
        "in-memory": mem,
        "block-shuffle": ChunkCacheTargets(*args, capacity=WINDOW + 2),
        "_chunk_rows": chunk_rows,
    }, facts


def self_check(objs: dict[str, CachedTargets], n: int, chunk_rows: int) -> None:
    """Every prototype returns the current reader's rows (any order, repeats), and the block-shuffle order
    is a permutation of all rows: the arms compare equal work."""
    rng = np.random.default_rng(123)
    idx = np.concatenate([rng.integers(0, n, 300), [0, n - 1, 5, 5]])
    want = objs["current"].rows(idx)
    for name, t in objs.items():
        got = t.rows(idx)
        assert got.dtype == torch.float32 and torch.equal(got, want), f"{name} returns other rows"
    if n <= 100_000:
        order = list(BlockShuffleSampler(np.arange(n), chunk_rows, WINDOW, torch.Generator().manual_seed(0)))
        assert sorted(order) == list(range(n)), "block-shuffle order is not a permutation"


def bench_scale(scale: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    n, c = SCALES[scale]
    path = root / f"{scale}-default"
    t0 = time.perf_counter()
    build_synthetic_store(path, n, c)
    build_s = time.perf_counter() - t0
    print(f"[{scale}] built {n} x {c} store in {build_s:.1f}s ({dir_bytes(path) / 2**20:.0f} MiB)", flush=True)
    objs, facts = open_arms(path, n, c, 0)
    chunk_rows = objs.pop("_chunk_rows")
    self_check(objs, n, chunk_rows)
    layouts: dict[str, Path] = {}
    if scale == "cifar100" and not args.no_layouts:
        specs = {
            "chunks 64 rows": {"chunk_rows": 64},
            "chunks 1024 rows, no compression": {"chunk_rows": 1024, "compressors": None},
            "shards 1024 rows, inner chunks 16 rows": {"chunk_rows": 16, "shards": (1024, 1, c)},
        }
        for label, kw in specs.items():
            p = root / f"{scale}-{label.replace(' ', '_').replace(',', '')}"
            t1 = time.perf_counter()
            build_synthetic_store(p, n, c, **kw)
            print(f"[{scale}] built layout '{label}' in {time.perf_counter() - t1:.1f}s", flush=True)
            layouts[label] = p
    out: dict[str, Any] = {
        "rows": n,
        "classes": c,
        "chunk_rows": chunk_rows,
        "build_s": build_s,
        "store_bytes": dir_bytes(path),
        "store_files": dir_files(path),
        **facts,
        "by_batch": {},
        "layouts": {},
    }
    for batch in args.batches:
        rng = np.random.default_rng(batch)
        shuffled = functools.partial(shuffled_batches, n, batch, rng)
        blocks = functools.partial(block_batches, n, batch, chunk_rows, 0)
        arms = {name: (t, blocks if name == "block-shuffle" else shuffled) for name, t in objs.items()}
        for label, p in layouts.items():
            arms[f"current on '{label}'"] = (CachedTargets(p, "train", FINGERPRINT, n, c), shuffled)
        runs = {name: reader_arm(t, make(), args.seconds) for name, (t, make) in arms.items()}
        # The consumers run in the same rotation, so every reader/consumer ratio is paired within a round.
        cons = {REFERENCE_CONSUMER: (REFERENCE_CONSUMER, (3, 32, 32), c), "cnn1d": ("cnn1d", (1, 40), 10)}
        for label, spec in cons.items():
            runs[f"consumer {label}"] = consumer_arm(*spec, seconds=args.seconds)
        print(f"[{scale}] batch {batch}: {len(runs)} arms x {args.reps} rounds ...", flush=True)
        rates = measure_rates(runs, args.reps)
        res_b = {}
        for name in arms:
            r = rates[name]
            res_b[name] = {
                "rows_per_s": r["per_s"],
                "ms_per_batch": 1e3 * batch / r["per_s"],
                "rows_per_call": r["items_per_call"],
                **{f"x_{label}": paired_ratio(r, rates[f"consumer {label}"]) for label in cons},
            }
        res_b["block-shuffle"]["chunks_decoded_so_far"] = objs["block-shuffle"].decoded  # type: ignore[attr-defined]
        res_b["_consumers_samples_per_s"] = {label: rates[f"consumer {label}"]["per_s"] for label in cons}
        out["by_batch"][str(batch)] = res_b
    for label, p in layouts.items():
        out["layouts"][label] = {"bytes": dir_bytes(p), "files": dir_files(p)}
    if not args.keep:
        for p in [path, *layouts.values()]:
            shutil.rmtree(p, ignore_errors=True)
    return out


def decoded_per_row(n: int, c: int, batch: int, chunk_rows: int = 1024, itemsize: int = 2) -> float:
    """Expected bytes the current reader decompresses per requested row: a batch of `batch` uniform random
    rows touches E = K (1 - (1 - 1/K)^batch) of the K chunks, each decoded whole."""
    k = math.ceil(n / chunk_rows)
    touched = k * (1 - (1 - 1 / k) ** batch)
    return touched * min(chunk_rows, n) * c * itemsize / batch


# -- 3. growth ------------------------------------------------------------------------------------------
def bench_growth(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n, c in itertools.product(args.growth_rows, args.growth_classes):
        if n * c > 2e8:  # 1M x 1000 is the ImageNet row of the scale table
            continue
        p = root / f"growth-{n}-{c}"
        build_synthetic_store(p, n, c)
        a = (p, "train", FINGERPRINT, n, c)
        mem = InMemoryTargets(*a)
        mem.load()
        shuffled = functools.partial(shuffled_batches, n, 256, np.random.default_rng(0))
        arms = {"current": (CachedTargets(*a), shuffled), "in-memory": (mem, shuffled)}
        runs = {name: reader_arm(t, make(), args.seconds / 2) for name, (t, make) in arms.items()}
        r = measure_rates(runs, max(3, args.reps - 2))
        rows.append(
            {
                "rows": n,
                "classes": c,
                "current_rows_per_s": r["current"]["per_s"],
                "in_memory_rows_per_s": r["in-memory"]["per_s"],
                "decoded_bytes_per_row_current": decoded_per_row(n, c, 256),
            }
        )
        print(f"[growth] N={n} C={c}: current {r['current']['per_s']:.0f} rows/s", flush=True)
        shutil.rmtree(p, ignore_errors=True)
    return rows


# -- report ---------------------------------------------------------------------------------------------
def report(res: dict[str, Any]) -> str:
    cons = res["consumption"]
    parts = [
        "Student consumption (one training step, batch 128, inputs in memory; measured on its own):\n\n",
        table(
            ["model / classes", "step ms", "samples/s"],
            [[k, v["step_ms"], v["samples_per_s"]] for k, v in cons.items()],
        ),
    ]
    for scale, s in res["scales"].items():
        rows = []
        for batch, arms in s["by_batch"].items():
            c_ref = arms["_consumers_samples_per_s"]
            for arm, m in arms.items():
                if arm.startswith("_"):
                    continue
                x_ref = m[f"x_{REFERENCE_CONSUMER}"]
                met = "MET" if x_ref >= TARGET_X else "MISSED"
                rows.append([batch, arm, m["rows_per_s"], m["ms_per_batch"], x_ref, m["x_cnn1d"], met])
            seen = f"{REFERENCE_CONSUMER} {c_ref[REFERENCE_CONSUMER]:,.0f}/s, cnn1d {c_ref['cnn1d']:,.0f}/s"
            rows.append([batch, f"(consumers in these rounds: {seen})", "", "", "", "", ""])
        parts.append(
            f"\n\n{scale}: {s['rows']:,} x {s['classes']} float16, chunks of {s['chunk_rows']} rows, "
            f"{s['store_bytes'] / 2**20:.0f} MiB in {s['store_files']} files, built in {s['build_s']:.0f}s; "
            f"in-memory table {s['in_memory_table_mib']:.0f} MiB loaded in {s['in_memory_load_s']:.1f}s. "
            f"x = reader rows/s over consumer samples/s, paired per round ({REFERENCE_CONSUMER} with "
            f"{s['classes']} classes, cnn1d with 10)\n\n"
        )
        parts.append(
            table(
                [
                    "batch",
                    "arm",
                    "rows/s",
                    "ms/batch",
                    f"x {REFERENCE_CONSUMER}",
                    "x cnn1d",
                    f">= {TARGET_X:.0f}x {REFERENCE_CONSUMER}",
                ],
                rows,
            )
        )
    if res.get("growth"):
        parts.append("\n\nGrowth (current reader vs in-memory, batch 256, rows/s):\n\n")
        parts.append(
            table(
                ["N", "C", "current", "in-memory", "current: bytes decoded per row"],
                [
                    [
                        g["rows"],
                        g["classes"],
                        g["current_rows_per_s"],
                        g["in_memory_rows_per_s"],
                        g["decoded_bytes_per_row_current"],
                    ]
                    for g in res["growth"]
                ],
            )
        )
    return "".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="cifar100,imagenet", help="comma list of " + ", ".join(SCALES))
    ap.add_argument("--batches", default="128,256")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="target seconds per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-layouts", action="store_true", help="skip the alternative zarr layouts")
    ap.add_argument("--no-growth", action="store_true")
    ap.add_argument("--growth-rows", default="10000,100000,1000000")
    ap.add_argument("--growth-classes", default="10,100,1000")
    ap.add_argument("--workdir", default=None, help="temporary stores go here (ImageNet scale needs ~3 GiB)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.growth_rows = [int(b) for b in args.growth_rows.split(",")]
    args.growth_classes = [int(b) for b in args.growth_classes.split(",")]
    scales = [s for s in args.scales.split(",") if s]
    set_threads(args.threads)
    info = machine_info()
    t_start = time.perf_counter()
    need = sum(SCALES[s][0] * SCALES[s][1] * 2 for s in scales) + 2**30
    root = pick_workdir(args.workdir, need, "bancache-reader-")
    print("[consumption] measuring student steps ...", flush=True)
    classes = sorted({SCALES[s][1] for s in scales})
    res: dict[str, Any] = {"consumption": measure_consumption(consumers(classes), args.reps, args.seconds)}
    res["scales"] = {s: bench_scale(s, root, args) for s in scales}
    res["growth"] = [] if args.no_growth else bench_growth(root, args)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    res["targets"] = {}
    for s, r in res["scales"].items():
        ref = f"{REFERENCE_CONSUMER}/C={r['classes']}"
        for batch, arms in r["by_batch"].items():
            for arm, m in arms.items():
                if not arm.startswith("_"):
                    res["targets"][f"{s} batch {batch} {arm} >= {TARGET_X:.0f}x {ref}"] = (
                        m[f"x_{REFERENCE_CONSUMER}"] >= TARGET_X
                    )
    text = report(res)
    wall = time.perf_counter() - t_start
    print(
        f"\nreader on {info['cpu_model']} ({info['cpus_usable']} CPUs), torch {info['torch']}, zarr {info['zarr']}, "
        f"{info['date_utc']}, medians of {args.reps} alternating rounds, {wall:.0f}s\n\n{text}"
    )
    path = write_results(
        "reader",
        {"benchmark": "reader", "machine": info, "args": vars(args), "wall_s": wall, **res, "table_markdown": text},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
