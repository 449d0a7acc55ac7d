"""Every GPU measurement the README promises, in one command (issue 23); `benchmarks/gpu.sh` runs it.

Steps, in this order (most wanted first: the total budget cuts from the end). Each runs in its own
subprocess of this script with its own time limit, so a step that fails or hangs is recorded in the summary
and the next one still runs; each writes `<out>/<step>.json` (device name, torch, CUDA and cuDNN versions,
commit, sizes, its numbers) and `<out>/logs/<step>.log`, and `<out>/summary.md` (with `summary.json`) is
rewritten after every step, so a run killed from outside keeps what it finished.

  student_step-b512   benchmarks/student_step.py's arms (`bench_setting`) at batch 512: synthetic-images
                      (10k 3x32x32 uint8 images, 100 classes), resnet20, --augment; the library's resident
                      arms, its streaming arms and the reference loop, 5 alternating rounds, and peak memory
                      (one subprocess per arm)
  student_step-b128   the same at batch 128, without the memory subprocesses
  export-50k          benchmarks/export.py's arms (`bench_setting`) at 50,000 rows: export overlapped with
                      its writes, sequential (write_ahead=0), and the bare inference
  chain               the 4-generation chain of configs/cifar10-resnet20-gpu.yaml through the CLI
                      (`python3 -m stages.cli`, in dvc.yaml's order, prepare to ensemble) on the packed
                      12k+3k CIFAR-10 subset (--data), wall time per stage
  syncs               host synchronisations per epoch under torch.cuda.set_sync_debug_mode("warn"), counted
                      as its warnings: resident path and streaming path (train.memory_budget_mib 0), each
                      for generation 0 (labels) and 1 (from generation 0's store)
  deterministic       epoch time of the config's recipe with deterministic false (the config) and true
  compile             epoch time with compile false (the config) and true (the first epoch separately: it
                      pays the compilation)

    bash benchmarks/gpu.sh                     # on a CUDA machine: .device/data from ../shared/gpu/pack.sh
    bash benchmarks/gpu.sh --dry-run --out /tmp/gpu-dry   # the same steps on the CPU at tiny sizes

Time on an H100/H200, estimated (not measured: no GPU was lent to the session that wrote this), for the
default 480 s budget: student_step-b512 ~90 s (setup ~15 s, 8 arms x 6 epochs of 0.2-1 s, 7 memory
subprocesses of ~6 s), student_step-b128 ~40 s, export-50k ~45 s (generating and hashing 50k float images is
most of it), chain ~120 s (10 stages, each a fresh Python paying ~5 s of imports and CUDA start; 4 x 30
epochs of ~0.4 s), syncs ~30 s, deterministic ~30 s, compile ~90 s (inductor's compilation of resnet20):
about 7.5 minutes. A step gets at most its own limit (`Sizes.limits`) and what is left of the budget.

--dry-run: the same steps and code paths on the CPU at tiny sizes (benchmarks' `tiny-images` settings, a
fabricated npz dataset of 240 + 60 images, 2 generations of 1 epoch, cnn3 in place of resnet20, no memory
subprocesses, one torch thread) so that
tests/test_gpu_script.py keeps this script from rotting between GPU runs. On the CPU the sync counts are
recorded as skipped (torch.cuda.set_sync_debug_mode needs a CUDA device) and `compile: true` is skipped
(measured once on the 2-core VM: see COMPILE_ON_CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _benchlib import REPO, machine_info, median, table

from pipeline import DataParams, ExportParams, GenParams, TrainParams, export_store, prepare_data, train_model
from pipeline.data.prepared import PreparedData
from pipeline.params import parse_section
from pipeline.results.ensemble import read_ensemble_metrics
from pipeline.train.loop import EpochLog, TrainResult
from stages.common import load_yaml

CONFIG = REPO / "configs" / "cifar10-resnet20-gpu.yaml"
STEPS = ("student_step-b512", "student_step-b128", "export-50k", "chain", "syncs", "deterministic", "compile")
RESERVE_S = 10  # of the total budget, kept for the last summary
MIN_STEP_S = 20  # a step is not started with less time than this left
COMPILE_ON_CPU = (
    "on the CPU: with torch.compile the dry run's first cnn3 epoch took 165 s (0.9 s without) on the "
    "2-core VM at load ~4 (measured once, 2026-12-01); the GPU run measures it"
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each step runs at: the GPU run's sizes, or the dry run's tiny ones."""

    device: str
    student_dataset: str  # a benchmarks/student_step.py setting
    student_arch: str
    student_reps: int
    export_dataset: str  # a benchmarks/export.py setting
    export_reps: int
    train: dict[str, Any]  # overrides of the config's train section (chain and short runs)
    export_device: str
    n_train: int | None  # data rows of the chain and short runs (None: the config's)
    n_test: int | None
    mem_reps: int  # student_step's memory subprocesses per arm at batch 512 (0: not measured)
    chain_students: int | None  # students of the chain (None: the config's 3)
    short_epochs: int  # epochs of each run of syncs, deterministic and compile (the first is set apart)
    rounds: int  # alternating rounds of deterministic (compile: one, each round recompiles)
    compile_on_device: bool
    limits: dict[str, int]  # seconds per step at most


