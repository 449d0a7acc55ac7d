"""Experiments (issue 24): does distillation beat its label-trained and compute-matched controls?

  compression  a label-trained `cnn1d` teacher -> `mlp` students with kd and dkd at T = 2 and T = 4
  ensemble     three label-trained `cnn1d` members -> one `cnn1d` student (teacher [0, 1, 2]); compared
               with BAN from one teacher (gen 0 alone, same loss and T), the controls and the ensemble
  transfer     a teacher trained on the labelled rows of a transfer set (`data.n_unlabelled`), its logits
               over labelled and unlabelled rows; a kd student on every row against label-trained controls
               of equal epochs, equal steps and the chain's steps (configs/mnist1d-transfer.yaml)

Two phases. `--select` (pilot seeds, never reported) chooses every recipe on the validation rows
(`data.val_index`) only: the epochs where the mean validation accuracy over `--convergence-seeds` (0, 6, 7)
stops rising (grid `--epoch-grid`, the params' schedule, so each length is its own run), then on pilot seed
0 per loss the knobs the issue leaves open (kd alpha, dkd beta
with alpha = 1; for the ensemble the kd T and alpha). Without `--select` the choices are read back from the
results JSON. The report phase then runs `--seeds` (default 1..5) in sequence, each in its own project
root through the library's steps (prepare_generation / train_job / export_generation / train_control);
seed s trains with train.seed = 100 * s, generation K with 100 * s + K unless said otherwise.

Per seed, every student of a seed shares one seed (so one paired control serves them all: same initial
weights and batch order, labels only, `train_control`), and the compute-matched control is the same network
from labels with that seed and the epochs of every training behind the student (compression: E_t + E_s;
ensemble: 4 E). Writes, after every seed, benchmarks/results/kd_<experiment>_<dataset>.json (machine, args,
selection with every pilot score, per-seed records: test and val accuracy, epochs, seconds of each network)
and the .md table beside it: mean ± sd per arm and, per comparison, the paired mean [95% t-interval] and
the effect its seeds detect with 80% power (`pipeline.core.stats.detectable_effect`), in accuracy points.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kd_experiments.py --experiment compression --select
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kd_experiments.py --experiment ensemble --select
    .venv/bin/python benchmarks/kd_experiments.py --experiment compression --quick --select --out /tmp/kd

The JSON is written once the selection is made and after every seed; `--resume` (without `--select`) keeps
the seeds it already holds and runs the others, so a long image experiment can stop and go on.

A new experiment is one more `Experiment` in EXPERIMENTS: its selection, its per-seed run, its arms and
its comparisons. `--params` (e.g. configs/cifar10-cpu.yaml) and `--num-samples`, `--teacher-arch`,
`--student-arch` run the same experiments on another dataset. With `export.views` > 1 (image datasets) the
students replay the stored views (`view_policy: random`), and every store draws its views with its
generation's seed, so views differ between seeds and generations.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from _benchlib import RESULTS, machine_info, pick_workdir, table

from pipeline.api import prepare_data
from pipeline.cache.store import LogitStore
from pipeline.chain.generation import export_generation, prepare_generation, train_job
from pipeline.core.devices import resolve_device
from pipeline.core.distributed import SINGLE_PROCESS
from pipeline.core.files import write_json, write_text
from pipeline.core.paths import ProjectPaths
from pipeline.core.stats import detectable_effect, paired
from pipeline.data.prepared import PreparedData, load_prepared
from pipeline.models.predict import predict_accuracy
from pipeline.params import DataParams, ExportParams, GenParams, TrainParams, generation_seed, parse_section
from pipeline.results.ensemble import mean_probs, softmax
from pipeline.train.controls import train_control
from pipeline.train.loop import TrainResult, checkpoint_meta, save_generation, train_generation
from stages.common import ParamsFile

PILOT_SEED = 0  # the selection's seed (knobs; its runs are the pilot's networks): never a reported seed
CONVERGENCE_SEEDS = (0, 6, 7)  # convergence: mean validation accuracy over these pilot seeds, none reported


def say(line: str) -> None:
    print(line, flush=True)  # one line per network, seen as it ends (also when stdout is a file)


# -- one experiment's context ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Grids:
    """What selection tries besides the epochs (defaults: the MNIST-1D experiments'; smaller grids keep an
    image experiment inside its hour, README Results (d)). `arms`: the compression students, (loss, T)."""

    arms: tuple[tuple[str, float], ...] = (("kd", 2.0), ("kd", 4.0), ("dkd", 2.0), ("dkd", 4.0))
    kd_alphas: tuple[float, ...] = (0.1, 0.5, 0.9)
    dkd_betas: tuple[float, ...] = (1.0, 2.0, 8.0)
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)  # the ensemble and transfer students' T, with kd_alphas
    student_epochs: tuple[int, ...] | None = None  # compression's student grid; None: twice the teacher's
    transfer_budget: str = "epochs"  # the transfer-set student trains the teacher's epochs, or its steps

    def knobs(self) -> list[dict[str, float]]:
        """The kd student's (T, alpha) grid of the ensemble and transfer experiments."""
        return [{"temperature": t, "alpha": a} for t in self.temperatures for a in self.kd_alphas]


