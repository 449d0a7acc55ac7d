"""The `bancache` command: one thin click group over the stage functions that dvc.yaml runs."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.core.errors import BancacheError
from pipeline.core.paths import ProjectPaths
from stages import progress
from stages.common import ParamsFile


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a BancacheError into a one-paragraph message and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BancacheError as e:
            click.echo(f"bancache: error: {e}", err=True)
            sys.exit(2)

    return wrapper


class Ctx:
    def __init__(self, params: str | None, root: str, trust_stores: bool = False) -> None:
        # Without --params the project's own file: ROOT/params.yaml ("params.yaml" for the default root)
        self.params_path = params if params is not None else str(Path(root) / "params.yaml")
        self.layout = ProjectPaths(Path(root))
        self.verify = not trust_stores

    def argv(self, *command: str) -> list[str]:
        """This command line, for torchrun workers."""
        trust = [] if self.verify else ["--trust-stores"]
        return ["--params", self.params_path, "--root", str(self.layout.root), *trust, *command]

    def params(self) -> ParamsFile:
        p = ParamsFile.load(self.params_path)
        p.validate()
        return p


VERBOSITY = {"-v": 1, "--verbose": 1, "-vv": 2, "-vvv": 3, "-q": -1, "--quiet": -1}
GLOBAL_FLAGS = {*VERBOSITY, "--trust-stores"}
GLOBAL_VALUES = ("--params", "--root")  # options of the group that take a value


def hoist_global_options(args: list[str]) -> list[str]:
    """`args` with the group's own options moved in front, wherever they were given (`bancache validate
    --params x`, `bancache train --gen 1 -v`): no subcommand has an option of these names, so each can only
    mean the group's. Everything after `--` stays where it is."""
    end = args.index("--") if "--" in args else len(args)
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < end:
        a = args[i]
        if a in GLOBAL_FLAGS or a.startswith(tuple(f"{o}=" for o in GLOBAL_VALUES)):
            front.append(a)
        elif a in GLOBAL_VALUES and i + 1 < end:
            front += args[i : i + 2]
            i += 1
        else:
            rest.append(a)
        i += 1
    return front + rest + args[end:]


class Group(click.Group):
    """A click group whose options (--params, --root, --trust-stores, -v/-q) also work after the subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))


class ConsoleFormatter(logging.Formatter):
    """`warning: <message>` (and `error:`) for what a user must read, as the CLI's own `bancache: error:`
    lines; the time and logger name only on the -v/-vv detail lines, where they help to follow a run."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return super().format(record)


@click.group(cls=Group)
@click.version_option(__version__, "--version", prog_name="bancache")
@click.option("--params", default=None, help="params file  [default: ROOT/params.yaml]")
@click.option("--root", default=".", show_default=True, help="project root holding data/, models/, cache/")
@click.option(
    "-v", "--verbose", count=True, help="more log lines (-vv: debug); these options also go after the subcommand"
)
@click.option("-q", "--quiet", count=True, help="no progress bar or per-epoch lines, warnings and errors only")
@click.option(
    "--trust-stores",
    is_flag=True,
    help="skip re-hashing logit stores against their completion marker and the dataset against its fingerprint "
    "(files you trust; saves the verification cost measured in benchmarks/verify.py)",
)
@click.pass_context
def main(ctx: click.Context, params: str | None, root: str, verbose: int, quiet: int, trust_stores: bool) -> None:
    """bancache: Born-Again Networks with an offline logit cache."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.ERROR if quiet else level, handlers=[handler])
    ctx.with_resource(progress.quiet_output(bool(quiet)))  # for this invocation only
    ctx.obj = Ctx(params, root, trust_stores)


@main.command()
@click.pass_obj
@_user_errors
def validate(obj: Ctx) -> None:
    """Check params.yaml (every section, the chain, the paths it names) and exit."""
    obj.params().check_paths()
    click.echo(f"{obj.params_path}: ok")


@main.command()
@click.pass_obj
@_user_errors
def prepare(obj: Ctx) -> None:
    """Write the dataset into data/dataset.h5 (params: data)."""
    from stages import prepare as stage

    fp = stage.run(obj.params(), obj.layout)
    click.echo(f"prepared {obj.layout.dataset} (fingerprint {fp[:12]})")


@main.command()
@click.option("--gen", type=int, required=True, help="generation to train (0 = from labels)")
@click.option("--resume/--no-resume", default=False, help="continue a killed run of this config from its last epoch")
@click.pass_obj
@_user_errors
def train(obj: Ctx, gen: int, resume: bool) -> None:
    """Train generation GEN (params: train, gen0 or students.GEN); with gen0.source set, generation 0 is
    imported from that file instead (checked, recorded in models/gen-0)."""
    from pipeline.params import parse_source
    from stages import train as stage
    from stages.launch import relaunch_if_needed

    params = obj.params()
    argv = obj.argv("train", "--gen", str(gen), "--resume" if resume else "--no-resume")
    imported = gen == 0 and parse_source(params.get("gen0")) is not None  # one process reads the file
    if not imported and (code := relaunch_if_needed(params, argv)) is not None:
        sys.exit(code)
    m = stage.run(params, obj.layout, gen, resume=resume, verify=obj.verify)
    if "test_acc" not in m:  # a torchrun worker other than rank 0
        return
    if "imported" in m:
        click.echo(f"generation 0: {m['imported']}, test acc {m['test_acc']:.4f}")
    else:
        click.echo(f"generation {gen}: val acc {m['val_acc']:.4f}, test acc {m['test_acc']:.4f}")


@main.command()
@click.option("--gen", type=int, required=True, help="student generation whose control to train")
@click.pass_obj
@_user_errors
def control(obj: Ctx, gen: int) -> None:
    """Train control-GEN from labels with generation GEN's seed, weights and batch order into
    controls/gen-GEN (params: train, students.GEN, train_controls; does nothing unless train_controls: true)."""
    from stages import control as stage

    m = stage.run(obj.params(), obj.layout, gen)
    if m.get("skipped"):
        click.echo(f"control {gen}: skipped (train_controls: false)")
    else:
        click.echo(f"control {gen}: test acc {m['test_acc']:.4f}")


@main.command("export-logits")
@click.option("--gen", type=int, required=True, help="generation whose logits to export")
@click.pass_obj
@_user_errors
def export_logits(obj: Ctx, gen: int) -> None:
    """Export generation GEN's train and test logits into cache/gen-GEN (params: export)."""
    from stages import export as stage
    from stages.launch import relaunch_if_needed

    params = obj.params()
    if (code := relaunch_if_needed(params, obj.argv("export-logits", "--gen", str(gen)))) is not None:
        sys.exit(code)
    attrs = stage.run(params, obj.layout, gen, verify=obj.verify)
    click.echo(f"exported {obj.layout.store(gen)}: {attrs['splits']}")


@main.command()
@click.pass_obj
@_user_errors
def ensemble(obj: Ctx) -> None:
    """Accuracy of each generation and of Ens*k from cached test logits."""
    from stages import ensemble as stage

    m = stage.run(obj.params(), obj.layout, verify=obj.verify)
    click.echo(json.dumps(m["accuracy"], indent=2))


@main.command()
@click.pass_obj
@_user_errors
def report(obj: Ctx) -> None:
    """Write reports/report.md, a table in the shape of the BAN paper's Table 2 (printed: where, and its
    headline numbers)."""
    from stages import report as stage

    click.echo(stage.headline(obj.layout, stage.run(obj.layout)))


@main.command()
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="comma-separated seeds")
@click.option(
    "--losses",
    default="ban,ban+l,cwtm,dkpp",
    show_default=True,
    help="gen-1 loss variants to add as columns ('' for none)",
)
@click.option("--out", default="results/sweep", show_default=True, help="output folder")
@click.option(
    "--controls/--no-controls",
    default=False,
    help="also train control-K (labels only, generation K's seed, weights and batch order) and print the paired table",
)
@click.pass_obj
@_user_errors
def sweep(obj: Ctx, seeds: str, losses: str, out: str, controls: bool) -> None:
    """Run the whole chain for several seeds and write a mean +- std table (results/sweep/table.md)."""
    from pipeline.core.errors import ParamsError
    from pipeline.losses import teacher_losses
    from stages import sweep as stage

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ParamsError(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2") from None
    loss_list = [s.strip() for s in losses.split(",") if s.strip()]
    bad = [s for s in loss_list if s not in teacher_losses()]
    if bad:
        raise ParamsError(f"--losses: unknown {bad}; choose from {', '.join(teacher_losses())}")
    click.echo(stage.run(obj.params(), Path(out), seed_list, loss_list, controls=controls))


@main.command()
@click.option("--gen", type=int, required=True, help="generation whose store to audit")
@click.option(
    "--against", default=None, help="compare with generation J's store instead, or with 'teacher': GEN's own teacher"
)
@click.pass_obj
@_user_errors
def inspect(obj: Ctx, gen: int, against: str | None) -> None:
    """Audit cache/gen-GEN into inspect/gen-GEN/ (params: inspect); with --against J, compare it with
    cache/gen-J into inspect/gen-GEN-vs-J/; --against teacher: with GEN's teacher in params (an ensemble
    teacher's mean of its members) into inspect/gen-GEN-vs-teacher/."""
    from pipeline.core.errors import ParamsError
    from stages import audit as stage

    if against is not None and against != "teacher" and not against.isdigit():
        raise ParamsError(f"--against {against!r}: expected a generation number or 'teacher'")
    ref: int | str | None = int(against) if against is not None and against.isdigit() else against
    m = stage.run(obj.params(), obj.layout, gen, ref, verify=obj.verify)
    out = obj.layout.inspect(gen, ref)
    if ref is None:
        tr, te = m["train"], m["test"]
        click.echo(
            f"generation {gen}: train acc {tr['accuracy']:.4f}, mean entropy {tr['entropy_mean']:.4f}, "
            f"test ECE {te['ece']:.4f}, {tr['likely_noisy']} likely-noisy; see {out}/summary.md"
        )
        if "fitness" in m:
            f = m["fitness"]
            click.echo(
                f"generation {gen} as a teacher: {100 * f['fit_accuracy']:.2f}% on its own fit rows, "
                f"mean entropy {f['entropy_mean']:.4f} nats at T = {f['temperature']:g}"
            )
    else:
        click.echo(
            f"generation {gen} vs {ref}: test agreement {m['test']['agreement']:.4f}, "
            f"KL {m['test']['kl_mean']:.4f}; see {out / 'summary.md'}"
        )


@main.command()
@click.option("--gen", type=int, required=True, help="student generation")
@click.pass_obj
@_user_errors
def teachers(obj: Ctx, gen: int) -> None:
    """Write members/gen-GEN.json: the marker hashes of the stores GEN learns from (train@GEN's dependency)."""
    from stages import teachers as stage

    record = stage.run(obj.params(), obj.layout, gen)
    click.echo(f"wrote {obj.layout.members(gen)}: generation {gen} learns from {record['teacher']}")


@main.command()
@click.option("--gen", type=int, required=True, help="generation whose store to export")
@click.option("--format", "fmt", type=click.Choice(["h5", "npz"]), required=True, help="output format")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="output file")
@click.pass_obj
@_user_errors
def convert(obj: Ctx, gen: int, fmt: str, out: str) -> None:
    """Export cache/gen-GEN (every split, with its attributes) to an HDF5 or .npz file."""
    from stages import convert as stage

    click.echo(f"wrote {stage.run(obj.layout, gen, fmt, out, verify=obj.verify)}")


if __name__ == "__main__":  # torchrun workers run `python -m stages.cli ...`
    main()