GPU = Sizes(
    device="cuda",
    student_dataset="synthetic-images",
    student_arch="resnet20",
    student_reps=5,
    export_dataset="synthetic-images-50k",
    export_reps=5,
    train={"device": "cuda"},
    export_device="cuda",
    n_train=None,
    n_test=None,
    mem_reps=1,
    chain_students=None,
    short_epochs=5,
    rounds=2,
    compile_on_device=True,
    limits={
        "student_step-b512": 150,
        "student_step-b128": 90,
        "export-50k": 90,
        "chain": 210,
        "syncs": 90,
        "deterministic": 90,
        "compile": 150,
    },
)
DRY = Sizes(
    device="cpu",
    student_dataset="tiny-images",
    student_arch="bench_cnn2d",
    student_reps=2,
    export_dataset="tiny-images",
    export_reps=2,
    train={"device": "cpu", "epochs": 1, "batch_size": 64, "eval_batch_size": 256, "arch": "cnn3", "lr": 0.05},
    export_device="cpu",
    n_train=200,
    n_test=50,
    mem_reps=0,
    chain_students=1,
    short_epochs=2,
    rounds=1,
    compile_on_device=False,
    limits=dict.fromkeys(STEPS, 300),
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One step's context: sizes, where the results, the data and the scratch files are."""

    dry: bool
    sizes: Sizes
    out: Path
    data: Path  # folder of train.npz and test.npz
    work: Path  # scratch, shared by the steps of one run
    commit: str


# -- environment --------------------------------------------------------------------------------------
def git_commit() -> str:
    """HEAD of the measured tree, or "unknown" where there is no git (the device copy may have no .git)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def environment(commit: str, dry: bool) -> dict[str, Any]:
    """What every results file carries: the device, torch, CUDA and cuDNN versions, the commit."""
    cuda = torch.cuda.is_available()
    machine = {**machine_info(), "git_commit": commit}
    env: dict[str, Any] = {
        "dry_run": dry,
        "device_name": machine["device_name"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": machine["python"],
        "commit": commit,
        "date_utc": machine["date_utc"],
        "machine": machine,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "memory_gib": props.total_memory / 2**30, "capability": props.major}
    return env


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    return str(o)


# -- data ---------------------------------------------------------------------------------------------
def fabricate_npz(folder: Path, n_train: int = 240, n_test: int = 60, classes: int = 10) -> Path:
    """A tiny dataset in the layout ../shared/gpu/pack.sh writes (x uint8 (N, 32, 32, 3), y int64, classes):
    class-balanced rows, each class a colour plus noise, so a network learns something in an epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, (classes, 1, 1, 3))
    names = np.array([f"class{c}" for c in range(classes)])
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.permutation(np.arange(n) % classes).astype(np.int64)
        x = np.clip(colours[y] + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        np.savez_compressed(folder / f"{split}.npz", x=x, y=y, classes=names)
    return folder


def config() -> dict[str, Any]:
    """configs/cifar10-resnet20-gpu.yaml, parsed as the CLI parses params files."""
    raw = load_yaml(CONFIG.read_text())
    assert isinstance(raw, dict)
    return raw


def data_section(r: Run) -> dict[str, Any]:
    """The config's data section on the packed (or fabricated) npz folder, at the run's sizes."""
    d = {**config()["data"], "dataset": "npz", "root": str(r.data.resolve())}
    if r.sizes.n_train is not None:
        d.update(n_train=r.sizes.n_train, n_test=r.sizes.n_test)
    return d


def prepared(r: Run) -> PreparedData:
    """The config's dataset, prepared once per run in the scratch folder (the steps after share it)."""
    path = r.work / "npz-dataset.h5"
    params = parse_section(DataParams, "data", data_section(r))
    if path.exists():
        from pipeline.data.prepared import load_prepared

        return load_prepared(path)
    return prepare_data(path, params=params)


def recipe(r: Run, **over: Any) -> TrainParams:
    """The config's train section with the run's overrides (device, sizes) and `over`."""
    raw = {**config()["train"], **r.sizes.train, "epochs": r.sizes.short_epochs, **over}
    return parse_section(TrainParams, "train", raw)


# -- student_step and export: the benchmarks' own functions --------------------------------------------
def student(r: Run, batch: int, mem_reps: int) -> dict[str, Any]:
    """benchmarks/student_step.py's arms at `batch` (its `bench_setting`, as `--augment --arch` run it)."""
    import student_step

    s = r.sizes
    args = argparse.Namespace(
        dataset=s.student_dataset,
        arch=s.student_arch,
        augment=True,
        batch_size=batch,
        device=s.device,
        reps=s.student_reps,
        threads=1,
        mem_reps=mem_reps,
        mem_epochs=1,
        workdir=str(r.work),
        keep=False,
    )
    student_step.set_threads(args.threads)
    res = student_step.bench_setting(args, s.student_dataset)
    res["table_markdown"] = student_step.report(res)
    res["ratios"] = student_ratios(res["arms"])
    return res


RATIOS = {  # epoch-time ratios of student_step arms, as (numerator, denominator): the summary's rows
    "plain / reference": ("plain", "reference"),
    "offline / reference-offline": ("offline", "reference-offline"),
    "offline / plain": ("offline", "plain"),
    "offline / online": ("offline", "online"),
    "plain-stream / plain": ("plain-stream", "plain"),
    "offline-stream / offline": ("offline-stream", "offline"),
    "offline-stream / plain-stream": ("offline-stream", "plain-stream"),
    "offline-stream / online": ("offline-stream", "online"),
}


def student_ratios(arms: dict[str, Any]) -> dict[str, float]:
    """Median per-round ratio of epoch times (arms run side by side, rotated each round) for RATIOS."""
    return {
        name: median([a / b for a, b in zip(arms[x]["epoch_s_all"], arms[y]["epoch_s_all"], strict=True)])
        for name, (x, y) in RATIOS.items()
    }


def export_step(r: Run) -> dict[str, Any]:
    """benchmarks/export.py's arms (overlapped, sequential, inference) at the run's size."""
    import export as export_bench

    args = argparse.Namespace(device=r.sizes.device, workdir=str(r.work), reps=r.sizes.export_reps, threads=1)
    export_bench.set_threads(args.threads)
    return export_bench.bench_setting(args, r.sizes.export_dataset)


# -- the chain through the CLI -------------------------------------------------------------------------
def chain_params(r: Run) -> dict[str, Any]:
    """The GPU config with data on the npz folder and the run's train/export overrides."""
    raw = config()
    raw["data"] = data_section(r)
    raw["train"] = {**raw["train"], **r.sizes.train}
    raw["export"] = {**raw["export"], "device": r.sizes.export_device}
    if r.sizes.chain_students is not None:
        raw["students"] = {k: v for k, v in raw["students"].items() if int(k) <= r.sizes.chain_students}
    return raw


def chain_commands(raw: dict[str, Any]) -> list[list[str]]:
    """The stages `dvc repro` runs for the chain, in its order (dvc.yaml: prepare, teacher, export_teacher,
    train@K, export@K, ..., ensemble); a generation's teacher is always an earlier one (params checks)."""
    gens = [0, *sorted(int(k) for k in raw.get("students") or {})]
    cmds = [["prepare"]]
    for g in gens:
        cmds += [["train", "--gen", str(g), "--resume"], ["export-logits", "--gen", str(g)]]
    return [*cmds, ["ensemble"]]


def chain_step(r: Run) -> dict[str, Any]:
    """Each stage of the chain as `python3 -m stages.cli` in a fresh root; wall time per stage."""
    root = r.work / "chain"
    root.mkdir(parents=True, exist_ok=True)
    raw = chain_params(r)
    params = root / "params.yaml"
    params.write_text(json.dumps(raw, indent=2) + "\n")  # JSON is YAML 1.2
    stages = []
    for cmd in chain_commands(raw):
        argv = [sys.executable, "-m", "stages.cli", "--params", str(params), "--root", str(root), *cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        print(f"$ bancache {' '.join(cmd)}  ({wall:.1f} s, exit {proc.returncode})\n{proc.stderr[-4000:]}", flush=True)
        if proc.returncode:
            raise RuntimeError(f"stage {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        stages.append({"stage": " ".join(cmd), "wall_s": wall})
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((root / "metrics" / "train").glob("gen-*.json"))}
    return {
        "stages": stages,
        "total_s": sum(s["wall_s"] for s in stages),
        "test_acc": {k: m.get("test_acc") for k, m in metrics.items()},
        "ensemble": read_ensemble_metrics(root / "metrics" / "ensemble")["accuracy"],
        "params": raw,
    }


# -- host synchronisations per epoch -------------------------------------------------------------------
SYNC_WARNING = "synchroniz"  # torch: "called a synchronizing CUDA operation"


def count_syncs(train: Callable[[Callable[[EpochLog], None]], TrainResult], cuda: bool) -> dict[str, Any]:
    """Run `train(on_epoch)` recording every warning; on CUDA under set_sync_debug_mode("warn"), which warns
    once per synchronising call. Per epoch: the sync warnings between consecutive on_epoch calls (epoch 1
    also holds the setup). On the CPU the run goes through the same path and the counts are None."""
    marks: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = train(lambda _log: marks.append(len(caught)))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    epochs = [h.seconds for h in result.history]
    if not cuda:
        return {"epoch_s": epochs, "syncs_per_epoch": None, "skipped": "no CUDA device (set_sync_debug_mode needs one)"}
    is_sync = [SYNC_WARNING in str(w.message).lower() for w in caught]
    bounds = [0, *marks]
    per_epoch = [sum(is_sync[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    later = caught[marks[0] :] if marks else []
    where = Counter(f"{_short(w.filename)}:{w.lineno}" for w in later if SYNC_WARNING in str(w.message).lower())
    return {
        "epoch_s": epochs,
        "syncs_per_epoch": per_epoch,
        "syncs_per_epoch_after_first": median([float(c) for c in per_epoch[1:]]),
        "syncs_in_first_epoch_and_setup": per_epoch[0] if per_epoch else None,
        "where_after_first": dict(where.most_common(10)),
        "other_warnings": len(caught) - sum(is_sync),
    }


def _short(filename: str) -> str:
    p = Path(filename)
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else filename


def syncs_step(r: Run) -> dict[str, Any]:
    """Generation 0 (labels) and 1 (BAN, from generation 0's store) on the resident and the streaming path."""
    data, cuda = prepared(r), r.sizes.device == "cuda"
    teacher, store = r.work / "syncs" / "gen-0.pt", r.work / "syncs" / "cache-0"
    teacher.parent.mkdir(parents=True, exist_ok=True)
    train_model(data, gen=0, recipe=recipe(r, epochs=1), out=teacher)
    export_store(teacher, data, store, params=ExportParams(device=r.sizes.export_device), device=r.sizes.device)
    arms: dict[str, Any] = {}
    for path, budget in (("resident", 4096), ("streaming", 0)):
        for gen, gp in ((0, GenParams(loss="ce")), (1, GenParams(teacher=0, loss="ban"))):
            rec, src = recipe(r, memory_budget_mib=budget), store if gen else None

            def train(
                on_epoch: Callable[[EpochLog], None], g: int = gen, p: GenParams = gp, t: Any = rec, s: Any = src
            ) -> TrainResult:
                return train_model(data, gen=g, recipe=t, generation=p, teacher_store=s, on_epoch=on_epoch)

            arms[f"{path} gen {gen} ({gp.loss})"] = count_syncs(train, cuda)
    return {"epochs": r.sizes.short_epochs, "arms": arms}


# -- deterministic and compile -------------------------------------------------------------------------
def reset_flags() -> None:
    """Undo what an earlier run set process-wide: `seed_everything` turns deterministic algorithms on for
    deterministic: true but never off again, and cudnn.benchmark on for false."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = False


def setting_step(r: Run, key: str) -> dict[str, Any]:
    """Epoch time of the config's recipe with `key` as the config sets it and flipped, alternating rounds
    (compile: one round, each round compiles a new model); the first epoch is reported apart."""
    data = prepared(r)
    base = getattr(recipe(r), key)
    arms = {f"{key}: {str(base).lower()} (config)": {}, f"{key}: {str(not base).lower()}": {key: not base}}
    skipped = {}
    if key == "compile" and r.sizes.device == "cpu" and not r.sizes.compile_on_device:
        skipped = {name: COMPILE_ON_CPU for name, over in arms.items() if over.get("compile")}
    rounds = 1 if key == "compile" else r.sizes.rounds
    runs: dict[str, list[list[float]]] = {name: [] for name in arms if name not in skipped}
    for k in range(rounds):
        order = list(runs)[k % len(runs) :] + list(runs)[: k % len(runs)]
        for name in order:
            reset_flags()
            res = train_model(data, gen=0, recipe=recipe(r, **arms[name]))
            runs[name].append([h.seconds for h in res.history])
    out: dict[str, Any] = {name: {"skipped": skipped[name]} if name in skipped else {} for name in arms}
    first = next(iter(runs))
    for name, epochs in runs.items():
        out[name] = {
            "epoch_s_all": epochs,
            "first_epoch_s": median([e[0] for e in epochs]),
            "epoch_s_median": median([median(e[1:] or e) for e in epochs]),
            "ratio_vs_config": median(
                [median(e[1:] or e) / median(b[1:] or b) for e, b in zip(epochs, runs[first], strict=True)]
            ),
        }
    return {"key": key, "epochs": r.sizes.short_epochs, "rounds": rounds, "arms": out}


STEP_FUNCS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "student_step-b512": lambda r: student(r, 512, mem_reps=r.sizes.mem_reps),
    "student_step-b128": lambda r: student(r, 128, mem_reps=0),
    "export-50k": export_step,
    "chain": chain_step,
    "syncs": syncs_step,
    "deterministic": lambda r: setting_step(r, "deterministic"),
    "compile": lambda r: setting_step(r, "compile"),
}


# -- summary -------------------------------------------------------------------------------------------
def load_results(out: Path, status: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The `result` of each step that finished, by step name."""
    return {n: json.loads((out / f"{n}.json").read_text())["result"] for n, s in status.items() if s["status"] == "ok"}


def _verdict(value: float | None, ok: bool) -> list[Any]:
    return ["-", "n/a (step did not finish)"] if value is None else [value, "PASS" if ok else "MISS"]


def target_rows(res: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """The issue's targets against what was measured: [target, value, PASS/MISS]."""
    rows = []
    for batch in (512, 128):
        st = res.get(f"student_step-b{batch}")
        q = st["ratios"] if st else {}
        speed = 1 / q["plain / reference"] if st else None
        rows.append(
            [
                f"library plain images/s >= 0.9 x the reference loop's (batch {batch})",
                *_verdict(speed, 0.9 <= (speed or 0)),
            ]
        )
        for name, bound in (("offline / plain", 1.03), ("offline / online", 0.85)):
            v = q.get(name)
            rows.append([f"{name} <= {bound} (epoch time, batch {batch})", *_verdict(v, v is not None and v <= bound)])
    ex = res.get("export-50k")
    v = ex["export_over_inference"] if ex else None
    rows_n = ex["rows"] if ex else "50,000"
    rows.append([f"export / inference <= 1.2 at {rows_n} rows (overlapped)", *_verdict(v, v is not None and v <= 1.2)])
    ch = res.get("chain")
    v = ch["total_s"] if ch else None
    rows.append(
        ["4-generation chain through the CLI < 180 s (prepare to ensemble)", *_verdict(v, v is not None and v < 180)]
    )
    return rows


def student_section(res: dict[str, dict[str, Any]]) -> str:
    runs = {b: res.get(f"student_step-b{b}") for b in (512, 128)}
    head = ["epoch-time ratio (median of per-round ratios)", *[f"batch {b}" for b in runs]]
    rows = [[name, *[r["ratios"][name] if r else float("nan") for r in runs.values()]] for name in RATIOS]
    tables = "\n".join(r["table_markdown"] for r in runs.values() if r)
    return (
        f"## student_step (library / reference, offline / plain, offline / online)\n\n{table(head, rows)}\n\n{tables}"
    )


def export_section(ex: dict[str, Any] | None) -> str:
    if not ex:
        return "## export\n\nnot measured (see Steps)\n"
    rows = [
        ["export (overlapped)", ex["export_s_median"], ex["export_over_inference"]],
        ["export-sequential (write_ahead=0)", ex["export_sequential_s_median"], ex["export_sequential_over_inference"]],
        ["inference (predict_logits)", ex["inference_s_median"], 1.0],
    ]
    return f"## export at {ex['rows']} rows ({ex['arch']}, {ex['reps']} rounds)\n\n" + table(
        ["arm", "s (median)", "/ inference"], rows
    )


def chain_section(ch: dict[str, Any] | None) -> str:
    if not ch:
        return "## chain\n\nnot measured (see Steps)\n"
    rows = [[s["stage"], s["wall_s"]] for s in ch["stages"]] + [["total", ch["total_s"]]]
    acc = ", ".join(f"{k} {v}" for k, v in ch["test_acc"].items())
    return (
        f"## chain: {CONFIG.relative_to(REPO)} through the CLI\n\n{table(['stage', 'wall s'], rows)}\n\n"
        f"- test accuracy: {acc}\n- ensembles: {ch['ensemble']}\n"
    )


def syncs_section(sy: dict[str, Any] | None) -> str:
    if not sy:
        return "## host synchronisations per epoch\n\nnot measured (see Steps)\n"
    rows = []
    for name, a in sy["arms"].items():
        if a["syncs_per_epoch"] is None:
            rows.append([name, f"skipped: {a['skipped']}", "-", median(a["epoch_s"]), "-"])
            continue
        where = "; ".join(f"{k} x{v}" for k, v in list(a["where_after_first"].items())[:4])
        rows.append(
            [name, a["syncs_per_epoch_after_first"], a["syncs_in_first_epoch_and_setup"], median(a["epoch_s"]), where]
        )
    head = ["path, generation", "syncs / epoch (after the first)", "first epoch + setup", "epoch s", "where (top 4)"]
    return f"## host synchronisations per epoch ({sy['epochs']} epochs per run)\n\n{table(head, rows)}"


def settings_section(res: dict[str, dict[str, Any]]) -> str:
    rows = []
    for key in ("deterministic", "compile"):
        st = res.get(key)
        if not st:
            rows.append([key, "not measured (see Steps)", "-", "-"])
            continue
        for name, a in st["arms"].items():
            if "skipped" in a:
                rows.append([name, f"skipped: {a['skipped']}", "-", "-"])
            else:
                rows.append([name, a["epoch_s_median"], a["first_epoch_s"], a["ratio_vs_config"]])
    head = ["setting", "epoch s (median, after the first)", "first epoch s", "/ config"]
    return f"## deterministic and compile (epoch time of the config's recipe)\n\n{table(head, rows)}"


def write_summary(out: Path, env: dict[str, Any], status: dict[str, dict[str, Any]], wall: float, budget: int) -> str:
    """summary.md (every ratio, the chain per stage, the sync counts, the targets) and summary.json."""
    res = load_results(out, status)
    dry = "**Dry run** (CPU, tiny sizes): checks the script, measures nothing the targets are about.\n\n"
    head = (
        f"# GPU measurements (benchmarks/gpu.py)\n\n{dry if env['dry_run'] else ''}"
        f"{env['device_name']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python "
        f"{env['python']}; commit {env['commit']}; {env['date_utc']}; {wall:.0f} s of the {budget} s budget.\n"
    )
    steps = [
        [n, s["status"], s.get("wall_s", float("nan")), f"{n}.json" if s["status"] == "ok" else s.get("log", "-")]
        for n, s in status.items()
    ]
    parts = [
        head,
        "## Steps\n\n" + table(["step", "status", "wall s", "results"], steps),
        "## Targets\n\n" + table(["target", "measured", "verdict"], target_rows(res)),
        student_section(res),
        export_section(res.get("export-50k")),
        chain_section(res.get("chain")),
        syncs_section(res.get("syncs")),
        settings_section(res),
    ]
    failed = [
        f"### {n}: {s['status']}\n\n```\n{s.get('log_tail', s.get('reason', ''))}\n```"
        for n, s in status.items()
        if s["status"] != "ok"
    ]
    if failed:
        parts.append("## Failures\n\n" + "\n\n".join(failed))
    text = "\n\n".join(p.rstrip("\n") for p in parts) + "\n"
    (out / "summary.md").write_text(text)
    write_json(
        out / "summary.json", {**env, "wall_s": wall, "budget_s": budget, "steps": status, "targets": target_rows(res)}
    )
    return text


# -- orchestration -------------------------------------------------------------------------------------
def run_child(name: str, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """`name` in a subprocess of this script (its own process group: a timeout kills its children too)."""
    out = Path(args.out)
    (out / f"{name}.json").unlink(missing_ok=True)  # an older run's file is not this run's result
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out), "--data", args.data]
    cmd += ["--workdir", args.workdir, "--commit", args.commit, *(["--dry-run"] if args.dry_run else [])]
    log = out / "logs" / f"{name}.log"
    t0, rc = time.perf_counter(), None
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - t0
    ok = rc == 0 and (out / f"{name}.json").exists()
    entry: dict[str, Any] = {"status": "ok" if ok else ("failed" if rc is not None else f"timed out ({limit:.0f} s)")}
    entry.update(wall_s=wall, limit_s=limit, exit=rc, log=f"logs/{name}.log")
    if not ok:
        entry["log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    print(f"[gpu.py] {name}: {entry['status']} in {wall:.1f} s", flush=True)
    return entry


def orchestrate(args: argparse.Namespace) -> int:
    sizes = DRY if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu.py: error: no CUDA device here. Run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    out, keep = Path(args.out).resolve(), args.keep or args.workdir is not None
    (out / "logs").mkdir(parents=True, exist_ok=True)
    args.out = str(out)  # the steps run from the repository root: every path they get is absolute
    args.workdir = str(Path(args.workdir or tempfile.mkdtemp(prefix="bancache-gpu-")).resolve())
    if args.data is None:
        args.data = str(fabricate_npz(Path(args.workdir) / "npz") if args.dry_run else REPO / ".device" / "data")
    args.data = str(Path(args.data).resolve())
    if not all((Path(args.data) / f"{s}.npz").exists() for s in ("train", "test")):
        print(
            f"gpu.py: error: {args.data} lacks train.npz/test.npz. Run bash ../shared/gpu/pack.sh (it writes "
            ".device/data) or pass --data",
            file=sys.stderr,
        )
        return 2
    args.commit = args.commit or git_commit()
    if args.dry_run:  # one torch thread in every step: OpenMP threads spin-waiting on a loaded small CPU cost 10x
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    env, budget = environment(args.commit, args.dry_run), args.budget_s or (1200 if args.dry_run else 480)
    status: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    for name in args.steps:
        left = budget - (time.monotonic() - t0) - RESERVE_S
        if left < MIN_STEP_S:
            status[name] = {"status": "skipped", "reason": f"the total budget of {budget} s was spent"}
        else:
            status[name] = run_child(name, args, min(sizes.limits[name], left))
        write_summary(out, env, status, time.monotonic() - t0, budget)
    text = write_summary(out, env, status, time.monotonic() - t0, budget)
    if not keep:
        import shutil

        shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"\n{text}\nwrote {out / 'summary.md'} and one JSON per step", flush=True)
    return 0 if all(s["status"] == "ok" for s in status.values()) else 1


def child_main(args: argparse.Namespace) -> int:
    """One step (`--step`): its numbers and the environment into <out>/<step>.json."""
    sizes = DRY if args.dry_run else GPU
    r = Run(args.dry_run, sizes, Path(args.out), Path(args.data), Path(args.workdir), args.commit)
    r.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = STEP_FUNCS[args.step](r)
    payload = {"benchmark": args.step, **environment(r.commit, r.dry), "sizes": dataclasses.asdict(sizes)}
    write_json(r.out / f"{args.step}.json", {**payload, "wall_s": time.perf_counter() - t0, "result": result})
    return 0


def steps_arg(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step {unknown[0]!r}; the steps are {', '.join(STEPS)}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    default_out = os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / "gpu")
    ap.add_argument("--out", default=default_out, help="results folder (default: $OUT, else benchmarks/results/gpu)")
    ap.add_argument(
        "--data", default=None, help="folder of train.npz, test.npz (default .device/data; dry run: fabricated)"
    )
    ap.add_argument("--steps", type=steps_arg, default=list(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--budget-s", type=int, default=0, help="total seconds for all steps (default 480; dry run 1200)")
    ap.add_argument("--commit", default="", help="commit to record (default: git rev-parse HEAD, else unknown)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, in the orchestrator's subprocess
    args = ap.parse_args()
    if args.step:
        return child_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