@dataclass
class Context:
    """What every phase needs: the parsed base params, the prepared dataset, the grids and the work folder."""

    raw: dict[str, Any]
    dataset: Path
    data: PreparedData
    work: Path
    teacher_arch: str
    student_arch: str
    epoch_grid: list[int]
    quick: bool
    log: Callable[[str], None] = field(default=say)
    convergence_seeds: tuple[int, ...] = CONVERGENCE_SEEDS
    params: str = "params.yaml"
    reuse: str | None = None  # a results JSON whose convergence records (same data, arch, grid) are reused
    grids: Grids = field(default_factory=lambda: Grids())

    @property
    def views(self) -> int:
        """export.views of the params: image datasets replay that many stored views (view_policy random)."""
        return parse_section(ExportParams, "export", self.raw.get("export", {})).views

    def student(self, gp: GenParams) -> GenParams:
        """A student's params: with stored views (export.views > 1) it replays them, the image and the target
        from the same crop and flip (README "Cached views and sparse caches")."""
        return replace(gp, view_policy="random") if self.views > 1 else gp

    def recipe(self, seed: int, epochs: int) -> TrainParams:
        train = {**self.raw.get("train", {}), "seed": 100 * seed, "epochs": epochs, "arch": self.teacher_arch}
        return parse_section(TrainParams, "train", train)

    def export_params(self, seed: int = 0) -> ExportParams:
        """The params' export section; its views (their crops and flips) drawn with `seed`, which callers make
        the generation's seed, so views differ between seeds and generations."""
        return parse_section(ExportParams, "export", {**self.raw.get("export", {}), "seed": seed})

    def trimmed(self, grid: list[dict[str, float]]) -> list[dict[str, float]]:
        """A knob grid as tried: all of it, or with --quick its second entry (the first of a one-entry grid)."""
        return grid[min(1, len(grid) - 1) :][:1] if self.quick else grid

    def root(self, name: str) -> ProjectPaths:
        """A fresh project root under the work folder holding a copy of the prepared dataset."""
        paths = ProjectPaths(self.work / name)
        if paths.root.exists():
            shutil.rmtree(paths.root)
        paths.dataset.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.dataset, paths.dataset)
        return paths


class _Quiet:
    done = 0

    def update(self, n: int = 1, /, **values: float) -> None:
        pass


@contextlib.contextmanager
def quiet_bar(*args: Any, **kwargs: Any) -> Iterator[_Quiet]:
    """The progress display export_generation wants, showing nothing (the script prints one line a network)."""
    yield _Quiet()


# -- networks: one record each ---------------------------------------------------------------------------
def net_record(gp: GenParams, recipe: TrainParams, gen: int, seconds: float, val: float, test: float) -> dict:
    rec: dict[str, Any] = {
        "arch": gp.arch or recipe.arch,
        "seed": generation_seed(recipe, gen, gp),
        "epochs": recipe.epochs,
        "seconds": round(seconds, 1),
        "val_acc": val,
        "test_acc": test,
        "loss": gp.loss,
    }
    if gp.teacher is not None:
        rec.update(teacher=gp.teacher, temperature=gp.temperature, alpha=gp.alpha, beta=gp.beta)
    return rec


def train_gen(
    ctx: Context,
    paths: ProjectPaths,
    recipe: TrainParams,
    gen: int,
    gp: GenParams,
    export: bool,
    views_seed: int | None = None,
) -> dict:
    """Generation `gen` trained into `paths` (`bancache train`'s steps) and, with `export`, its logits cached,
    the views drawn with the generation's seed or `views_seed` (an ensemble's members share their views)."""
    t0 = time.perf_counter()
    job = prepare_generation(paths, recipe, gen, gp)
    metrics = train_job(job, SINGLE_PROCESS)
    rec = net_record(gp, recipe, gen, time.perf_counter() - t0, metrics["val_acc"], metrics["test_acc"])
    if "teacher" in metrics:  # the teacher's fitness on the fit rows, at the student's T
        rec["teacher_fit_acc"], rec["teacher_entropy"] = metrics["teacher"]["fit_acc"], metrics["teacher"]["entropy"]
    if export:
        seed = generation_seed(recipe, gen, gp) if views_seed is None else views_seed
        export_generation(paths, gen, ctx.export_params(seed), SINGLE_PROCESS, quiet_bar)
    ctx.log(f"  gen {gen}: {_short(rec)}")
    return rec


def control(ctx: Context, recipe: TrainParams, gen: int, gp: GenParams, name: str) -> dict:
    """Generation `gen`'s label-only control (its seed, initial weights and batch order) at recipe.epochs."""
    t0 = time.perf_counter()
    result = train_control(ctx.data, recipe, gen, gp)
    device = resolve_device(recipe.device)
    test = predict_accuracy(result.model, ctx.data.x_test, ctx.data.y_test, recipe.eval_batch_size, device)[1]
    rec = net_record(
        replace(gp, loss="ce", teacher=None), recipe, gen, time.perf_counter() - t0, result.history[-1].val_acc, test
    )
    ctx.log(f"  {name}: {_short(rec)}")
    return rec


