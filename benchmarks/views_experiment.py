"""Experiment (issue 7, acceptance 2): do augmentation-consistent cached views close the gap between offline
and online distillation, and what do sparse layouts cost in accuracy for the bytes they save?

Arms (one teacher, trained once from labels; every student has the same architecture, recipe, epochs and
seed; BAN loss at T = 1):
  online        the teacher in memory: each batch is augmented live and the teacher's output on that very
                batch is the target (the consistent reference; two models in memory)
  offline-v1    today's cache: V = 1 clean view, the student augments live (teacher and student disagree
                on the view: Beyer et al. 2022)
  offline-v4, offline-v16   V views cached, the student replays a stored view (view_policy, default random)
  topk1, topk3  the largest V's views, only the k largest logits kept (topk_rest uniform)
  sampled       the largest V's views, class counts of --samples draws from the teacher distribution
Reported per arm, mean and std over --seeds: student test accuracy, cache bytes per train sample (whole
store directory / train rows, both splits included as exported) and median epoch seconds.

    .venv/bin/python benchmarks/views_experiment.py --quick      # tiny synthetic uint8 images, minutes on a CPU
    .venv/bin/python benchmarks/views_experiment.py --root ../shared/data/cifar10-jpeg --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from _benchlib import dir_bytes, machine_info, pick_workdir, set_threads, table, write_results

from pipeline.core.devices import resolve_device
from pipeline.data.augment import augment_batch
from pipeline.data.prepared import IndexedDataset, PreparedData, load_prepared, write_prepared
from pipeline.data.sources import load_dataset
from pipeline.losses import generation_loss
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.models.predict import predict_accuracy
from pipeline.models.registry import ImageInput, build_model
from pipeline.params import ExportParams, GenParams, TrainParams
from pipeline.teachers.export import export_logits
from pipeline.train.loop import (
    checkpoint_meta,
    make_optimizer,
    make_scheduler,
    save_generation,
    seed_everything,
    train_generation,
)


def synthetic_uint8(n_train: int, n_test: int, classes: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable uint8 images: a random template per class, shifted and noised per image."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(40, 215, size=(classes, 3, size, size))
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % classes
        x = templates[y] + rng.normal(0, 40, size=(n, 3, size, size))
        out[f"x_{split}"] = np.clip(x, 0, 255).astype(np.uint8)
        out[f"y_{split}"] = y.astype(np.int64)
    return out


def arms(views: list[int], sparse_views: int, samples: int, policy: str) -> dict[str, dict[str, Any]]:
    """name -> (export params overrides, student view policy); 'online' has no store."""
    out: dict[str, dict[str, Any]] = {"online": {}, "offline-v1": {"export": {"views": 1}, "policy": "clean"}}
    for v in views:
        out[f"offline-v{v}"] = {"export": {"views": v}, "policy": policy}
    for k in (1, 3):
        out[f"topk{k}"] = {"export": {"views": sparse_views, "layout": "topk", "topk": k}, "policy": policy}
    out["sampled"] = {"export": {"views": sparse_views, "layout": "sampled", "samples": samples}, "policy": policy}
    return out


def online_student(
    data: PreparedData, recipe: TrainParams, teacher: torch.nn.Module, seed: int, device: torch.device
) -> tuple[float, list[float]]:
    """BAN student with the teacher in memory, on the same live-augmented batch; (test accuracy, epoch s)."""
    generator = seed_everything(seed, recipe.deterministic)
    model = build_model(recipe.arch, data.input_shape, data.num_classes)
    if isinstance(model, ImageInput) and data.channel_mean is not None and data.channel_std is not None:
        model.set_stats(data.channel_mean, data.channel_std)
    model = model.to(device)
    teacher.eval()
    aug_gen = torch.Generator().manual_seed(seed + 7919)
    loader = torch.utils.data.DataLoader(
        IndexedDataset(data.x_train, data.y_train, data.fit_index()),
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=generator,
    )
    opt, size = make_optimizer(model, recipe), data.x_train.shape[-1]
    sched = make_scheduler(opt, recipe)
    seconds = []
    for _ in range(recipe.epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y, _index in loader:
            x = augment_batch(x, aug_gen, pad=4, size=size).to(device)
            y = y.to(device)
            with torch.no_grad():
                t = teacher(x)
            loss = generation_loss("ban", model(x), t, y, generator=generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        seconds.append(time.perf_counter() - t0)
    _, acc = predict_accuracy(model, data.x_test, data.y_test, recipe.eval_batch_size, device)
    return acc, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny synthetic images, 2 epochs: proves the script runs")
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg", help="npz folder (train.npz, test.npz)")
    ap.add_argument("--n-train", type=int, default=None, help="balanced subset of the train rows (default: all)")
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--views", default="4,16")
    ap.add_argument("--policy", default="random", choices=("cycle", "random"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    set_threads(2)
    views = [int(v) for v in args.views.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = TrainParams(
        arch=args.arch,
        epochs=args.epochs,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        device=args.device,
    )
    if args.quick:
        views, recipe = [2, 4], replace(recipe, arch="cnn3", epochs=2, batch_size=32, lr=0.05, device="cpu")
    work = pick_workdir(args.workdir, 2 << 30, "views-exp-")
    if args.quick:
        arrays, names = synthetic_uint8(320, 80, 4, 16), ["a", "b", "c", "d"]
    else:
        loaded = load_dataset("npz", args.root, n_train=args.n_train)
        arrays, names = loaded.arrays, loaded.class_names
    write_prepared(work / "dataset.h5", arrays, names, "views-experiment", 0.1, 0)
    data = load_prepared(work / "dataset.h5")
    teacher_result = train_generation(data, recipe, 0, GenParams(loss="ce"), None)
    save_generation(work / "teacher.pt", teacher_result, checkpoint_meta(data, recipe, 0, GenParams(loss="ce"), None))
    device = resolve_device(recipe.device)
    _, teacher_acc = predict_accuracy(teacher_result.model, data.x_test, data.y_test, 512, device)
    teacher = model_from_checkpoint(load_checkpoint(work / "teacher.pt")).to(device)
    plan = arms(views, max(views), args.samples, args.policy)
    results: dict[str, dict[str, Any]] = {}
    for name, arm in plan.items():
        store, cache_bytes = None, 0.0
        if "export" in arm:
            store = work / f"cache-{name}"
            params = ExportParams(device=device.type, batch_size=512, **arm["export"])
            export_logits(work / "teacher.pt", data, store, params, device)
            cache_bytes = dir_bytes(store) / len(data.y_train)
        accs, epoch_s = [], []
        for seed in seeds:
            if store is None:
                acc, seconds = online_student(data, replace(recipe, seed=seed), teacher, seed + 1, device)
            else:
                gp = GenParams(loss="ban", teacher=0, view_policy=arm["policy"], seed=seed + 1)
                r = train_generation(data, replace(recipe, seed=seed), 1, gp, store)
                _, acc = predict_accuracy(r.model, data.x_test, data.y_test, 512, device)
                seconds = [h.seconds for h in r.history]
            accs.append(acc)
            epoch_s.append(statistics.median(seconds))
        results[name] = {
            "acc_mean": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accs": accs,
            "cache_bytes_per_sample": cache_bytes,
            "epoch_s_median": statistics.median(epoch_s),
            "export": arm.get("export"),
            "policy": arm.get("policy", "online"),
        }
        print(f"{name}: acc {results[name]['acc_mean']:.4f} +- {results[name]['acc_std']:.4f}", file=sys.stderr)
    rows = [
        [n, f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}", r["cache_bytes_per_sample"], r["epoch_s_median"]]
        for n, r in results.items()
    ]
    print(f"teacher test accuracy {100 * teacher_acc:.2f}% ({len(seeds)} seeds per arm, {recipe.epochs} epochs)")
    print(table(["arm", "student test acc %", "cache bytes / train sample", "epoch s (median)"], rows))
    path = write_results(
        "views_experiment-quick" if args.quick else "views_experiment",
        {
            "machine": machine_info(),
            "recipe": recipe.__dict__,
            "seeds": seeds,
            "teacher_acc": teacher_acc,
            "train_rows": len(data.y_train),
            "results": results,
            "quick": args.quick,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
