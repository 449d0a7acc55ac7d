"""Benchmark: what a Born-Again student's epoch costs with the logit cache, against training from labels
and against online distillation with the teacher in memory.

Arms (same architecture, data, batch size, optimizer, step options and seed; one model per arm). The
library's training path is `pipeline.train.loop.train_one_epoch` over batches from either input path:
  plain            device-resident input (pipeline.train.resident.ResidentInput), loss 'ce', no teacher
  offline          device-resident input and targets (DeviceTargets gathered by index), loss 'ban'
  online           device-resident input; the teacher model (eval mode) runs a no_grad forward per batch
  plain-stream     the streaming path (DataLoader + loader_batches), loss 'ce': the path beyond the budget
  offline-stream   the streaming path with the teacher's store read through CachedTargets, loss 'ban'
  reference        a plain loop of ~30 lines kept here, not in the library: uint8 images, labels and (for
                   reference-offline) fp16 teacher logits on the device, permutation and crop/flip drawn
                   on the device, autocast and channels_last on CUDA, no host sync inside the epoch; what
                   the device does at this batch and architecture
  reference-offline  the same loop with the cached fp16 logits and the BAN soft cross-entropy

Wall time is the headline; CPU time of the process (all threads) is reported beside it because other jobs
on a shared machine inflate it much less.

Epoch times: all arms in one process, alternating (order rotated every round), --reps rounds after one
warm-up round; medians and median per-round ratios. Peak memory: one fresh subprocess per arm (a process's
RSS high-water mark cannot be reset), running --mem-epochs epochs; peak RSS on CPU (VmHWM),
torch.cuda.max_memory_allocated on CUDA.

The teacher (generation 0) is trained for one epoch from labels, saved with pipeline.models.checkpoint and
exported with pipeline.teachers.export.export_logits, exactly as `bancache export-logits` does.

    .venv/bin/python benchmarks/student_step.py                              # MNIST-1D, 4000 rows, cnn1d
    .venv/bin/python benchmarks/student_step.py --dataset synthetic-images   # 10000 x 3x32x32, bench_cnn2d
    .venv/bin/python benchmarks/student_step.py --dataset synthetic-images --device cuda --augment \
        --arch resnet20 --batch-size 512                                     # the GPU comparison
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _benchlib import (
    alternate,
    cpu_model,
    machine_info,
    median,
    peak_rss_mib,
    pick_workdir,
    rss_mib,
    set_threads,
    spread,
    table,
    write_dataset,
    write_results,
)
from torch import nn
from torch.utils.data import DataLoader

from pipeline.cache.device import DeviceTargets
from pipeline.cache.reader import CachedTargets
from pipeline.data.augment import AugParams, apply_params
from pipeline.data.prepared import IndexedDataset, PreparedData, load_prepared
from pipeline.losses import generation_loss
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.models.registry import build_model
from pipeline.params import ExportParams, GenParams, TrainParams
from pipeline.teachers.export import export_logits
from pipeline.train.inputs import loader_batches
from pipeline.train.loop import (
    StepOptions,
    checkpoint_meta,
    make_criterion,
    make_optimizer,
    step_options,
    train_one_epoch,
)
from pipeline.train.resident import ResidentInput

ARMS = ("plain", "offline", "online", "plain-stream", "offline-stream", "reference", "reference-offline")
SETTINGS: dict[str, dict[str, Any]] = {
    "mnist1d": {"arch": "cnn1d", "reps": 21, "mem_epochs": 3},
    "synthetic-images": {
        "arch": "bench_cnn2d",
        "reps": 9,
        "mem_epochs": 1,
        "n_train": 10000,
        "n_test": 1000,
        "classes": 100,
    },
    # a smoke size: the CPU dry run of benchmarks/gpu.py runs every arm at this size so that script cannot rot
    "tiny-images": {"arch": "bench_cnn2d", "reps": 2, "mem_epochs": 1, "n_train": 320, "n_test": 64, "classes": 10},
}
STUDENT_SEED, LOADER_SEED, AUG_SEED = 1, 2, 3


# -- the online arm and the reference loop ------------------------------------------------------------
def online_epoch(
    model: nn.Module, teacher: nn.Module, batches: Any, opt: torch.optim.Optimizer, gp: GenParams, opts: StepOptions
) -> float:
    """`train_one_epoch` with the targets computed online: teacher.eval() and a no_grad forward per batch."""
    teacher.eval()

    def with_teacher() -> Any:
        for x, y, _ in batches:
            if opts.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast(x.device.type, opts.amp_dtype, enabled=opts.amp_dtype is not None):
                t = teacher(x).float()
            yield x, y, t

    return train_one_epoch(model, with_teacher(), opt, make_criterion(gp), opts)


def reference_epoch(model: nn.Module, d: dict[str, Any], opt: torch.optim.Optimizer, opts: StepOptions) -> torch.Tensor:
    """The plain device-resident loop: everything on the device, nothing read back (returns the loss sum
    as a device tensor). d: x, y (device), fit (device rows), logits (device fp16 or None), batch, augment."""
    model.train()
    x_all, y_all, fit, logits, bs = d["x"], d["y"], d["fit"], d["logits"], d["batch"]
    dev = x_all.device
    order = fit[torch.randperm(len(fit), device=dev)]
    total = torch.zeros((), device=dev)
    for s in range(0, len(order), bs):
        idx = order[s : s + bs]
        x, y = x_all[idx], y_all[idx]
        if d["augment"]:
            b, size = len(idx), x.shape[-1]
            top, left = torch.randint(0, 9, (2, b), device=dev)
            x = apply_params(x, AugParams(top, left, torch.rand(b, device=dev) < 0.5, 4, size))
        if opts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, opts.amp_dtype, enabled=opts.amp_dtype is not None):
            out = model(x).float()
        if logits is None:
            loss = torch.nn.functional.cross_entropy(out, y)
        else:
            p = torch.softmax(logits[idx].float(), dim=-1)
            loss = -(p * torch.log_softmax(out, dim=-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    return total


# -- setup ----------------------------------------------------------------------------------------------
def prepare(root: Path, dataset: str, device: torch.device, batch_size: int, arch: str, uint8: bool = False) -> None:
    """dataset.h5, teacher.pt (generation 0, one epoch from labels) and cache/gen-0 under `root`; `uint8`:
    images stored as uint8 (what --augment needs: the library augments uint8 images only)."""
    s = SETTINGS[dataset]
    data = write_dataset(root, dataset, s, uint8=uint8)
    torch.manual_seed(0)
    teacher = build_model(arch, data.input_shape, data.num_classes).to(device)
    loader, _ = make_loader(data, batch_size, device)
    opt = make_optimizer(teacher, TrainParams())
    train_one_epoch(teacher, loader_batches(loader, device), opt, make_criterion(GenParams(loss="ce")))
    meta = checkpoint_meta(data, TrainParams(arch=arch, seed=0), 0, GenParams(loss="ce"), None)
    save_checkpoint(root / "teacher.pt", teacher, meta)
    export_logits(root / "teacher.pt", data, root / "cache", ExportParams(device=device.type), device)


def make_loader(data: PreparedData, batch_size: int, device: torch.device) -> tuple[DataLoader, torch.Generator]:
    """The loader `train_generation` builds: fit rows, shuffled, dataset index as the third element."""
    gen = torch.Generator().manual_seed(LOADER_SEED)
    fit = IndexedDataset(data.x_train, data.y_train, data.fit_index())
    loader = DataLoader(
        fit,
        batch_size=batch_size,
        shuffle=True,
        drop_last=False,
        generator=gen,
        num_workers=0,
        pin_memory=device.type == "cuda",
    )
    return loader, gen


def _reference_data(
    data: PreparedData, targets: CachedTargets | None, device: torch.device, batch: int, augment: bool
) -> dict:
    logits = None
    if targets is not None:
        logits = torch.from_numpy(np.asarray(targets.check().array("train")[:, 0, :])).to(device, torch.float16)
    return {
        "x": torch.from_numpy(data.x_train).to(device),
        "y": torch.from_numpy(data.y_train).to(device),
        "fit": torch.from_numpy(data.fit_index()).to(device),
        "logits": logits,
        "batch": batch,
        "augment": augment,  # exactly when the library arms augment (step_options: uint8 images)
    }


def make_arm(arm: str, root: Path, data: PreparedData, arch: str, args: Any, device: torch.device):  # type: ignore[no-untyped-def]
    """A zero-argument callable running one epoch of `arm`, and the CachedTargets it reads (or None)."""
    torch.manual_seed(STUDENT_SEED)
    model = build_model(arch, data.input_shape, data.num_classes).to(device)
    aug_gen = torch.Generator().manual_seed(AUG_SEED)
    opts = step_options(TrainParams(augment=args.augment), data, device, aug_gen)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainParams())
    n, c = len(data.y_train), data.num_classes
    offline = arm in ("offline", "offline-stream", "reference-offline")
    targets = CachedTargets(root / "cache", "train", data.fingerprint, n, c) if offline else None
    gp = GenParams(loss="ban", teacher=0) if offline or arm == "online" else GenParams(loss="ce")
    if arm.startswith("reference"):
        d = _reference_data(data, targets, device, args.batch_size, opts.augment is not None)
        return (lambda: reference_epoch(model, d, opt, opts)), None
    if arm.endswith("-stream"):
        loader, gen = make_loader(data, args.batch_size, device)
        batches = lambda: loader_batches(loader, device, targets, 1.0, opts.augment)  # noqa: E731
        return (lambda: train_one_epoch(model, batches(), opt, make_criterion(gp, gen), opts)), targets
    gen = torch.Generator().manual_seed(LOADER_SEED)
    res = ResidentInput(data, device, args.batch_size, gen, aug_gen if opts.augment is not None else None)
    if arm == "online":
        teacher = model_from_checkpoint(load_checkpoint(root / "teacher.pt")).to(device)
        if opts.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        return (lambda: online_epoch(model, teacher, res.epoch(0), opt, gp, opts)), None
    dev_targets = None if targets is None else DeviceTargets(targets, device, data.fit_index(), all_views=False)
    batches_r: Any = lambda: res.epoch(0, dev_targets, 1.0)  # noqa: E731
    return (lambda: train_one_epoch(model, batches_r(), opt, make_criterion(gp, gen), opts)), None


# -- memory, one subprocess per arm ---------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    root = Path(args.child_dir)
    data = load_prepared(root / "dataset.h5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_mib()  # interpreter, imports and the dataset: common to every arm
    run, _ = make_arm(args.child, root, data, args.arch or SETTINGS[args.dataset]["arch"], args, device)
    for _ in range(args.mem_epochs):
        run()
    out = {"arm": args.child, "base_rss_mib": base, "peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def measure_memory(args: argparse.Namespace, root: Path, dataset: str, reps: int) -> dict[str, dict[str, Any]]:
    if reps == 0:  # --mem-reps 0: not measured (a run that only needs the epoch times)
        nan = float("nan")
        return {a: {"peak_rss_mib": nan, "base_rss_mib": nan, "peak_minus_base_mib": nan, "runs": []} for a in ARMS}
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    for r in range(reps):
        order = list(ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)])
        for arm in order:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                arm,
                "--child-dir",
                str(root),
                "--dataset",
                dataset,
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--batch-size",
                str(args.batch_size),
                "--mem-epochs",
                str(args.mem_epochs or SETTINGS[dataset]["mem_epochs"]),
                *(["--arch", args.arch] if args.arch else []),
                *(["--augment"] if args.augment else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise RuntimeError(f"memory child {arm} failed:\n{proc.stderr[-3000:]}")
            runs[arm].append(json.loads(line[-1][7:]))
    out = {}
    for arm, rs in runs.items():
        peak = median([r["peak_rss_mib"] for r in rs])
        base = median([r["base_rss_mib"] for r in rs])
        out[arm] = {"peak_rss_mib": peak, "base_rss_mib": base, "peak_minus_base_mib": peak - base, "runs": rs}
        if "cuda_max_allocated_mib" in rs[0]:
            out[arm]["cuda_max_allocated_mib"] = median([r["cuda_max_allocated_mib"] for r in rs])
    return out


# -- the benchmark ----------------------------------------------------------------------------------------
def reader_share(run, targets: CachedTargets) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """One extra epoch with the reader's entry point timed (`target`, which train_one_epoch calls, or `rows`
    in older versions): seconds in the reader per batch and its share of the epoch."""
    method = "target" if hasattr(targets, "target") else "rows"
    inner, spent, calls = getattr(targets, method), [0.0], [0]

    def timed(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = inner(*a, **k)
        spent[0] += time.perf_counter() - t0
        calls[0] += 1
        return out

    setattr(targets, method, timed)
    t0 = time.perf_counter()
    run()
    epoch = time.perf_counter() - t0
    delattr(targets, method)
    return {"reader_ms_per_batch": 1e3 * spent[0] / max(calls[0], 1), "reader_share_of_epoch": spent[0] / epoch}


def loss_cost(batch: int, classes: int, reps: int) -> dict[str, float]:
    """Microseconds of one loss forward + backward on (batch, classes) logits: CE on labels (plain) against
    the BAN soft-target loss (offline and online), alternating; the loss's share of offline's extra cost."""
    torch.manual_seed(0)
    s = torch.randn(batch, classes, requires_grad=True)
    t, y = torch.randn(batch, classes), torch.randint(0, classes, (batch,))
    k = 200
    arms = {
        "ce": lambda: [generation_loss("ce", s, None, y).backward() for _ in range(k)],
        "ban": lambda: [generation_loss("ban", s, t, y).backward() for _ in range(k)],
    }
    times = alternate(arms, reps, warmup=1)
    return {f"{n}_us": 1e6 * median(v) / k for n, v in times.items()}


def bench_setting(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    s = SETTINGS[dataset]
    arch = args.arch or s["arch"]
    device = torch.device(args.device)
    root = pick_workdir(args.workdir, 2 * 2**30, f"bancache-student-{dataset}-")
    t0 = time.perf_counter()
    prepare(root, dataset, device, args.batch_size, arch, uint8=args.augment)
    setup_s = time.perf_counter() - t0
    data = load_prepared(root / "dataset.h5")
    reps = args.reps or s["reps"]
    arms, targets = {}, {}
    for arm in ARMS:
        arms[arm], targets[arm] = make_arm(arm, root, data, arch, args, device)
    loader, _ = make_loader(data, args.batch_size, device)
    arms["loader-only"] = lambda: sum(len(y) for _x, y, _i in loader)  # the fixed cost every arm pays
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    print(f"[{dataset}] timing {len(ARMS)} arms x {reps} rounds ...", flush=True)
    cpu: dict[str, list[float]] = {}
    times = alternate(arms, reps, warmup=1, sync=sync, cpu=cpu)
    shares = {"offline-stream": reader_share(arms["offline-stream"], targets["offline-stream"])}
    losses = loss_cost(args.batch_size, data.num_classes, 15)
    batches = -(-len(data.fit_index()) // args.batch_size)
    print(f"[{dataset}] peak memory, one subprocess per arm ...", flush=True)
    mem = measure_memory(args, root, dataset, args.mem_reps)
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)

    def paired(a: str, b: str, t: dict[str, list[float]] = times) -> float:
        return median([x / y for x, y in zip(t[a], t[b], strict=True)])

    arms_out: dict[str, Any] = {}
    for arm in ARMS:
        arms_out[arm] = {
            "epoch_s_median": median(times[arm]),
            "epoch_s_min_max": spread(times[arm]),
            "epoch_s_all": times[arm],
            "ratio_vs_plain": paired(arm, "plain"),
            "ratio_vs_online": paired(arm, "online"),
            "ratio_vs_reference": paired(arm, "reference"),
            "cpu_s_median": median(cpu[arm]),
            "cpu_s_all": cpu[arm],
            "cpu_ratio_vs_plain": paired(arm, "plain", cpu),
            "cpu_ratio_vs_online": paired(arm, "online", cpu),
            "samples_per_s": len(data.fit_index()) / median(times[arm]),
            **mem[arm],
            "peak_rss_ratio_vs_plain": mem[arm]["peak_rss_mib"] / mem["plain"]["peak_rss_mib"],
            **shares.get(arm, {}),
        }
    arms_out["loader-only"] = {
        "epoch_s_median": median(times["loader-only"]),
        "epoch_s_min_max": spread(times["loader-only"]),
        "ratio_vs_plain": paired("loader-only", "plain"),
        "ratio_vs_online": paired("loader-only", "online"),
        "ratio_vs_reference": paired("loader-only", "reference"),
    }
    # With a reader and a loss that cost nothing more than CE, offline = plain: plain/online is the floor.
    best_possible = arms_out["plain"]["ratio_vs_online"]
    targets_met = {  # issue 11's targets (CUDA); on a CPU they are informative only
        "offline/plain <= 1.03": arms_out["offline"]["ratio_vs_plain"] <= 1.03,
        "offline/online <= 0.85": arms_out["offline"]["ratio_vs_online"] <= 0.85,
        "plain images/s >= 0.9 x reference": arms_out["plain"]["ratio_vs_reference"] <= 1 / 0.9,
    }
    if args.mem_reps:
        targets_met["peak memory offline <= 1.05 x plain"] = arms_out["offline"]["peak_rss_ratio_vs_plain"] <= 1.05
    return {
        "dataset": dataset,
        "arch": arch,
        "augment": args.augment,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "train_rows": len(data.y_train),
        "fit_rows": len(data.fit_index()),
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "batch_size": args.batch_size,
        "device": str(device),
        "reps": reps,
        "setup_s": setup_s,
        "arms": arms_out,
        "targets_met": targets_met,
        "offline_over_online_lower_bound": best_possible,
        "loss_us_per_batch": losses,
        "ban_minus_ce_share_of_plain_epoch": (losses["ban_us"] - losses["ce_us"])
        * 1e-6
        * batches
        / arms_out["plain"]["epoch_s_median"],
    }


def report(res: dict[str, Any]) -> str:
    rows = []
    nan = float("nan")
    for arm, a in res["arms"].items():
        if arm == "loader-only":
            rows.append(
                [
                    arm + " (no training)",
                    a["epoch_s_median"],
                    nan,
                    a["ratio_vs_plain"],
                    a["ratio_vs_online"],
                    a["ratio_vs_reference"],
                    nan,
                    nan,
                    nan,
                    nan,
                    nan,
                    nan,
                ]
            )
            continue
        rows.append(
            [
                arm,
                a["epoch_s_median"],
                a["samples_per_s"],
                a["ratio_vs_plain"],
                a["ratio_vs_online"],
                a["ratio_vs_reference"],
                a["cpu_ratio_vs_plain"],
                a["cpu_ratio_vs_online"],
                a.get("reader_ms_per_batch", float("nan")),
                a["peak_rss_mib"],
                a["peak_minus_base_mib"],
                a["peak_rss_ratio_vs_plain"],
            ]
        )
    head = (
        f"### {res['dataset']} ({res['fit_rows']} fit rows, {res['arch']}, {res['num_classes']} classes, "
        f"batch {res['batch_size']}, {res['device_name']}, torch {res['torch']}, augment {res['augment']}, "
        f"median of {res['reps']} alternating rounds)"
    )
    t = table(
        [
            "arm",
            "epoch s",
            "samples/s",
            "/plain",
            "/online",
            "/reference",
            "/plain (cpu)",
            "/online (cpu)",
            "reader ms/batch",
            "peak RSS MiB",
            "peak-base MiB",
            "peak/plain",
        ],
        rows,
    )
    met = "\n".join(f"- {k}: {'MET' if v else 'MISSED'}" for k, v in res["targets_met"].items())
    bound = (
        f"- floor of offline/online here (plain/online: reader and loss no dearer than plain's): "
        f"{res['offline_over_online_lower_bound']:.3f}"
    )
    lc = res["loss_us_per_batch"]
    loss = (
        f"- loss forward+backward per batch: ce {lc['ce_us']:.0f} us, ban {lc['ban_us']:.0f} us; the extra "
        f"{lc['ban_us'] - lc['ce_us']:.0f} us/batch is {100 * res['ban_minus_ce_share_of_plain_epoch']:.1f}% of "
        f"plain's epoch (part of any offline or online arm, whatever the reader)"
    )
    return f"{head}\n\n{t}\n\n{met}\n{bound}\n{loss}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=[*SETTINGS, "both"], default="mnist1d")
    ap.add_argument("--reps", type=int, default=0, help="timed rounds (default: 21 MNIST-1D, 9 images)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mem-reps", type=int, default=2, help="subprocesses per arm for peak memory (0: not measured)")
    ap.add_argument("--mem-epochs", type=int, default=0, help="epochs per memory subprocess (default per dataset)")
    ap.add_argument("--workdir", default=None, help="where the temporary dataset, teacher and store go")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--arch", default=None, help="student and teacher architecture (default per dataset)")
    ap.add_argument(
        "--augment", action="store_true", help="random crop + flip in every arm (images, then stored as uint8)"
    )
    ap.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.child:
        child(args)
        return
    info = machine_info()
    datasets = ["mnist1d", "synthetic-images"] if args.dataset == "both" else [args.dataset]
    results = [bench_setting(args, d) for d in datasets]
    text = "\n".join(report(r) for r in results)
    print(
        f"\nstudent_step on {info['cpu_model']} ({info['cpus_usable']} CPUs), torch {info['torch']}, "
        f"{info['torch_threads']} thread(s), {info['date_utc']}\n\n{text}"
    )
    name = "student_step" if args.dataset == "mnist1d" else f"student_step-{args.dataset}"
    path = write_results(
        name,
        {"benchmark": "student_step", "machine": info, "args": vars(args), "settings": results, "table_markdown": text},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