def _short(rec: dict[str, Any]) -> str:
    return (
        f"{rec['arch']} seed {rec['seed']} {rec['loss']} {rec['epochs']} ep: val {100 * rec['val_acc']:.2f} "
        f"test {100 * rec['test_acc']:.2f} ({rec['seconds']:.0f} s)"
    )


def ensemble_record(paths: ProjectPaths, data: PreparedData, gens: list[int]) -> dict[str, Any]:
    """The ensemble itself: argmax of the mean of the members' softmax (T = 1) over their cached logits,
    on the test rows and on the validation rows (the train split's `val_index` rows)."""
    rec: dict[str, Any] = {"members": gens, "seconds": 0.0, "epochs": 0}
    for split, rows, y in (("test", None, data.y_test), ("train", data.val_index, data.y_train)):
        probs = []
        for g in gens:
            store = LogitStore.open(paths.store(g), fingerprint=data.fingerprint)
            logits = store.read(split, 0, store.array(split).shape[0])[:, 0, :].astype(np.float32)
            probs.append(softmax(logits if rows is None else logits[rows]))
        labels = y if rows is None else y[rows]
        rec["test_acc" if rows is None else "val_acc"] = float((mean_probs(probs).argmax(-1) == labels).mean())
    return rec


# -- selection on validation rows (pilot seed 0) ---------------------------------------------------------
def converged_epochs(scores: dict[int, float], rows: int | None = None) -> int:
    """Where validation accuracy stops rising with epochs. Without `rows`: the smallest epochs of the grid
    whose accuracy no longer run of the grid beats. With `rows` (validation rows times seeds behind each
    mean): the one-standard-error rule, the smallest epochs within one binomial standard error
    sqrt(p (1 - p) / rows) of the best mean p, so that a longer run better by less than the noise of
    `rows` rows does not count as still rising."""
    if rows is None:
        return min(e for e, v in scores.items() if all(v >= w for f, w in scores.items() if f > e))
    best = max(scores.values())
    tol = math.sqrt(best * (1.0 - best) / rows)
    return min(e for e, v in scores.items() if v >= best - tol)


EXTEND = 2  # times the grid is doubled past its end while the longest run is still the best


def convergence(ctx: Context, arch: str, grid: list[int]) -> tuple[dict, dict[int, TrainResult]]:
    """Label-trained `arch` at every epochs of `grid` (gen 0) for each of `ctx.convergence_seeds`, doubled past
    the grid's end while the longest is still the best (at most EXTEND times): the mean validation accuracy
    over those seeds at each epochs (one pilot seed's 250-400 validation rows move by a point from seed
    noise alone), each seed's, the epochs chosen, and pilot seed 0's runs (the chosen one is reused as the
    pilot's teacher)."""
    reused = reuse_convergence(ctx, arch, grid)
    if reused is not None:  # the same runs, already made and recorded: train only pilot seed 0's chosen one
        e = reused["chosen"]
        pilot = train_generation(ctx.data, replace(ctx.recipe(PILOT_SEED, e), arch=arch), 0, GenParams(loss="ce"), None)
        ctx.log(f"  select {arch}: {e} epochs, reused from {reused['reused_from']}")
        return reused, {e: pilot}
    scores: dict[int, float] = {}
    per_seed: dict[int, list[float]] = {}
    runs: dict[int, TrainResult] = {}
    todo = list(grid)
    while todo:
        epochs = todo.pop(0)
        t0, vals = time.perf_counter(), []
        for seed in ctx.convergence_seeds:
            recipe = replace(ctx.recipe(seed, epochs), arch=arch)
            result = train_generation(ctx.data, recipe, 0, GenParams(loss="ce"), None)
            vals.append(result.history[-1].val_acc)
            if seed == PILOT_SEED:
                runs[epochs] = result
        scores[epochs], per_seed[epochs] = statistics.mean(vals), vals
        shown = ", ".join(f"{100 * v:.2f}" for v in vals)
        took = time.perf_counter() - t0
        ctx.log(f"  select {arch} {epochs} ep: val {100 * scores[epochs]:.2f} (seeds: {shown}; {took:.0f} s)")
        rows = len(ctx.data.val_index) * len(ctx.convergence_seeds)
        if not todo and converged_epochs(scores, rows) == epochs and len(scores) < len(grid) + EXTEND:
            todo.append(2 * epochs)
    chosen = converged_epochs(scores, rows)
    curve = {str(e): [round(h.val_acc, 4) for h in r.history] for e, r in runs.items()}
    return {
        "arch": arch,
        "grid": list(grid),
        "val_acc": {str(e): v for e, v in scores.items()},
        "val_acc_per_seed": {str(e): v for e, v in per_seed.items()},
        "seeds": list(ctx.convergence_seeds),
        "chosen": chosen,
        "curves": curve,
    }, runs


