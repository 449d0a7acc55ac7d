"""Shared helpers of the bancache benchmarks: machine info, alternating timers, tables, results, synthetic
data and the small image models the benchmarks train.

Not part of the library: nothing in `pipeline/` imports this. Every benchmark measures *ratios of arms run
side by side in one process*, alternating the arms' order on each repetition, and reports medians, so a
machine shared with other jobs slows every arm alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.cache.store import LogitStore  # noqa: E402
from pipeline.core.machine import cpu_model  # noqa: E402
from pipeline.models.registry import ARCHS, register  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FINGERPRINT = "be" * 32  # dataset fingerprint of synthetic stores (no dataset behind them)


# -- machine and results -------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import zarr

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "mem_total_gib": _meminfo_gib("MemTotal"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu_model()}",
        **git_state(),
    }
    return info


def git_state() -> dict[str, Any]:
    """Commit of the measured code, and whether pipeline/ had uncommitted changes."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "git_commit": git("rev-parse", "HEAD") or None,
        "pipeline_dirty": bool(git("status", "--porcelain", "--", "pipeline")),
    }


def _meminfo_gib(key: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits (or as integers when large)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def set_threads(n: int) -> None:
    """Fix torch's intra-op threads. On a small shared machine, OpenMP threads that spin-wait for a busy
    core make multi-threaded timings erratic (a 2 ms step measured at 27 ms with 2 threads under load)."""
    if n > 0:
        torch.set_num_threads(n)


# -- timing ---------------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: list[float]) -> list[float]:
    """[min, max] of the repetitions, for the tables' context."""
    return [float(min(xs)), float(max(xs))] if xs else []


def alternate(
    arms: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Run every arm `warmup` untimed times, then `reps` timed rounds; in round r the arms run in the order
    rotated by r, so no arm is always first (cold caches) or last. Returns wall seconds per call, per arm;
    `cpu`, if given, receives this process's CPU seconds per call (all its threads), which other jobs on a
    shared machine inflate much less than wall time."""
    names = list(arms)
    for _ in range(warmup):
        for n in names:
            arms[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if sync:
                sync()
            t0, c0 = time.perf_counter(), time.process_time()
            arms[n]()
            if sync:
                sync()
            times[n].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(n, []).append(time.process_time() - c0)
    return times


# -- memory ---------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set (VmHWM), in MiB: per process, never reset."""
    return _status_kib("VmHWM") / 1024


# -- working directory ----------------------------------------------------------------------------------
def pick_workdir(requested: str | None, need_bytes: int, prefix: str) -> Path:
    """A fresh temporary directory with room for `need_bytes` (x1.3): under `requested`, else the system
    temp dir, else benchmarks/.work (ignored by git)."""
    candidates = [Path(requested)] if requested else [Path(tempfile.gettempdir()), Path(__file__).parent / ".work"]
    for base in candidates:
        base.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(base).free >= need_bytes * 1.3:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    raise SystemExit(
        f"no directory among {[str(c) for c in candidates]} has {need_bytes / 2**30:.1f} GiB free; "
        f"pass --workdir on a larger disk"
    )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def dir_files(path: Path) -> int:
    return sum(1 for f in Path(path).rglob("*") if f.is_file())


# -- synthetic data -------------------------------------------------------------------------------------
def teacher_like_logits(rng: np.random.Generator, n: int, c: int, accuracy: float = 0.9) -> np.ndarray:
    """(n, c) float32 logits shaped like a trained teacher's: Gaussian dark knowledge (sd 2) plus a bump of
    2..12 on one class, the label's for `accuracy` of the rows. Same recipe as benchmarks/inspect_large.py."""
    y = rng.integers(0, c, n)
    logits = rng.normal(0.0, 2.0, (n, c)).astype(np.float32)
    pred = np.where(rng.random(n) < accuracy, y, rng.integers(0, c, n))
    logits[np.arange(n), pred] += rng.uniform(2.0, 12.0, n).astype(np.float32)
    return logits


def synthetic_images(n_train: int, n_test: int, classes: int, seed: int = 0, size: int = 32) -> dict[str, np.ndarray]:
    """CIFAR-shaped float32 images (N, 3, size, size): a smooth random template per class plus noise, so a
    small conv net learns something within an epoch. Only the shapes matter for timing."""
    rng = np.random.default_rng(seed)
    low = rng.normal(0, 1, (classes, 3, size // 4, size // 4)).astype(np.float32)
    templates = low.repeat(4, axis=2).repeat(4, axis=3)
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n).astype(np.int64)
        x = templates[y] + rng.normal(0, 1.0, (n, 3, size, size)).astype(np.float32)
        out[f"x_{split}"], out[f"y_{split}"] = x.astype(np.float32), y
    return out


def store_attributes(classes: int, fingerprint: str = FINGERPRINT) -> dict[str, Any]:
    return {
        "generation": 0,
        "arch": "synthetic",
        "seed": 0,
        "temperature": 1.0,
        "checkpoint_sha256": "00" * 32,
        "dataset_fingerprint": fingerprint,
        "class_names": [str(i) for i in range(classes)],
    }


def build_synthetic_store(
    path: Path,
    rows: int,
    classes: int,
    chunk_rows: int = 1024,
    dtype: str = "float16",
    seed: int = 0,
    pool_rows: int = 65536,
    **array_kwargs: Any,
) -> LogitStore:
    """A sealed store of teacher-like logits, written chunk-aligned in blocks of about `pool_rows` rows.

    Rows repeat a pool of `pool_rows` distinct rows (generating 1.28M x 1000 fresh normals would dominate
    the benchmark); each chunk is compressed on its own, so on-disk size and decode cost are those of fresh
    data. `array_kwargs` (e.g. `shards=`, `compressors=`) prototype layouts that `LogitStore.create` does not
    offer: the arrays are then created with plain zarr, attributes and marker exactly as the library's."""
    rng = np.random.default_rng(seed)
    pool = teacher_like_logits(rng, min(pool_rows, rows), classes).astype(dtype)
    attrs = store_attributes(classes)
    if not array_kwargs:
        store = LogitStore.create(path, {"train": rows}, classes, 1, dtype, chunk_rows, attrs)
        write_rows = chunk_rows
    else:
        store = _create_custom(path, rows, classes, dtype, chunk_rows, attrs, **array_kwargs)
        write_rows = array_kwargs.get("shards", (chunk_rows,))[0]
    step = max(write_rows, (len(pool) // write_rows) * write_rows)
    for start in range(0, rows, step):
        m = min(step, rows - start)
        block = pool[np.arange(start, start + m) % len(pool)]
        store.write("train", start, block)
    store.seal()
    return LogitStore.open(path, fingerprint=FINGERPRINT, rows={"train": rows}, num_classes=classes)


def _create_custom(
    path: Path, rows: int, classes: int, dtype: str, chunk_rows: int, attrs: dict[str, Any], **array_kwargs: Any
) -> LogitStore:
    import zarr

    from pipeline.cache.store import FORMAT

    full = {
        **attrs,
        "format": FORMAT,
        "dtype": dtype,
        "views": 1,
        "num_classes": classes,
        "splits": {"train": rows},
        "chunk_rows": chunk_rows,
    }
    group = zarr.create_group(str(path), overwrite=True, attributes=full)
    group.create_array(
        "train",
        shape=(rows, 1, classes),
        chunks=(chunk_rows, 1, classes),
        dtype=dtype,
        fill_value=np.nan,
        **array_kwargs,
    )
    return LogitStore(path, group)


# -- models ---------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """Post-activation residual block (conv-BN-ReLU-conv-BN + shortcut, ReLU); 1x1 conv shortcut on a change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.sc: nn.Module = nn.Identity()
        if cin != cout or stride > 1:
            self.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.sc(x))


def _channels(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"expects inputs (channels, height, width), got {input_shape}")
    return int(input_shape[0])


def bench_cnn2d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small conv net for 32x32 images: stride-2 stem (16 ch), two residual blocks (32, 64 ch, stride 2),
    global pool, linear head. ~4.6k samples/s training on one 2020s x86 core."""
    w = 16
    return nn.Sequential(
        nn.Conv2d(_channels(input_shape), w, 3, 2, 1),
        nn.ReLU(),
        _Block(w, 2 * w, 2),
        _Block(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def bench_resnet8(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-8 for 32x32 images (16/32/64 channels, one basic block per stage, full-resolution stem)."""
    w = 16
    return nn.Sequential(
        nn.Conv2d(_channels(input_shape), w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        _Block(w, w, 1),
        _Block(w, 2 * w, 2),
        _Block(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


# Registered in this process only (the registry is a dict), so the library's own build_model, checkpoint
# loading and export can run these architectures; pipeline/models.py is not changed.
for _name, _fn in (("bench_cnn2d", bench_cnn2d), ("bench_resnet8", bench_resnet8)):
    if _name not in ARCHS:
        register(_name)(_fn)


def write_dataset(root: Path, dataset: str, setting: dict[str, Any], uint8: bool = False):  # -> PreparedData
    """dataset.h5 under `root`: MNIST-1D (4000 train, 1000 test rows) or synthetic images per `setting`.
    `uint8`: the images quantised to uint8, as CIFAR is stored: the library augments (crop and flip) only
    uint8 images, so a benchmark with augmentation needs them to compare like with like."""
    from pipeline.data.prepared import MNIST1D_CLASSES, load_prepared, make_mnist1d, write_prepared

    if dataset == "mnist1d":
        arrays, names = make_mnist1d(5000), MNIST1D_CLASSES
    else:
        arrays = synthetic_images(setting["n_train"], setting["n_test"], setting["classes"])
        names = [str(i) for i in range(setting["classes"])]
        if uint8:
            for split in ("train", "test"):
                x = arrays[f"x_{split}"]
                arrays[f"x_{split}"] = np.clip(x * 32.0 + 128.0, 0, 255).astype(np.uint8)
    write_prepared(root / "dataset.h5", arrays, names, dataset, val_fraction=0.1, split_seed=0)
    return load_prepared(root / "dataset.h5")
