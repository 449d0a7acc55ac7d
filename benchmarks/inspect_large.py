"""Benchmark: `bancache inspect` on a synthetic 10^6 x 100 float16 store, to show it is streamed.

Builds, in a temporary directory, a project root holding a logit store (LogitStore.create/write/seal, one
chunk at a time) and a labels-only dataset file, then runs the `inspect` stage on it (the code behind
`bancache inspect --gen 0`, figures included) in a fresh process and reports its wall time and peak RSS
(resource.getrusage) against the store's size. A second, smaller store (--reference-rows) shows that the
peak memory does not grow with the number of rows.

    .venv/bin/python benchmarks/inspect_large.py                 # 10^6 train rows, 10^5 reference
    .venv/bin/python benchmarks/inspect_large.py --rows 100000   # quicker
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cache.store import LogitStore  # noqa: E402
from pipeline.core.paths import ProjectPaths  # noqa: E402
from pipeline.data.prepared import FORMAT as DATASET_FORMAT  # noqa: E402

FINGERPRINT = "00" * 32


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(root: Path, rows: int, test_rows: int, classes: int, chunk_rows: int, seed: int = 0) -> float:
    """Write cache/gen-0 and data/dataset.h5 (labels only) chunk by chunk; returns seconds taken."""
    t0 = time.perf_counter()
    layout = ProjectPaths(root)
    names = [f"class-{i}" for i in range(classes)]
    attrs = {
        "generation": 0,
        "arch": "synthetic",
        "seed": seed,
        "temperature": 1.0,
        "checkpoint_sha256": "00" * 32,
        "dataset_fingerprint": FINGERPRINT,
        "class_names": names,
        "loss": "ce",
        "teacher": None,
    }
    splits = {"train": rows, "test": test_rows}
    store = LogitStore.create(layout.store(0), splits, classes, 1, "float16", chunk_rows, attrs)
    rng = np.random.default_rng(seed)
    layout.dataset.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(layout.dataset, "w") as f:
        f.attrs.update(
            format=DATASET_FORMAT,
            class_names=json.dumps(names),
            fingerprint=FINGERPRINT,
            num_classes=classes,
            dataset="synthetic",
        )
        for split, n in splits.items():
            y_ds = f.create_dataset(f"y_{split}", shape=(n,), dtype=np.int64)
            for start in range(0, n, chunk_rows):
                b = min(chunk_rows, n - start)
                y = rng.integers(0, classes, b)
                logits = rng.normal(0.0, 2.0, (b, classes)).astype(np.float32)
                # A teacher that is right ~90% of the time, confidently, with some dark knowledge.
                pred = np.where(rng.random(b) < 0.9, y, rng.integers(0, classes, b))
                logits[np.arange(b), pred] += rng.uniform(2.0, 12.0, b)
                store.write(split, start, logits.astype(np.float16))
                y_ds[start : start + b] = y
    store.seal()
    return time.perf_counter() - t0


def _inspect_child(root: str, queue: mp.Queue) -> None:
    from stages import audit as stage
    from stages.common import ParamsFile

    baseline = _peak_rss_mib()  # interpreter and imports (numpy, zarr, h5py, torch, matplotlib)
    t0 = time.perf_counter()
    m = stage.run(ParamsFile({"inspect": {}}), ProjectPaths(Path(root)), 0)
    queue.put(
        {
            "seconds": time.perf_counter() - t0,
            "baseline_rss_mib": baseline,
            "peak_rss_mib": _peak_rss_mib(),
            "train_accuracy": m["train"]["accuracy"],
            "ece": m["test"]["ece"],
            "likely_noisy": m["train"]["likely_noisy"],
        }
    )


def measure(rows: int, classes: int, chunk_rows: int, workdir: Path) -> dict[str, Any]:
    root = workdir / f"rows-{rows}"
    test_rows = max(rows // 10, 1)
    build_s = build(root, rows, test_rows, classes, chunk_rows)
    disk = sum(p.stat().st_size for p in (root / "cache").rglob("*") if p.is_file())
    ctx = mp.get_context("spawn")  # a fresh process, so its peak RSS is the inspection's alone
    queue: mp.Queue = ctx.Queue()
    child = ctx.Process(target=_inspect_child, args=(str(root), queue))
    child.start()
    result = queue.get()
    child.join()
    shutil.rmtree(root, ignore_errors=True)
    logical = (rows + test_rows) * classes * 2  # float16 bytes of both splits, uncompressed
    extra = result["peak_rss_mib"] - result["baseline_rss_mib"]
    return {
        "rows_train": rows,
        "rows_test": test_rows,
        "classes": classes,
        "chunk_rows": chunk_rows,
        "store_mib": logical / 2**20,
        "store_on_disk_mib": disk / 2**20,
        "build_seconds": build_s,
        "inspect_seconds": result["seconds"],
        "rows_per_second": (rows + test_rows) / result["seconds"],
        "baseline_rss_mib": result["baseline_rss_mib"],
        "peak_rss_mib": result["peak_rss_mib"],
        "inspect_rss_mib": extra,
        "inspect_rss_over_store": extra / (logical / 2**20),
        "train_accuracy": result["train_accuracy"],
        "ece": result["ece"],
        "likely_noisy": result["likely_noisy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="train rows (test gets rows // 10)")
    ap.add_argument("--reference-rows", type=int, default=None, help="smaller second run (default rows // 10; 0: none)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--chunk-rows", type=int, default=1024, help="rows per zarr chunk (export's default)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inspect_large.json")
    args = ap.parse_args()
    ref = args.rows // 10 if args.reference_rows is None else args.reference_rows
    sizes = [r for r in (ref, args.rows) if r > 0]
    with tempfile.TemporaryDirectory(prefix="bancache-inspect-bench-") as tmp:
        runs = [measure(r, args.classes, args.chunk_rows, Path(tmp)) for r in sizes]
    cols = [
        ("rows_train", "train rows", "d"),
        ("store_mib", "store MiB", ".1f"),
        ("store_on_disk_mib", "on disk MiB", ".1f"),
        ("inspect_seconds", "inspect s", ".1f"),
        ("rows_per_second", "rows/s", ".0f"),
        ("baseline_rss_mib", "base RSS MiB", ".0f"),
        ("peak_rss_mib", "peak RSS MiB", ".0f"),
        ("inspect_rss_mib", "inspect RSS MiB", ".0f"),
        ("inspect_rss_over_store", "RSS/store", ".3f"),
    ]
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in runs:
        print("| " + " | ".join(format(r[k], f) for k, _, f in cols) + " |")
    report = {
        "machine": {"python": platform.python_version(), "processor": platform.processor(), "cpus": mp.cpu_count()},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
