"""Benchmark: what exporting a generation's logits to the store costs beyond the inference it needs.

Arms, alternating in one process (order rotated every round), medians over --reps rounds:
  export     pipeline.teachers.export.export_logits(checkpoint, data, fresh_out_dir, ExportParams(), device): load and
             hash the checkpoint, infer train and test in chunks of 1024 rows while a writer thread encodes
             and writes the previous chunks to a float16 zarr store, seal it (re-read, check finiteness,
             sha256, marker), rename it into place, reopen it.
  export-sequential  the same with write_ahead=0: each chunk written before the next is inferred (the
             export before the writer thread).
  inference  predict_logits over the same rows (train and test) with the same batch size, the model already
             in memory: the work no export can avoid.

A cProfile of one extra sequential export splits its time between those steps (cProfile sees only the
calling thread, so the profile runs without the writer thread).

    .venv/bin/python benchmarks/export.py                      # MNIST-1D (cnn1d) and 50k synthetic images
    .venv/bin/python benchmarks/export.py --dataset all        # also ResNet-8 on synthetic images (slow)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from _benchlib import (
    alternate,
    machine_info,
    median,
    pick_workdir,
    set_threads,
    spread,
    table,
    write_dataset,
    write_results,
)

from pipeline.data.prepared import load_prepared
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.models.predict import predict_logits
from pipeline.models.registry import build_model
from pipeline.params import ExportParams, GenParams, TrainParams
from pipeline.teachers.export import WRITE_AHEAD, export_logits
from pipeline.train.loop import checkpoint_meta

SETTINGS: dict[str, dict[str, Any]] = {
    "mnist1d": {"arch": "cnn1d"},  # 4000 train + 1000 test rows, 10 classes
    "synthetic-images": {"arch": "bench_cnn2d", "n_train": 10000, "n_test": 1000, "classes": 100},
    "synthetic-images-50k": {"arch": "bench_cnn2d", "n_train": 49000, "n_test": 1000, "classes": 100},
    "synthetic-images-resnet8": {"arch": "bench_resnet8", "n_train": 10000, "n_test": 1000, "classes": 100},
    # a smoke size (two 1024-row chunks of train, so the writer overlaps): the CPU dry run of benchmarks/gpu.py
    "tiny-images": {"arch": "bench_cnn2d", "n_train": 1900, "n_test": 100, "classes": 10},
}
# Steps of export_logits, as (module file suffix, function name) for the profile breakdown.
STEPS = [
    ("checkpoint.py", "load_checkpoint"),
    ("io.py", "sha256_file"),
    ("checkpoint.py", "model_from_checkpoint"),
    ("store.py", "create"),
    ("", "predict_logits"),  # pipeline/train.py or pipeline/evaluate.py
    ("export.py", "encode_chunk"),
    ("store.py", "write"),
    ("store.py", "seal"),
    ("io.py", "replace_dir"),
    ("store.py", "open"),
]


def prepare(root: Path, dataset: str) -> None:
    s = SETTINGS[dataset]
    data = write_dataset(root, dataset, s)
    torch.manual_seed(0)
    model = build_model(s["arch"], data.input_shape, data.num_classes)  # weights do not change the cost
    meta = checkpoint_meta(data, TrainParams(arch=s["arch"], seed=0), 0, GenParams(loss="ce"), None)
    save_checkpoint(root / "model.pt", model, meta)


def profile_export(ckpt: Path, data, out: Path, params: ExportParams, device: torch.device) -> dict[str, float]:  # type: ignore[no-untyped-def]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    export_logits(ckpt, data, out, params, device, write_ahead=0)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out_s: dict[str, float] = {"total_profiled_s": total}
    for suffix, fn in STEPS:
        cum = sum(v[3] for (file, _line, name), v in stats.items() if name == fn and file.endswith(suffix))
        out_s[f"{suffix[:-3]}.{fn}" if suffix else fn] = cum
    # predict_logits is called inside the write loop; the store's own share is what write adds on top.
    out_s["other"] = total - sum(v for k, v in out_s.items() if k != "total_profiled_s")
    return out_s


def bench_setting(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    device = torch.device(args.device)
    root = pick_workdir(args.workdir, 2**30, f"bancache-export-{dataset}-")
    prepare(root, dataset)
    data = load_prepared(root / "dataset.h5")
    params = ExportParams(device=device.type)
    ckpt = root / "model.pt"
    model = model_from_checkpoint(load_checkpoint(ckpt)).to(device)
    counter = [0]

    def export(write_ahead: int = WRITE_AHEAD) -> None:
        counter[0] += 1
        export_logits(ckpt, data, root / "out" / f"gen-{counter[0]}", params, device, write_ahead=write_ahead)

    def export_sequential() -> None:
        export(write_ahead=0)

    def inference() -> None:
        for split in ("train", "test"):
            predict_logits(model, data.split(split)[0], params.batch_size, device)

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    print(f"[{dataset}] timing 3 arms x {args.reps} rounds ...", flush=True)
    arms = {"export": export, "inference": inference, "export-sequential": export_sequential}
    cpu: dict[str, list[float]] = {}
    times = alternate(arms, args.reps, warmup=1, sync=sync, cpu=cpu)
    prof = profile_export(ckpt, data, root / "out" / "profiled", params, device)
    shutil.rmtree(root, ignore_errors=True)
    ratio = median([e / i for e, i in zip(times["export"], times["inference"], strict=True)])
    ratio_s = median([e / i for e, i in zip(times["export-sequential"], times["inference"], strict=True)])
    ratio_cpu = median([e / i for e, i in zip(cpu["export"], cpu["inference"], strict=True)])
    rows = len(data.y_train) + len(data.y_test)
    return {
        "dataset": dataset,
        "arch": SETTINGS[dataset]["arch"],
        "rows": rows,
        "train_rows": len(data.y_train),
        "num_classes": data.num_classes,
        "device": str(device),
        "reps": args.reps,
        "export_s_median": median(times["export"]),
        "export_s_min_max": spread(times["export"]),
        "inference_s_median": median(times["inference"]),
        "inference_s_min_max": spread(times["inference"]),
        "export_over_inference": ratio,
        "overhead_ms": 1e3 * (median(times["export"]) - median(times["inference"])),
        "target_export_over_inference_le_1.2": ratio <= 1.2,
        "profile_one_export_s": prof,
        "export_sequential_s_median": median(times["export-sequential"]),
        "export_sequential_over_inference": ratio_s,
        "export_over_inference_cpu": ratio_cpu,
        "cpu_times": cpu,
        "overhead_sequential_ms": 1e3 * (median(times["export-sequential"]) - median(times["inference"])),
        "times": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dataset",
        choices=[*SETTINGS, "default", "all"],
        default="default",
        help="default: mnist1d and synthetic-images-50k; all adds the 10k and resnet8 settings",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    info = machine_info()
    every = [k for k in SETTINGS if k != "tiny-images"]
    datasets = {"all": every, "default": ["mnist1d", "synthetic-images-50k"]}.get(args.dataset, [args.dataset])
    results = [bench_setting(args, d) for d in datasets]
    rows = [
        [
            r["dataset"],
            r["arch"],
            r["rows"],
            r["inference_s_median"],
            r["export_s_median"],
            r["overhead_ms"],
            r["export_over_inference"],
            r["export_over_inference_cpu"],
            "MET" if r["target_export_over_inference_le_1.2"] else "MISSED",
            r["overhead_sequential_ms"],
            r["export_sequential_over_inference"],
        ]
        for r in results
    ]
    text = table(
        [
            "setting",
            "arch",
            "rows (train+test)",
            "inference s",
            "export s",
            "overhead ms",
            "export/inference",
            "export/inference (cpu)",
            "<= 1.2",
            "overhead ms (sequential)",
            "export-sequential/inference",
        ],
        rows,
    )
    steps = [k for k in results[0]["profile_one_export_s"] if k != "total_profiled_s"]
    prof_rows = [
        [r["dataset"], r["profile_one_export_s"]["total_profiled_s"]] + [r["profile_one_export_s"][k] for k in steps]
        for r in results
    ]
    text += "\n\ncProfile of one sequential export (cumulative seconds; predict_logits runs inside the write loop):\n\n"
    text += table(["setting", "total", *steps], prof_rows)
    print(
        f"\nexport on {info['device_name']} ({info['cpus_usable']} CPUs), torch {info['torch']}, "
        f"{info['torch_threads']} thread(s), {info['date_utc']}, median of {args.reps} alternating rounds\n\n{text}"
    )
    name = "export" if args.dataset == "default" else f"export-{args.dataset}"
    path = write_results(
        name, {"benchmark": "export", "machine": info, "args": vars(args), "settings": results, "table_markdown": text}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
