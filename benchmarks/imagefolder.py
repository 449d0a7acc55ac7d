"""Issue 21's benchmarks of images kept on disk (`data.storage: files`), on an ImageFolder of JPEG files.

1. **Images/s of a cached student epoch** (bancache: index from `prepare`, a teacher store exported once,
   a BAN student epoch reading the store by index, RandomResizedCrop + flip decoded in the DataLoader's
   workers, validation on the held-out rows) against a plain torchvision `ImageFolder` + `DataLoader`
   loop (PIL decode, `RandomResizedCrop` + `RandomHorizontalFlip`, cross-entropy on the labels, the same
   validation) with the same rows, workers, crop size and ranges, batch, model, optimizer and threads.
   The arms alternate (A B, B A, ...) in one process; target: bancache / plain >= 0.95.
2. **Peak memory** (VmHWM) of `prepare`, `export` and a student epoch at three sizes, each in a fresh
   subprocess that reads its own high-water mark and polls its DataLoader workers' (every 0.1 s); flat
   means largest / smallest <= 1.1.
3. **Export time against one inference pass** (the same model in eval mode over the same rows, train and
   test, at the evaluation view, decoded by bancache's own `FilesDataset` in one DataLoader per split with
   the same workers): target export / inference <= 1.2.

The ImageFolder is generated once from the CIFAR-10 npz copy (`--source`, README of
`../shared/data/cifar10-jpeg`): 32 px images upscaled with PIL (bicubic) to `--px`, saved as JPEG quality
90, class-balanced, under `--image-root` (default: the system temp dir), and kept for later runs.

    .venv/bin/python benchmarks/imagefolder.py                  # 20,000 + 2,000 files at 96 px (~22 min, 2 cores)
    .venv/bin/python benchmarks/imagefolder.py --files 200 --out /tmp/if.json   # smoke run (~2 min)

The model is `bench_patch96` (registered here, in this process only): a 4x4 stride-4 patch stem and one
residual block, about 9M multiply-adds per 96 px image; the registry's cnn3/cnn4 cost 40+ ms per image
per training step at 96 px on one core of the 2-core machine the results come from, too slow for
three 20,000-image epochs per arm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bl  # noqa: E402  (puts the repository on sys.path)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.models.registry import ARCHS, register  # noqa: E402

ARCH = "bench_patch96"
FOLDER_FORMAT = "bancache-imgbench-v1"  # the generated folder's marker (its recipe); a mismatch regenerates it


def bench_patch96(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """4x4 stride-4 patch stem (32 ch) + BN + ReLU, one residual block (64 ch, stride 2), pool, linear."""
    return nn.Sequential(
        nn.Conv2d(bl._channels(input_shape), 32, 4, 4),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        bl._Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


if ARCH not in ARCHS:
    register(ARCH)(bench_patch96)


# -- the ImageFolder ------------------------------------------------------------------------------------
def make_folder(source: Path, root: Path, n_train: int, n_test: int, px: int) -> dict[str, Any]:
    """root/{train,test}/<class>/<row>.jpg: the first n/10 images of each class of source's npz, upscaled
    (PIL bicubic) to px x px, JPEG quality 90. Skipped when root's marker records the same recipe."""
    from PIL import Image

    recipe = {"format": FOLDER_FORMAT, "source": str(source), "train": n_train, "test": n_test, "px": px}
    marker = root / "imagefolder.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return {**recipe, "generated_s": 0.0, "cached": True}
    if marker.is_file():  # generated here with another recipe: replaced whole
        marker.unlink()
        for split in ("train", "test"):
            shutil.rmtree(root / split, ignore_errors=True)
    elif (root / "train").exists():
        raise SystemExit(f"{root}: holds a train/ folder this benchmark did not generate; pass another --image-root")
    t0 = time.perf_counter()
    for split, n in (("train", n_train), ("test", n_test)):
        d = np.load(source / f"{split}.npz")
        x, y, classes = d["x"], d["y"], [str(c) for c in d["classes"]]
        per, extra = divmod(n, len(classes))
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for row in np.flatnonzero(y == k)[: per + (k < extra)]:
                img = Image.fromarray(x[row]).resize((px, px), Image.Resampling.BICUBIC)
                img.save(folder / f"{row:05d}.jpg", quality=90)
    marker.write_text(json.dumps(recipe))
    return {**recipe, "generated_s": time.perf_counter() - t0, "cached": False}