def reuse_convergence(ctx: Context, arch: str, grid: list[int]) -> dict[str, Any] | None:
    """The convergence record of `arch` in the results JSON `ctx.reuse` (another experiment's selection on the
    same labelled data and recipe), when it was made over the same grid, seeds and validation rows; else None.
    Params that differ only in data.n_unlabelled count as the same: the unlabelled rows are appended after
    the labelled ones, which are drawn, split and batched as without them, and a label-trained run never
    reads an unlabelled row (tests/test_transfer.py)."""
    if ctx.reuse is None:
        return None
    old = json.loads(Path(ctx.reuse).read_text())
    rows = (old["rows"]["fit"], old["rows"]["val"]) == (len(ctx.data.fit_index()), len(ctx.data.val_index))
    same = rows and labelled_recipe(raw_params(argparse.Namespace(**old["args"]))) == labelled_recipe(ctx.raw)
    for key in ("teacher_epochs", "student_epochs"):
        rec = old["selection"].get(key, {})
        if (
            same
            and rec.get("arch") == arch
            and rec.get("grid") == grid
            and rec.get("seeds") == list(ctx.convergence_seeds)
        ):
            return {**rec, "reused_from": str(ctx.reuse)}
    raise SystemExit(f"--reuse-convergence {ctx.reuse}: no convergence of {arch} on these params, grid and seeds there")


def pilot_teacher(ctx: Context, paths: ProjectPaths, run: TrainResult, epochs: int) -> None:
    """The convergence run chosen, saved as the pilot's generation 0 and exported (it is trained once)."""
    recipe = ctx.recipe(PILOT_SEED, epochs)
    gp = GenParams(loss="ce")
    save_generation(paths.model(0), run, checkpoint_meta(ctx.data, recipe, 0, gp, None))
    export_generation(paths, 0, ctx.export_params(generation_seed(recipe, 0, gp)), SINGLE_PROCESS, quiet_bar)


def val_score(ctx: Context, paths: ProjectPaths, recipe: TrainParams, gen: int, gp: GenParams) -> float:
    """A student's validation accuracy (its last epoch's, as train.select: last keeps it); no test rows."""
    stores = [paths.store(g) for g in gp.members]
    result = train_generation(ctx.data, recipe, gen, gp, stores if isinstance(gp.teacher, list) else stores[0])
    return result.history[-1].val_acc


