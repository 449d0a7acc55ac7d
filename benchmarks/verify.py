"""Benchmark: what verification on read costs, as ratios to the same load without it.

Arms, run side by side in alternating rounds (medians of --reps):
  store (--rows x --classes float16 logits, chunks of 1024 rows, written with LogitStore.create/write/seal):
    reader, unverified   CachedTargets(verify=False) loading the split into memory (its first batch)
    reader, verified     the same with verify=True (the default): sha256 of each chunk while it loads
    blocks, unverified   LogitStore.blocks over the split (what ensemble, inspect and convert read)
    blocks, verified     the same, hashed and compared with the completion marker on the last block
    no zstd checksum     the unverified reader on the same rows written without zstd's content checksum
  dataset (--images 3x32x32 uint8 images, like CIFAR):
    load, unverified     load_prepared(verify=False)
    load, verified       load_prepared (the default): its fingerprint recomputed from the arrays read

Wall and CPU seconds are both reported (CPU time is less sensitive to other jobs on a shared machine).
The store was just written, so reads hit the page cache: the ratios are those of decoding and hashing, the
worst case for verification (from a cold disk the load takes longer and the hash's share shrinks).

    .venv/bin/python benchmarks/verify.py                 # 200k x 100 store, 20k images (~1-2 min)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from _benchlib import (
    FINGERPRINT,
    build_synthetic_store,
    machine_info,
    median,
    pick_workdir,
    set_threads,
    spread,
    synthetic_images,
    table,
    write_results,
)
from _benchlib import alternate as run_alternating
from zarr.codecs import ZstdCodec

from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import LogitStore
from pipeline.data.prepared import load_prepared, write_prepared


def store_arms(root: Path, rows: int, classes: int) -> dict[str, Any]:
    path, plain = root / "store", root / "store-no-checksum"
    build_synthetic_store(path, rows, classes)
    build_synthetic_store(plain, rows, classes, compressors=(ZstdCodec(level=0, checksum=False),))

    def reader(p: Path, verify: bool) -> Any:
        return lambda: CachedTargets(p, "train", FINGERPRINT, rows, classes, verify=verify).rows([0])

    def blocks(verify: bool) -> Any:
        return lambda: sum(len(b) for _, b in LogitStore.open(path, verify=verify).blocks("train"))

    return {
        "reader, unverified": reader(path, False),
        "reader, verified": reader(path, True),
        "blocks, unverified": blocks(False),
        "blocks, verified": blocks(True),
        "no zstd checksum": reader(plain, False),
    }


def dataset_arms(root: Path, images: int) -> dict[str, Any]:
    arrays = synthetic_images(images, images // 5, 10)
    path = root / "dataset.h5"
    write_prepared(path, arrays, [str(i) for i in range(10)], "synthetic", val_fraction=0.1, split_seed=0)
    return {
        "load, unverified": lambda: load_prepared(path, verify=False),
        "load, verified": lambda: load_prepared(path),
    }


def ratios(times: dict[str, list[float]], pairs: list[tuple[str, str]]) -> list[list[Any]]:
    """Per pair (arm, baseline): median seconds of both and the median of the per-round ratios."""
    out = []
    for arm, base in pairs:
        per_round = [a / b for a, b in zip(times[arm], times[base], strict=True)]
        lo, hi = spread(per_round)
        out.append([arm, base, median(times[arm]), median(times[base]), median(per_round), f"{lo:.2f}-{hi:.2f}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    info = machine_info()
    root = pick_workdir(args.workdir, 2**30, "bancache-verify-")
    try:
        print(f"[verify] store {args.rows} x {args.classes}, dataset {args.images} images ...", flush=True)
        arms = {**store_arms(root, args.rows, args.classes), **dataset_arms(root, args.images)}
        cpu: dict[str, list[float]] = {}
        times = run_alternating(arms, args.reps, cpu=cpu)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    pairs = [
        ("reader, verified", "reader, unverified"),
        ("blocks, verified", "blocks, unverified"),
        ("reader, unverified", "no zstd checksum"),
        ("load, verified", "load, unverified"),
    ]
    head = ["arm", "baseline", "arm s", "baseline s", "ratio (median per round)", "ratio [min, max]"]
    text = "wall time\n\n" + table(head, ratios(times, pairs))
    text += "\n\nCPU time of this process (less sensitive to other jobs on the machine)\n\n"
    text += table(head, ratios(cpu, pairs))
    print(f"\nverify: cost of verification on read, {args.reps} rounds, {info['date_utc']}\n\n{text}")
    payload = {"benchmark": "verify", "machine": info, "args": vars(args), "times": times, "cpu": cpu}
    path = write_results("verify", {**payload, "table_markdown": text})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