# -- bancache's path ------------------------------------------------------------------------------------
def held_out_files(args: argparse.Namespace) -> int:
    return max(10, args.files // 10)


def data_params(args: argparse.Namespace, n: int) -> Any:
    from pipeline.params import DataParams

    n_test = None if n // 10 >= held_out_files(args) else max(1, n // 10)  # None: every test file
    return DataParams(
        dataset="imagefolder", root=str(args.image_root), storage="files", size=args.px, n_train=n, n_test=n_test
    )


def recipe(args: argparse.Namespace) -> Any:
    from pipeline.params import TrainParams

    return TrainParams(
        arch=ARCH,
        epochs=1,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        lr=0.01,
        crop="resized",
        num_workers=args.workers,
        threads=args.threads,
        device="cpu",
    )


def student(teacher: int = 0) -> Any:
    from pipeline.params import GenParams

    return GenParams(loss="ban", teacher=teacher)


def export_params(args: argparse.Namespace) -> Any:
    from pipeline.params import ExportParams

    return ExportParams(num_workers=args.workers, device="cpu")


def bancache_epoch(args: argparse.Namespace, data: Any, store: Path) -> float:
    """One BAN student epoch on the files (train_model: model, optimizer, workers, epoch, validation)."""
    from pipeline.api import train_model

    result = train_model(data, gen=1, recipe=recipe(args), generation=student(), teacher_store=store)
    return float(result.history[-1].train_loss)


# -- the plain torchvision loop -------------------------------------------------------------------------
_ROWS: dict[int, np.ndarray] = {}


def folder_rows(args: argparse.Namespace, data: Any, samples: list[tuple[str, int]]) -> np.ndarray:
    """ImageFolder's sample of each train row of `data` (same file), computed once (not timed twice)."""
    if id(data) not in _ROWS:
        index = {Path(p).relative_to(args.image_root).as_posix(): i for i, (p, _) in enumerate(samples)}
        files = data.x_train
        _ROWS[id(data)] = np.array([index[files.files.paths[int(files.rows[r])]] for r in range(len(files))])
    return _ROWS[id(data)]


def plain_loaders(args: argparse.Namespace, data: Any, seed: int = 0) -> tuple[Any, Any]:
    """torchvision ImageFolder over the same fit and validation rows as `data` (checked by path)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    r = recipe(args)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.px, scale=r.crop_scale, ratio=r.crop_ratio, antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(data.x_train.eval_resize, antialias=True),
            transforms.CenterCrop(args.px),
            transforms.PILToTensor(),
        ]
    )
    folder = datasets.ImageFolder(str(Path(args.image_root) / "train"), transform=train_tf)
    to_folder = folder_rows(args, data, folder.samples)
    evaluated = datasets.ImageFolder(str(Path(args.image_root) / "train"), transform=eval_tf)
    fit = DataLoader(
        Subset(folder, to_folder[data.fit_index()].tolist()),
        batch_size=r.batch_size,
        shuffle=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if args.workers else None,
    )
    val = DataLoader(Subset(evaluated, to_folder[data.val_index].tolist()), batch_size=r.eval_batch_size)
    return fit, val


def plain_epoch(args: argparse.Namespace, data: Any) -> float:
    """One epoch of a plain loop: cross-entropy on the labels, then accuracy on the validation rows."""
    from pipeline.models.registry import build_model
    from pipeline.train.optim import make_optimizer

    torch.manual_seed(1)
    fit, val = plain_loaders(args, data)
    model = build_model(ARCH, data.input_shape, data.num_classes)
    model.set_stats(data.channel_mean, data.channel_std)  # type: ignore[operator]
    opt = make_optimizer(model, recipe(args))
    model.train()
    total, count = 0.0, 0
    for x, y in fit:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, count = total + loss.item() * len(y), count + len(y)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in val)
    assert correct >= 0
    return total / max(count, 1)


# -- export against inference ---------------------------------------------------------------------------
def inference_pass(args: argparse.Namespace, data: Any, checkpoint: Path) -> int:
    """The teacher in eval mode over every train and test row at the evaluation view, decoded by
    FilesDataset in one DataLoader per split with the export's workers and batch size."""
    from torch.utils.data import DataLoader

    from pipeline.api import load_model
    from pipeline.data.files import FilesDataset

    model, rows = load_model(checkpoint), 0
    p = export_params(args)
    with torch.no_grad():
        for split in ("train", "test"):
            x, y = data.split(split)
            ds = FilesDataset(x, y, np.arange(len(y)))
            loader = DataLoader(ds, batch_size=p.batch_size, num_workers=p.num_workers)
            for xb, _, _ in loader:
                rows += len(model(xb))
    return rows


def export_store(args: argparse.Namespace, data: Any, checkpoint: Path, out: Path) -> None:
    from pipeline.api import export_store as export

    export(checkpoint, data, out, params=export_params(args), device="cpu")


# -- peak memory in a fresh process ---------------------------------------------------------------------
class WorkerPeaks:
    """Polls the VmHWM of this process's children (DataLoader workers) every 0.1 s; `peak_mib` the largest."""

    def __init__(self) -> None:
        self.peak_mib, self.children = 0.0, 0
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for task in Path("/proc/self/task").iterdir():
                try:
                    pids = (task / "children").read_text().split()
                    for pid in pids:
                        text = Path(f"/proc/{pid}/status").read_text()
                        kib = next(int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("VmHWM:"))
                        self._seen.add(int(pid))
                        self.peak_mib = max(self.peak_mib, kib / 1024)
                except (OSError, StopIteration, ValueError):
                    continue
            self.children = len(self._seen)


def child(args: argparse.Namespace) -> None:
    """One measured step in this fresh process; prints a JSON line of its peaks."""
    from pipeline.api import prepare_data
    from pipeline.data.prepared import load_prepared

    bl.set_threads(args.threads)
    work = Path(args.workdir) / str(args.n)
    before = bl.peak_rss_mib()  # after imports (torch, bancache)
    t0 = time.perf_counter()
    with WorkerPeaks() as workers:
        if args.child == "prepare":
            prepare_data(work / "dataset.h5", params=data_params(args, args.n))
        elif args.child == "export":
            export_store(args, load_prepared(work / "dataset.h5"), work / "gen0.pt", work / "store")
        else:
            bancache_epoch(args, load_prepared(work / "dataset.h5"), work / "store")
    out = {"step": args.child, "files": args.n, "wall_s": time.perf_counter() - t0, "peak_mib": bl.peak_rss_mib()}
    out |= {"after_imports_mib": before, "worker_peak_mib": workers.peak_mib, "workers_seen": workers.children}
    print("RESULT " + json.dumps(out), flush=True)


def measure(args: argparse.Namespace, step: str, n: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", step, "--n", str(n), "--workdir", str(args.workdir)]
    cmd += ["--image-root", str(args.image_root), "--px", str(args.px), "--workers", str(args.workers)]
    cmd += ["--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    cmd += ["--eval-batch-size", str(args.eval_batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(bl.REPO)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{step} at {n} files failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


def memory(args: argparse.Namespace, sizes: list[int]) -> dict[str, Any]:
    """prepare, export and a student epoch at each size, each measured in its own process; the teacher
    (1 epoch, needed by the export) trains here, unmeasured. Leaves each size's data and store."""
    from pipeline.api import train_model
    from pipeline.data.prepared import load_prepared

    rows: list[dict[str, Any]] = []
    for n in sizes:
        rows.append(measure(args, "prepare", n))
        work = Path(args.workdir) / str(n)
        train_model(load_prepared(work / "dataset.h5"), gen=0, recipe=recipe(args), out=work / "gen0.pt")
        rows.append(measure(args, "export", n))
        rows.append(measure(args, "student", n))
        print(f"memory at {n} files: " + ", ".join(f"{r['step']} {r['peak_mib']:.0f} MiB" for r in rows[-3:]))
    ratios = {}
    for step in ("prepare", "export", "student"):
        peaks = {r["files"]: r for r in rows if r["step"] == step}
        lo, hi = peaks[min(sizes)], peaks[max(sizes)]
        ratios[step] = {
            "peak": hi["peak_mib"] / lo["peak_mib"],
            "peak_over_imports": (hi["peak_mib"] - hi["after_imports_mib"])
            / max(lo["peak_mib"] - lo["after_imports_mib"], 1e-9),
            "worker_peak": hi["worker_peak_mib"] / lo["worker_peak_mib"] if lo["worker_peak_mib"] else float("nan"),
        }
    return {"rows": rows, "largest_over_smallest": ratios}


# -- the timed arms -------------------------------------------------------------------------------------
def timed(args: argparse.Namespace, arms: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    cpu: dict[str, list[float]] = {}
    times = bl.alternate(arms, args.reps, warmup=0, cpu=cpu)
    a, b = list(arms)
    per_round = [tb / ta for ta, tb in zip(times[a], times[b], strict=True)]
    return {
        "wall_s": times,
        "cpu_s": cpu,
        "ratio_of": f"{b} / {a} (wall)",
        "per_round": per_round,
        "ratio": bl.median(per_round),
    }


def speed(args: argparse.Namespace, n: int) -> dict[str, Any]:
    from pipeline.data.prepared import load_prepared

    work = Path(args.workdir) / str(n)
    data = load_prepared(work / "dataset.h5")
    rows = len(data.fit_index()) + len(data.val_index)
    arms = {"plain": lambda: plain_epoch(args, data), "bancache": lambda: bancache_epoch(args, data, work / "store")}
    res = timed(args, arms)
    img_s = {k: [rows / t for t in v] for k, v in res["wall_s"].items()}
    res |= {
        "images_per_epoch": rows,
        "images_per_s": img_s,
        "images_per_s_median": {k: bl.median(v) for k, v in img_s.items()},
    }
    res["bancache_over_plain_images_per_s"] = 1.0 / res["ratio"]  # images/s ratio: the inverse of the time ratio
    ckpt = work / "gen0.pt"
    arms = {
        "inference": lambda: inference_pass(args, data, ckpt),
        "export": lambda: export_store(args, data, ckpt, work / "store-timed"),
    }
    return {"student_epoch": res, "export_vs_inference": timed(args, arms)}


def report(payload: dict[str, Any]) -> str:
    s, e, m = payload["speed"]["student_epoch"], payload["speed"]["export_vs_inference"], payload["memory"]
    ips = s["images_per_s_median"]
    out = [f"## Student epoch on {s['images_per_epoch']} files (images/s, median of {len(s['per_round'])} rounds)"]
    out.append(
        bl.table(
            ["plain ImageFolder", "bancache", "bancache / plain", "target"],
            [[ips["plain"], ips["bancache"], s["bancache_over_plain_images_per_s"], ">= 0.95"]],
        )
    )
    ex = {k: bl.median(v) for k, v in e["wall_s"].items()}
    out.append("## Export against one inference pass (s)")
    out.append(
        bl.table(
            ["inference", "export", "export / inference", "target"],
            [[ex["inference"], ex["export"], e["ratio"], "<= 1.2"]],
        )
    )
    out.append("## Peak memory (VmHWM, MiB; worker: largest DataLoader worker)")
    rows = [[r["step"], r["files"], r["peak_mib"], r["after_imports_mib"], r["worker_peak_mib"]] for r in m["rows"]]
    out.append(bl.table(["step", "files", "peak", "after imports", "worker peak"], rows))
    flat = m["largest_over_smallest"]
    out.append(
        bl.table(
            ["step", "peak largest/smallest", "above imports", "worker", "target"],
            [[k, v["peak"], v["peak_over_imports"], v["worker_peak"], "<= 1.1"] for k, v in flat.items()],
        )
    )
    return "\n\n".join(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=20000, help="train files generated (test: a tenth)")
    p.add_argument("--sizes", default="", help="memory sizes, comma-separated (default: files/10, files/2, files)")
    p.add_argument("--px", type=int, default=96)
    p.add_argument("--source", default=str(bl.REPO.parent / "shared" / "data" / "cifar10-jpeg"))
    p.add_argument(
        "--image-root", default="", help="the ImageFolder (default: <tmp>/bancache-imagefolder-<px>-<files>)"
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=1024, help="validation batch (train.eval_batch_size)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--keep-workdir", action="store_true", help="keep the prepared data and stores (else removed)")
    p.add_argument("--out", default="", help="results JSON (default: benchmarks/results/imagefolder.json)")
    p.add_argument("--child", choices=("prepare", "export", "student"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.image_root:
        import tempfile

        args.image_root = str(Path(tempfile.gettempdir()) / f"bancache-imagefolder-{args.px}-{args.files}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        return child(args)
    bl.set_threads(args.threads)
    info = bl.machine_info()
    folder = make_folder(Path(args.source), Path(args.image_root), args.files, held_out_files(args), args.px)
    print(f"imagefolder: {folder}")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.files // 10, args.files // 2, args.files]
    args.workdir = str(bl.pick_workdir(args.workdir, 64 * 2**20 + max(sizes) * 2000, "imagefolder-"))
    mem = memory(args, sizes)
    timing = speed(args, max(sizes))
    info["loadavg_at_end"] = list(os.getloadavg())
    payload = {"machine": info, "args": vars(args), "folder": folder, "memory": mem, "speed": timing}
    text = report(payload)
    payload["tables"] = text
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2, default=bl._json_default) + "\n")
        print(f"wrote {args.out}")
    else:
        print(f"wrote {bl.write_results('imagefolder', payload)}")
    if not args.keep_workdir:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