def pick(scores: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
    """The knobs with the best validation accuracy; ties go to the first in grid order."""
    best = max(v for _, v in scores)
    return next(k for k, v in scores if v == best)


# -- experiment (a): compression -------------------------------------------------------------------------
def arm_name(loss: str, t: float) -> str:
    return f"{loss} T={t:g}"


def select_compression(ctx: Context) -> dict[str, Any]:
    teacher, runs = convergence(ctx, ctx.teacher_arch, ctx.epoch_grid)
    student_grid = list(ctx.grids.student_epochs or [2 * e for e in ctx.epoch_grid])  # an mlp epoch is cheap
    student, _ = convergence(ctx, ctx.student_arch, student_grid)
    paths = ctx.root("select-compression")
    pilot_teacher(ctx, paths, runs[teacher["chosen"]], teacher["chosen"])
    recipe = ctx.recipe(PILOT_SEED, student["chosen"])
    knobs: dict[str, Any] = {}
    for loss, t in ctx.grids.arms:
        g = ctx.grids
        grid = [{"alpha": a} for a in g.kd_alphas] if loss == "kd" else [{"alpha": 1.0, "beta": b} for b in g.dkd_betas]
        grid = ctx.trimmed(grid)
        scores = []
        for knob in grid:
            gp = ctx.student(GenParams(loss=loss, teacher=0, temperature=t, arch=ctx.student_arch, **knob))
            scores.append((knob, val_score(ctx, paths, recipe, 1, gp)))
            ctx.log(f"  select {arm_name(loss, t)} {knob}: val {100 * scores[-1][1]:.2f}")
        knobs[arm_name(loss, t)] = {"chosen": pick(scores), "val_acc": [{**k, "val_acc": v} for k, v in scores]}
    return {"teacher_epochs": teacher, "student_epochs": student, "knobs": knobs}


def run_compression(ctx: Context, sel: dict[str, Any], seed: int) -> dict[str, Any]:
    e_t, e_s = sel["teacher_epochs"]["chosen"], sel["student_epochs"]["chosen"]
    paths = ctx.root(f"compression-seed-{seed}")
    teacher_recipe, student_recipe = ctx.recipe(seed, e_t), ctx.recipe(seed, e_s)
    arms = {"teacher": train_gen(ctx, paths, teacher_recipe, 0, GenParams(loss="ce"), export=True)}
    student_seed = 100 * seed + 1  # every student the same seed: one paired control serves them all
    gps = {}
    for gen, (loss, t) in enumerate(ctx.grids.arms, 1):
        knob = sel["knobs"][arm_name(loss, t)]["chosen"]
        gp = GenParams(loss=loss, teacher=0, temperature=t, seed=student_seed, arch=ctx.student_arch, **knob)
        gps[gen] = ctx.student(gp)
        arms[arm_name(loss, t)] = train_gen(ctx, paths, student_recipe, gen, gps[gen], export=False)
    arms["paired control"] = control(ctx, student_recipe, 1, gps[1], "paired control")
    arms["compute-matched control"] = control(ctx, ctx.recipe(seed, e_t + e_s), 1, gps[1], "compute-matched")
    return {"seed": seed, "arms": arms, "chain_epochs": e_t + e_s}


def compression_comparisons(ctx: Context) -> list[tuple[str, str]]:
    out = []
    for loss, t in ctx.grids.arms:
        out += [(arm_name(loss, t), "paired control"), (arm_name(loss, t), "compute-matched control")]
    return out


# -- experiment (b): an ensemble teacher -----------------------------------------------------------------
MEMBERS = [0, 1, 2]
STUDENT_GEN, BAN_GEN = 3, 4


def members_views_seed(recipe: TrainParams) -> int:
    """The seed every member of one ensemble draws its stored views with: member 0's (generation 0's) seed.
    A student replays one image per view, so the members must hold the same crops and flips (the store
    refuses others); views still differ between seeds."""
    return generation_seed(recipe, 0, GenParams(loss="ce"))


def select_ensemble(ctx: Context) -> dict[str, Any]:
    teacher, runs = convergence(ctx, ctx.teacher_arch, ctx.epoch_grid)
    e = teacher["chosen"]
    paths = ctx.root("select-ensemble")
    pilot_teacher(ctx, paths, runs[e], e)  # member 0 of the pilot: seed 0, as gen 0 of seed 0 trains
    recipe = ctx.recipe(PILOT_SEED, e)
    for gen in MEMBERS[1:]:
        train_gen(ctx, paths, recipe, gen, GenParams(loss="ce"), export=True, views_seed=members_views_seed(recipe))
    scores = []
    for knob in ctx.trimmed(ctx.grids.knobs()):
        gp = ctx.student(GenParams(loss="kd", teacher=MEMBERS, arch=ctx.student_arch, **knob))
        scores.append((knob, val_score(ctx, paths, recipe, STUDENT_GEN, gp)))
        ctx.log(f"  select ensemble student {knob}: val {100 * scores[-1][1]:.2f}")
    knobs = {"student": {"chosen": {"loss": "kd", **pick(scores)}, "val_acc": [{**k, "val_acc": v} for k, v in scores]}}
    return {"teacher_epochs": teacher, "student_epochs": {"chosen": e}, "knobs": knobs}


def run_ensemble(ctx: Context, sel: dict[str, Any], seed: int) -> dict[str, Any]:
    e = sel["teacher_epochs"]["chosen"]
    paths = ctx.root(f"ensemble-seed-{seed}")
    recipe = ctx.recipe(seed, e)
    arms = {}
    views = members_views_seed(recipe)
    for gen in MEMBERS:  # label-trained members, each its own seed (100 s + gen)
        arms[f"member {gen}"] = train_gen(ctx, paths, recipe, gen, GenParams(loss="ce"), export=True, views_seed=views)
    arms["ensemble"] = ensemble_record(paths, ctx.data, MEMBERS)
    knob = dict(sel["knobs"]["student"]["chosen"])
    student_seed = 100 * seed + STUDENT_GEN  # the BAN-from-one student shares it: same init and batch order
    gp = ctx.student(GenParams(teacher=MEMBERS, seed=student_seed, arch=ctx.student_arch, **knob))
    arms["ensemble student"] = train_gen(ctx, paths, recipe, STUDENT_GEN, gp, export=False)
    arms["BAN from one"] = train_gen(ctx, paths, recipe, BAN_GEN, replace(gp, teacher=0), export=False)
    arms["paired control"] = control(ctx, recipe, STUDENT_GEN, gp, "paired control")
    chain = (len(MEMBERS) + 1) * e  # the three members and the student
    arms["compute-matched control"] = control(ctx, ctx.recipe(seed, chain), STUDENT_GEN, gp, "compute-matched")
    return {"seed": seed, "arms": arms, "chain_epochs": chain}


ENSEMBLE_COMPARISONS = [
    ("ensemble student", "paired control"),
    ("ensemble student", "compute-matched control"),
    ("ensemble student", "BAN from one"),
    ("ensemble student", "ensemble"),
]


# -- experiment (c): a transfer set ----------------------------------------------------------------------
TRANSFER_CONTROLS = ("control, equal epochs", "control, equal steps", "control, the chain's steps")


def steps_per_epoch(ctx: Context) -> tuple[int, int]:
    """Batches of train.batch_size in an epoch over the labelled fit rows and over every fit row."""
    bs = ctx.recipe(PILOT_SEED, 1).batch_size
    return -(-len(ctx.data.fit_index()) // bs), -(-len(ctx.data.fit_index(unlabelled=True)) // bs)


def transfer_control_epochs(ctx: Context, e_t: int, e_s: int) -> dict[str, int]:
    """Label-only epochs (over the labelled fit rows) of each control: the student's epochs; as many steps as
    the student (whose epochs hold every fit row, labelled or not); the steps of the whole chain, the
    teacher's epochs (labelled rows) plus the student's steps. Steps are batches of train.batch_size."""
    if not ctx.data.num_unlabelled:
        raise SystemExit("experiment transfer: the dataset has no unlabelled rows; set data.n_unlabelled in --params")
    labelled, every = steps_per_epoch(ctx)
    same_steps = round(e_s * every / labelled)
    return dict(zip(TRANSFER_CONTROLS, (e_s, same_steps, e_t + same_steps), strict=True))


def select_transfer(ctx: Context) -> dict[str, Any]:
    """The teacher's epochs on the labelled rows (convergence), then the kd student's T and alpha over the
    transfer set, each scored on the validation rows (labelled, never trained on). The student trains the
    teacher's epochs, or with `--transfer-budget steps` the teacher's steps (its epochs hold every row, so
    fewer of them: an image transfer set of 12,500 rows would otherwise cost 5 teachers a student)."""
    teacher, runs = convergence(ctx, ctx.teacher_arch, ctx.epoch_grid)
    e = teacher["chosen"]
    paths = ctx.root("select-transfer")
    pilot_teacher(ctx, paths, runs[e], e)
    e_s = e if ctx.grids.transfer_budget == "epochs" else transfer_steps_epochs(ctx, e)
    recipe = ctx.recipe(PILOT_SEED, e_s)
    scores = []
    for knob in ctx.trimmed(ctx.grids.knobs()):
        gp = ctx.student(GenParams(loss="kd", teacher=0, arch=ctx.student_arch, **knob))
        scores.append((knob, val_score(ctx, paths, recipe, 1, gp)))
        ctx.log(f"  select transfer-set student {knob}: val {100 * scores[-1][1]:.2f}")
    knobs = {"student": {"chosen": {"loss": "kd", **pick(scores)}, "val_acc": [{**k, "val_acc": v} for k, v in scores]}}
    budget = {"budget": ctx.grids.transfer_budget}
    return {"teacher_epochs": teacher, "student_epochs": {"chosen": e_s, **budget}, "knobs": knobs}


def transfer_steps_epochs(ctx: Context, e_t: int) -> int:
    """The student's epochs over every fit row (labelled or not) that make about the teacher's steps (e_t
    epochs over the labelled fit rows), at least one."""
    labelled, every = steps_per_epoch(ctx)
    return max(1, round(e_t * labelled / every))


def run_transfer(ctx: Context, sel: dict[str, Any], seed: int) -> dict[str, Any]:
    e_t, e_s = sel["teacher_epochs"]["chosen"], sel["student_epochs"]["chosen"]
    paths = ctx.root(f"transfer-seed-{seed}")
    arms = {"teacher": train_gen(ctx, paths, ctx.recipe(seed, e_t), 0, GenParams(loss="ce"), export=True)}
    knob = sel["knobs"]["student"]["chosen"]
    gp = ctx.student(GenParams(teacher=0, seed=100 * seed + 1, arch=ctx.student_arch, **knob))
    arms["transfer-set student"] = train_gen(ctx, paths, ctx.recipe(seed, e_s), 1, gp, export=False)
    epochs = transfer_control_epochs(ctx, e_t, e_s)
    for name, n in epochs.items():
        arms[name] = control(ctx, ctx.recipe(seed, n), 1, gp, name)
    rows = {"labelled_fit": len(ctx.data.fit_index()), "unlabelled": ctx.data.num_unlabelled}
    return {"seed": seed, "arms": arms, "chain_epochs": epochs[TRANSFER_CONTROLS[2]], "rows": rows}


TRANSFER_COMPARISONS = [("transfer-set student", c) for c in TRANSFER_CONTROLS] + [("transfer-set student", "teacher")]


@dataclass(frozen=True)
class Experiment:
    """One experiment: its selection on the pilot seed, one reported seed's run, its comparisons."""

    select: Callable[[Context], dict[str, Any]]
    run_seed: Callable[[Context, dict[str, Any], int], dict[str, Any]]
    comparisons: Callable[[Context], list[tuple[str, str]]]
    student_arch: str = "mlp"


EXPERIMENTS = {
    "compression": Experiment(select_compression, run_compression, compression_comparisons, "mlp"),
    "ensemble": Experiment(select_ensemble, run_ensemble, lambda ctx: ENSEMBLE_COMPARISONS, "cnn1d"),
    "transfer": Experiment(select_transfer, run_transfer, lambda ctx: TRANSFER_COMPARISONS, "cnn1d"),
}


# -- tables ----------------------------------------------------------------------------------------------
def comparisons(runs: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per comparison a - b (test accuracy, points): paired mean, 95% t-interval, sd of the differences and
    the smallest mean difference these seeds detect with 80% power."""
    out = []
    for a, b in pairs:
        p = paired([100 * r["arms"][a]["test_acc"] for r in runs], [100 * r["arms"][b]["test_acc"] for r in runs])
        out.append(
            {
                "a": a,
                "b": b,
                "n": p.n,
                "mean": p.mean,
                "low": p.low,
                "high": p.high,
                "sd": p.sd,
                "detectable": detectable_effect(p.sd, p.n),
            }  # fmt: skip
        )
    return out


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def format_tables(runs: list[dict[str, Any]], compared: list[dict[str, Any]], num_test: int) -> str:
    names = list(runs[0]["arms"])
    rows = []
    for name in names:
        recs = [r["arms"][name] for r in runs]
        test, val = _mean_sd([100 * x["test_acc"] for x in recs]), _mean_sd([100 * x["val_acc"] for x in recs])
        rows.append([name, recs[0]["arch"] if "arch" in recs[0] else "-", recs[0]["epochs"], test, val])
    arms = table(["arm", "arch", "epochs", "test acc %", "val acc %"], rows)
    diff_rows = [
        [f"{c['a']} − {c['b']}", f"{c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]", f"{c['detectable']:.2f}"]
        for c in compared
    ]
    diffs = table(["comparison", "paired mean [95% t-interval], points", "detectable (80% power), points"], diff_rows)
    head = f"Test accuracy %, mean ± sample sd over {len(runs)} seeds ({num_test} test rows):"
    tail = f"Paired differences of test accuracy over {len(runs)} seeds, in points:"
    return f"{head}\n\n{arms}\n\n{tail}\n\n{diffs}\n"


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", required=True, choices=sorted(EXPERIMENTS))
    ap.add_argument("--seeds", default="1,2,3,4,5", help="reported seeds (the pilot seed 0 is never one)")
    ap.add_argument("--select", action="store_true", help="choose the recipes on pilot seed 0's validation rows")
    ap.add_argument("--quick", action="store_true", help="600 samples, 2 seeds, 2-3 epochs: proves the script runs")
    ap.add_argument("--params", default="params.yaml", help="the params base (data, train, export sections)")
    ap.add_argument("--num-samples", type=int, default=None, help="override data.num_samples (MNIST-1D)")
    ap.add_argument("--n-train", type=int, default=None, help="override data.n_train (labelled rows)")
    ap.add_argument("--n-unlabelled", type=int, default=None, help="override data.n_unlabelled (transfer set)")
    ap.add_argument("--teacher-arch", default=None, help="default: train.arch of the params")
    ap.add_argument("--student-arch", default=None, help="default: mlp (compression), the teacher's (ensemble)")
    ap.add_argument("--epoch-grid", default="15,30,60,120", help="teacher epochs tried for convergence")
    ap.add_argument("--convergence-seeds", default=",".join(map(str, CONVERGENCE_SEEDS)), help="pilot seeds averaged")
    ap.add_argument("--student-epoch-grid", default=None, help="compression's student epochs (default: twice the grid)")
    ap.add_argument("--arms", default="kd:2,kd:4,dkd:2,dkd:4", help="compression students, loss:T each")
    ap.add_argument("--kd-alphas", default="0.1,0.5,0.9", help="kd alpha grid (every experiment)")
    ap.add_argument("--dkd-betas", default="1,2,8", help="dkd beta grid (compression; alpha = 1)")
    ap.add_argument("--temperatures", default="1,2,4", help="kd T grid of the ensemble and transfer students")
    ap.add_argument(
        "--transfer-budget",
        default="epochs",
        choices=("epochs", "steps"),
        help="transfer student: teacher's epochs or steps",
    )
    ap.add_argument("--resume", action="store_true", help="keep the seeds already in the results JSON, run the rest")
    ap.add_argument("--reuse-convergence", default=None, help="a results JSON: reuse its convergence of the same arch")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the results JSON and table")
    ap.add_argument("--name", default=None, help="results file stem (default kd_<experiment>_<dataset>)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.num_samples, args.epoch_grid = args.num_samples or 600, "2,3"
        args.seeds = ",".join(args.seeds.split(",")[:2])
    return args


def raw_params(args: argparse.Namespace) -> dict[str, Any]:
    """The params the experiment runs: --params with the command line's data overrides, one thread, select last."""
    raw = copy.deepcopy(ParamsFile.load(args.params).raw)
    for key in ("num_samples", "n_train", "n_unlabelled"):
        if getattr(args, key, None) is not None:
            raw.setdefault("data", {})[key] = getattr(args, key)
    raw.setdefault("train", {}).update(threads=1, select="last")
    return raw


def labelled_recipe(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a label-trained run depends on: the data section less n_unlabelled, and the train section."""
    data = {k: v for k, v in raw.get("data", {}).items() if k != "n_unlabelled"}
    return data, raw.get("train", {})


def make_context(args: argparse.Namespace) -> Context:
    raw = raw_params(args)
    work = pick_workdir(args.workdir, 200 * 2**20, f"kd-{args.experiment}-")
    dataset = work / "dataset.h5"
    prepare_data(dataset, params=parse_section(DataParams, "data", raw.get("data")))
    teacher = args.teacher_arch or parse_section(TrainParams, "train", raw["train"]).arch
    student = args.student_arch or (EXPERIMENTS[args.experiment].student_arch if args.teacher_arch is None else teacher)
    grid = [int(e) for e in args.epoch_grid.split(",")]
    pilots = tuple(int(x) for x in args.convergence_seeds.split(","))
    data = load_prepared(dataset)
    return Context(
        raw, dataset, data, work, teacher, student, grid, args.quick, say, pilots, args.params, args.reuse_convergence,
        parse_grids(args),
    )  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def parse_grids(args: argparse.Namespace) -> Grids:
    arms = []
    for arm in args.arms.split(","):
        loss, _, t = arm.partition(":")
        if loss not in ("kd", "dkd") or not t:
            raise SystemExit(f"--arms {args.arms}: each arm is kd:T or dkd:T (e.g. kd:4,dkd:4), not {arm!r}")
        arms.append((loss, float(t)))
    students = None if args.student_epoch_grid is None else tuple(int(e) for e in args.student_epoch_grid.split(","))
    kd, dkd, ts = _floats(args.kd_alphas), _floats(args.dkd_betas), _floats(args.temperatures)
    return Grids(tuple(arms), kd, dkd, ts, students, args.transfer_budget)


def results_path(args: argparse.Namespace, raw: dict[str, Any]) -> Path:
    dataset = raw.get("data", {}).get("dataset", "mnist1d")
    name = args.name or f"kd_{args.experiment}_{dataset}" + ("-quick" if args.quick else "")
    return Path(args.out) / f"{name}.json"


def resumed(path: Path, ctx: Context, selection: dict, seeds: list[int]) -> tuple[list[dict], float]:
    """The runs of `seeds` already in the results JSON (--resume), when it was made on this dataset with
    this selection, and the minutes they took; a JSON from other data or another selection is refused."""
    if not path.is_file():
        return [], 0.0
    old = json.loads(path.read_text())
    if old.get("dataset_fingerprint") != ctx.data.fingerprint:
        raise SystemExit(f"--resume: {path} was made on other data; drop --resume or pass another --out")
    if old.get("selection") != json.loads(json.dumps(selection)):
        raise SystemExit(f"--resume: {path} holds another selection's seeds; resume without --select")
    return [r for r in old.get("runs", []) if r["seed"] in seeds], float(old.get("minutes", 0.0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    pilots = {PILOT_SEED, *(int(x) for x in args.convergence_seeds.split(","))}
    if pilots & set(seeds):
        raise SystemExit(f"--seeds {args.seeds}: seeds {sorted(pilots)} are the selection's pilots; report other seeds")
    exp, ctx = EXPERIMENTS[args.experiment], make_context(args)
    path, start = results_path(args, ctx.raw), time.perf_counter()
    if args.select:
        ctx.log(f"{args.experiment}: selection on pilot seeds' {len(ctx.data.val_index)} validation rows")
        selection = {
            "pilot_seed": PILOT_SEED,
            "convergence_seeds": list(ctx.convergence_seeds),
            "val_rows": len(ctx.data.val_index),
            **exp.select(ctx),
        }
        selection["seconds"] = round(time.perf_counter() - start, 1)
    elif path.is_file() and "selection" in (old := json.loads(path.read_text())):
        selection = old["selection"]
    else:
        raise SystemExit(f"{path}: no selection recorded; run with --select first")
    runs, minutes = resumed(path, ctx, selection, seeds) if args.resume else ([], 0.0)
    info = machine_info()
    rows = {"fit": len(ctx.data.fit_index()), "val": len(ctx.data.val_index), "test": len(ctx.data.y_test)}
    if ctx.data.num_unlabelled:
        rows["unlabelled"] = ctx.data.num_unlabelled

    def save() -> None:  # after the selection and after every seed: a kill loses one seed at most
        compared = comparisons(runs, exp.comparisons(ctx)) if runs else []
        payload = {
            "experiment": args.experiment, "machine": info, "args": vars(args), "rows": rows,
            "dataset_fingerprint": ctx.data.fingerprint,
            "teacher_arch": ctx.teacher_arch, "student_arch": ctx.student_arch, "selection": selection,
            "seeds": [r["seed"] for r in runs], "runs": runs, "comparisons": compared,
            "minutes": round(minutes + (time.perf_counter() - start) / 60, 1),
        }  # fmt: skip
        write_json(path, payload)
        if runs:
            write_text(path.with_suffix(".md"), format_tables(runs, compared, rows["test"]))

    save()
    for seed in seeds:
        if any(r["seed"] == seed for r in runs):
            ctx.log(f"{args.experiment}: seed {seed} kept from {path} (--resume)")
            continue
        ctx.log(f"{args.experiment}: seed {seed} ({time.perf_counter() - start:.0f} s so far)")
        runs.append(exp.run_seed(ctx, selection, seed))
        save()
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} ({(time.perf_counter() - start) / 60:.1f} min)", file=sys.stderr)
    shutil.rmtree(ctx.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
