"""Experiment (issue 12, README Results (b)): is the born-again gain more than the chain's extra compute?

Control-k (`bancache sweep --controls`) trains as long as BAN-k, but the chain behind BAN-k has spent k + 1
trainings (the teacher, then every student up to k). This script trains the compute-matched control: the
same network from labels only, with generation k's seed (so the same initial weights), the same recipe,
and (k + 1) times the epochs (one-cycle stretches with them). It pairs each with BAN-k and control-k of
the same seed from a sweep's JSON and prints BAN-k minus long-control-k with its 95% t-interval.

    .venv/bin/python benchmarks/long_controls.py --params configs/cifar10-cpu.yaml --seeds 1,2,3,4,5 \\
        --sweep benchmarks/results/controls_cifar10_cpu.json          # about 11 min per seed on 2 cores
    .venv/bin/python benchmarks/long_controls.py --quick               # MNIST-1D, 2 seeds, a minute

The sweep JSON must come from the same params and seeds (`bancache sweep --controls --seeds ...`):
seed s trains with train.seed = 100 * s, as the sweep does.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

from _benchlib import machine_info, pick_workdir, table, write_results

from pipeline.api import prepare_data
from pipeline.core.devices import resolve_device
from pipeline.data.prepared import load_prepared
from pipeline.losses import loss_columns
from pipeline.models.predict import accuracy, predict_logits
from pipeline.params import DataParams, TrainParams, parse_chain, parse_section
from pipeline.results.columns import Column, Control, Generation, parse_columns
from pipeline.results.paired import format_diff, paired_columns
from pipeline.train.controls import train_control
from stages.common import ParamsFile
from stages.progress import Progress
from stages.train import epoch_hook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="configs/cifar10-cpu.yaml")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--gens", default=None, help="student generations (default: every one in the params)")
    ap.add_argument("--sweep", default=None, help="sweep.json of the same params and seeds (BAN-k, control-k)")
    ap.add_argument("--dataset", default=None, help="a prepared dataset.h5 (default: prepare it from the params)")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (the per-generation epochs)")
    ap.add_argument("--quick", action="store_true", help="MNIST-1D, 2 seeds, 3 epochs, no sweep pairing")
    ap.add_argument("--name", default=None, help="results file name (default long_controls_<params stem>)")
    args = ap.parse_args()

    params = ParamsFile.load(args.params)
    raw = copy.deepcopy(params.raw)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        raw["data"] = {"dataset": "mnist1d", "num_samples": 600}
        args.epochs, seeds = 3, seeds[:2]
    if args.epochs is not None:
        raw.setdefault("train", {})["epochs"] = args.epochs
    chain = parse_chain(raw.get("gen0"), raw.get("students"))
    gens = [int(g) for g in args.gens.split(",")] if args.gens else sorted(g for g in chain.gens if g >= 1)

    work = pick_workdir(None, 500 * 2**20, "long_controls-")
    dataset = Path(args.dataset) if args.dataset else work / "dataset.h5"
    if not args.dataset:
        prepare_data(dataset, params=parse_section(DataParams, "data", raw.get("data")))
    data = load_prepared(dataset)

    sweep: dict[int, dict[Column, float]] = {}
    if args.sweep:
        record = json.loads(Path(args.sweep).read_text())
        runs_read = [parse_columns(r, loss_columns(), where=args.sweep) for r in record["runs"]]
        sweep = dict(zip(record["seeds"], runs_read, strict=True))
        missing = [s for s in seeds if s not in sweep]
        if missing:
            raise SystemExit(f"{args.sweep}: no run for seeds {missing}; pass the sweep of the same seeds")

    runs: list[dict[str, Any]] = []
    epochs_per_gen = parse_section(TrainParams, "train", raw["train"]).epochs
    for seed in seeds:
        run: dict[str, Any] = {"seed": seed}
        for gen in gens:
            train = {**raw["train"], "seed": 100 * seed, "epochs": (gen + 1) * epochs_per_gen}
            recipe = parse_section(TrainParams, "train", train)
            t0 = time.perf_counter()
            with Progress(f"seed {seed} long control {gen}", recipe.epochs, unit="epoch", lines=10) as bar:
                model = train_control(data, recipe, gen, chain.gens[gen], epoch_hook(bar)).model
            logits = predict_logits(model, data.x_test, recipe.eval_batch_size, resolve_device(recipe.device))
            run[f"Long-control-{gen}"] = accuracy(logits, data.y_test)
            run[f"long_control_{gen}_epochs"] = recipe.epochs
            run[f"long_control_{gen}_seconds"] = round(time.perf_counter() - t0, 1)
            if seed in sweep:
                for col in (Generation(gen), Control(gen)):
                    run[col.label] = sweep[seed][col]
            print(f"seed {seed}: {run}", flush=True)
        runs.append(run)
        write_results(
            args.name or f"long_controls_{Path(args.params).stem}",
            _payload(args, raw, seeds, gens, runs, len(data.y_test)),
        )

    rows = []
    for gen in gens:
        longc = [r[f"Long-control-{gen}"] for r in runs]
        row = [gen, f"{(gen + 1)}x", f"{100 * sum(longc) / len(longc):.2f}"]
        if sweep:
            longk = f"Long-control-{gen}"
            row += [
                format_diff(paired_columns(runs, Generation(gen).label, longk)),
                format_diff(paired_columns(runs, longk, Control(gen).label)),
            ]
        rows.append(row)
    headers = ["k", "epochs", "Long-control-k %"]
    if sweep:
        headers += ["BAN-k - Long-control-k", "Long-control-k - Control-k"]
    print(f"\n{len(runs)} seeds, {len(data.y_test)} test rows; differences in points, mean [95% t-interval]")
    print(table(headers, rows))
    shutil.rmtree(work, ignore_errors=True)


def _payload(
    args: argparse.Namespace,
    raw: dict[str, Any],
    seeds: list[int],
    gens: list[int],
    runs: list[dict[str, Any]],
    num_test: int,
) -> dict[str, Any]:
    return {
        "params": args.params,
        "sweep": args.sweep,
        "seeds": seeds[: len(runs)],
        "gens": gens,
        "num_test": num_test,
        "train": raw["train"],
        "runs": runs,
        "machine": machine_info(),
    }


if __name__ == "__main__":
    main()
