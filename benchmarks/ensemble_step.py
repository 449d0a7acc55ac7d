"""Benchmark: what an ensemble-teacher student's epoch costs against a single-teacher student's (issue 24's
target: <= 1.05x on CPU at 3 members), and the memory the members add.

Arms (same architecture, data, batch size, optimizer, loss 'ban' at T = 1 and seed; one model per arm), each
one epoch of `pipeline.train.loop.train_one_epoch` over the library's batches:
  single           device-resident input, one teacher store (DeviceTargets)
  ensemble         device-resident input, an ensemble of --members stores (DeviceEnsemble, mean of p_T)
  ensemble-logits  the same members, mean of logits
  single-stream    the streaming path (DataLoader + loader_batches) over one store (CachedTargets)
  ensemble-stream  the streaming path over the members (EnsembleTargets)

All arms run in one process, alternating (order rotated every round), --reps rounds after one warm-up round;
medians of the epoch times and of the per-round ratios to `single` (resident) or `single-stream`. Memory:
the bytes of the teacher targets each arm holds (the resident tensors; `resident_bytes`, what the budget
counts), so the growth is the members' rows exactly; no model or batch memory differs between the arms.

Member stores are teacher-like synthetic logits (float16, as exports write them) over the dataset's train
rows, each with its own seed; what they contain does not change the cost of reading them.

    .venv/bin/python benchmarks/ensemble_step.py            # MNIST-1D, 4000 rows, cnn1d, 3 members
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _benchlib import (
    alternate,
    machine_info,
    median,
    pick_workdir,
    set_threads,
    spread,
    store_attributes,
    table,
    teacher_like_logits,
    write_dataset,
    write_results,
)

from pipeline.cache.device import device_targets, resident_bytes
from pipeline.cache.members import EnsembleTargets
from pipeline.cache.reader import CachedTargets
from pipeline.cache.store import LogitStore
from pipeline.data.prepared import IndexedDataset, PreparedData
from pipeline.models.registry import build_model
from pipeline.params import GenParams, TrainParams
from pipeline.train.epochs import EpochOrderSampler
from pipeline.train.inputs import loader_batches
from pipeline.train.loop import make_criterion, train_one_epoch
from pipeline.train.optim import make_optimizer
from pipeline.train.resident import ResidentInput

ARMS = ("single", "ensemble", "ensemble-logits", "single-stream", "ensemble-stream")


def write_members(root: Path, data: PreparedData, members: int) -> list[Path]:
    n, c = len(data.y_train), data.num_classes
    paths = []
    for j in range(members):
        z = teacher_like_logits(np.random.default_rng(j), n, c).astype(np.float16)
        z = z - z.max(axis=1, keepdims=True)  # the export's row_max shift of float16 stores
        attrs = {**store_attributes(c, data.fingerprint), "generation": j}
        store = LogitStore.create(root / f"gen-{j}", {"train": n}, c, 1, "float16", 1024, attrs)
        store.write("train", 0, z)
        store.seal()
        paths.append(root / f"gen-{j}")
    return paths


def make_arm(arm: str, data: PreparedData, stores: list[Path], args: argparse.Namespace) -> tuple[Any, int]:
    """(one epoch of `arm`, bytes of teacher targets it holds)."""
    device = torch.device("cpu")
    torch.manual_seed(1)
    model = build_model(args.arch, data.input_shape, data.num_classes)
    opt = make_optimizer(model, TrainParams())
    n, c = len(data.y_train), data.num_classes
    readers = [CachedTargets(p, "train", data.fingerprint, n, c) for p in (stores if "ensemble" in arm else stores[:1])]
    mode = "logits" if arm.endswith("logits") else "probs"
    targets = EnsembleTargets(readers, mode) if "ensemble" in arm else readers[0]
    crit = make_criterion(GenParams(loss="ban", teacher=0))
    gen = torch.Generator().manual_seed(0)
    held = resident_bytes(data, targets, False) - data.x_train.nbytes - data.y_train.nbytes
    if arm.endswith("-stream"):
        fit = IndexedDataset(data.x_train, data.y_train, data.fit_index())
        loader = torch.utils.data.DataLoader(fit, batch_size=args.batch_size, sampler=EpochOrderSampler(len(fit), gen))
        return (lambda: train_one_epoch(model, loader_batches(loader, device, targets, 1.0), opt, crit)), held
    res = ResidentInput(data, device, args.batch_size, gen, None)
    dev = device_targets(targets, device, data.fit_index(), all_views=False)
    return (lambda: train_one_epoch(model, res.epoch(0, dev, 1.0), opt, crit)), held


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    root = pick_workdir(args.workdir, 2**28, "bancache-ensemble-")
    try:
        data = write_dataset(root, "mnist1d", {})
        stores = write_members(root, data, args.members)
        arms, held = {}, {}
        for arm in ARMS:
            arms[arm], held[arm] = make_arm(arm, data, stores, args)
        print(f"timing {len(ARMS)} arms x {args.reps} rounds ...", flush=True)
        cpu: dict[str, list[float]] = {}
        times = alternate(arms, args.reps, warmup=1, cpu=cpu)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def paired(a: str, b: str, t: dict[str, list[float]] = times) -> float:
        return median([x / y for x, y in zip(t[a], t[b], strict=True)])

    out = {}
    for arm in ARMS:
        base = "single-stream" if arm.endswith("-stream") else "single"
        out[arm] = {
            "epoch_s_median": median(times[arm]),
            "epoch_s_min_max": spread(times[arm]),
            "epoch_s_all": times[arm],
            "ratio_vs_single": paired(arm, base),
            "cpu_ratio_vs_single": paired(arm, base, cpu),
            "teacher_bytes": held[arm],
            "teacher_bytes_over_single": held[arm] / held[base],
        }
    return {
        "members": args.members,
        "arch": args.arch,
        "batch_size": args.batch_size,
        "train_rows": len(data.y_train),
        "fit_rows": len(data.fit_index()),
        "num_classes": data.num_classes,
        "reps": args.reps,
        "arms": out,
        "target": "ensemble / single <= 1.05 (CPU, 3 members): "
        + ("met" if out["ensemble"]["ratio_vs_single"] <= 1.05 else "missed"),
    }


def report(res: dict[str, Any]) -> str:
    rows = [
        [arm, a["epoch_s_median"], a["ratio_vs_single"], a["cpu_ratio_vs_single"], a["teacher_bytes"] / 2**20]
        for arm, a in res["arms"].items()
    ]
    head = ["arm", "epoch s (median)", "wall / single", "CPU / single", "teacher MiB held"]
    return table(head, rows) + f"\n\n{res['target']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--arch", default="cnn1d")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="ensemble_step", help="results/<out>.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = {"machine": machine_info(), "args": vars(args), **run(args)}
    res["wall_s"] = time.perf_counter() - t0
    print(report(res))
    print(f"wrote {write_results(args.out, res)}")


if __name__ == "__main__":
    main()
