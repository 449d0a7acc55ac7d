"""The CLI: user errors end in one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import re

import yaml
from click.testing import CliRunner

from pipeline.core.paths import ProjectPaths
from stages.cli import main
from stages.common import ParamsFile
from tests.conftest import tiny_params


def _invoke(tmp_path, *args, raw=None):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw if raw is not None else tiny_params()))
    return CliRunner().invoke(main, ["--params", str(params), "--root", str(tmp_path), *args])


def test_bad_param_is_one_line_and_exit_2(tmp_path) -> None:
    raw = tiny_params()
    raw["students"]["1"]["temperature"] = 0
    r = _invoke(tmp_path, "train", "--gen", "1", raw=raw)
    assert r.exit_code == 2
    assert "students.1.temperature = 0.0: must be > 0.0" in r.output
    assert "Traceback" not in r.output


def test_missing_dataset_tells_to_prepare(tmp_path) -> None:
    r = _invoke(tmp_path, "train", "--gen", "0")
    assert r.exit_code == 2 and "bancache prepare" in r.output


def test_missing_checkpoint_tells_to_train(project) -> None:
    r = _invoke(project.root, "export-logits", "--gen", "0")
    assert r.exit_code == 2 and "checkpoint not found" in r.output and "bancache train" in r.output


def test_unknown_generation(project) -> None:
    r = _invoke(project.root, "train", "--gen", "7")
    assert r.exit_code == 2 and "students.'7'" in r.output and "generation 7" in r.output


def test_validate_ok(tmp_path) -> None:
    r = _invoke(tmp_path, "validate")
    assert r.exit_code == 0 and "ok" in r.output


def test_version() -> None:
    from pipeline import __version__

    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"bancache, version {__version__}"


def test_verbosity_flags_before_or_after_the_subcommand(tmp_path) -> None:
    for args in (("-v", "validate"), ("validate", "-v"), ("validate", "--quiet"), ("-q", "validate")):
        r = _invoke(tmp_path, *args)
        assert r.exit_code == 0, (args, r.output)


def test_train_off_a_terminal_prints_one_line_per_epoch(project) -> None:
    import re

    r = _invoke(project.root, "train", "--gen", "0")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("gen 0 epoch")]
    pattern = r"gen 0 epoch (\d)/2: loss \d+\.\d{4}, val acc [01]\.\d{4}, \d+\.\d s, ETA \d+s"
    assert [re.fullmatch(pattern, ln).group(1) for ln in lines] == ["1", "2"], r.output  # type: ignore[union-attr]
    quiet = _invoke(project.root, "train", "--gen", "0", "-q")
    assert quiet.exit_code == 0 and "epoch" not in quiet.output
    from stages.progress import Progress

    assert not Progress("after -q", 1).quiet  # -q held for its own invocation only, not as a module flag
    _invoke(project.root, "validate")  # back to the default (not quiet) for later tests


def test_progress_eta_is_the_mean_step_time_times_the_steps_left(monkeypatch, capsys) -> None:
    from stages import progress

    clock = iter([0.0, 2.0, 6.0])  # start, after step 1 (2 s), after step 2 (4 s)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.Progress("gen 3", 10, unit="epoch")
    bar.update(loss=1.5)
    bar.update(loss=1.25)
    err = capsys.readouterr().err.splitlines()
    assert err == ["gen 3 epoch 1/10: loss 1.5000, 2.0 s, ETA 18s", "gen 3 epoch 2/10: loss 1.2500, 4.0 s, ETA 24s"]
    assert progress.fmt_seconds(3725) == "1h02m" and progress.fmt_seconds(65) == "1m05s"


def test_export_inspect_and_sweep_report_progress_off_a_terminal(exported_root, tmp_path) -> None:
    import re
    import shutil

    root = tmp_path / "p"
    shutil.copytree(exported_root, root)
    args = ["--params", str(root / "params.yaml"), "--root", str(root)]
    r = CliRunner().invoke(main, [*args, "export-logits", "--gen", "0"])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("export gen 0 ")]
    assert r.exit_code == 0 and lines, r.output
    # each split counted on its own, train then test (a single count mixed them: `rows 400/500` was in test)
    splits = [
        re.fullmatch(r"export gen 0 (train|test) rows (\d+)/(\d+): [\d.]+ s so far, ETA \d+s", ln) for ln in lines
    ]
    assert all(splits), lines
    order = [m.group(1) for m in splits if m]
    assert order == sorted(order, key=["train", "test"].index) and set(order) == {"train", "test"}, lines
    last = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in splits if m}
    assert last == {"train": (400, 400), "test": (100, 100)}, lines
    assert sum(o == "train" for o in order) <= 10 and sum(o == "test" for o in order) <= 10  # a tenth each
    r = CliRunner().invoke(main, [*args, "inspect", "--gen", "0"])
    assert r.exit_code == 0 and re.search(r"^inspect gen 0 phase 2/2: [\d.]+ s, ETA 0s$", r.output, re.M), r.output
    raw = tiny_params(students={"1": {"teacher": 0, "loss": "ban"}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, [*args, "sweep", "--seeds", "5", "--losses", "cwtm", "--out", str(root / "sw")])
    assert r.exit_code == 0, r.output
    for needle in (
        "sweep seed 5: generation 1\n",
        "gen 1 epoch 2/2: loss",
        "sweep seed 5: generation 1 with loss cwtm\n",
        "seed 5 gen 1 (cwtm) epoch 2/2: loss",
        "sweep seed 1/1: seed 5\n",
    ):
        assert needle in r.output, needle
    assert r.output.index("sweep seed 1/1: seed 5") < r.output.index("gen 0 epoch 1/2")  # printed as it starts


def test_control_off_a_terminal_prints_one_line_per_epoch(project) -> None:
    raw = tiny_params()
    raw["train_controls"] = True
    r = _invoke(project.root, "control", "--gen", "1", raw=raw)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("control 1 epoch")]
    assert [ln.split()[3] for ln in lines] == ["1/2:", "2/2:"], r.output
    assert all("val acc" in ln and "ETA" in ln for ln in lines)


def test_group_options_also_go_after_the_subcommand(tmp_path, monkeypatch) -> None:
    from stages.cli import hoist_global_options

    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    for args in (
        ["validate", "--params", "proj/params.yaml"],  # was: No such option '--params'
        ["validate", "--params=proj/params.yaml", "-v"],
        ["--params", "proj/params.yaml", "validate"],
    ):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and r.output == "proj/params.yaml: ok\n", (args, r.output)
    ctx = main.make_context("bancache", ["validate", "--trust-stores", "--root", "proj", "-q"])
    assert ctx.params["trust_stores"] and ctx.params["root"] == "proj" and ctx.params["quiet"] == 1
    # a subcommand's own options and everything after `--` stay where they are
    args = ["convert", "--gen", "0", "--root", "r", "--format", "h5", "--out", "x.h5", "--", "--params"]
    assert hoist_global_options(args) == [
        "--root",
        "r",
        "convert",
        "--gen",
        "0",
        "--format",
        "h5",
        "--out",
        "x.h5",
        "--",
        "--params",
    ]


def test_root_alone_reads_the_roots_params_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    (tmp_path / "params.yaml").write_text("train: [unclosed")  # the current folder's file is not the project's
    for args in (["--root", "proj", "validate"], ["validate", "--root", "proj"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and r.output == "proj/params.yaml: ok\n", (args, r.output)
    r = CliRunner().invoke(main, ["validate"])  # the default root: ./params.yaml, as before
    assert r.exit_code == 2 and "params.yaml: not valid YAML" in r.output
    r = CliRunner().invoke(main, ["--root", "proj", "--params", "params.yaml", "validate"])  # --params wins
    assert r.exit_code == 2 and "not valid YAML" in r.output


def test_torchvision_name_as_arch_suggests_tv_prefix(tmp_path) -> None:
    raw = tiny_params()
    raw["train"]["arch"] = "resnet18"
    r = _invoke(tmp_path, "validate", raw=raw)
    assert r.exit_code == 2 and "depth must be 6n + 2" in r.output and "write 'tv_resnet18'" in r.output


def test_report_prints_one_line_and_writes_the_table(exported_root, tmp_path) -> None:
    import re
    import shutil

    root = tmp_path / "p"
    shutil.copytree(exported_root, root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(students={})))
    args = ["--root", str(root)]
    assert CliRunner().invoke(main, [*args, "ensemble"]).exit_code == 0
    r = CliRunner().invoke(main, [*args, "report"])
    assert r.exit_code == 0, r.output
    assert re.fullmatch(rf"wrote {re.escape(str(root))}/reports/report\.md: test acc % Teacher \d+\.\d\d\n", r.output)
    text = (root / "reports" / "report.md").read_text()
    assert text.startswith("# bancache report") and "| Teacher |" in text and "| Teacher |" not in r.output


def test_sweep_announces_each_seed_as_it_starts(tmp_path, monkeypatch) -> None:
    """`sweep seed k/n` comes before seed k's work (it used to be printed as seed k - 1 ended)."""
    from pipeline.chain import sweep
    from stages import prepare

    events: list[str] = []
    monkeypatch.setattr(sweep, "run_seed", lambda _params, _root, seed, *a, **k: events.append(f"run {seed}") or {})
    monkeypatch.setattr(sweep, "format_tables", lambda *a, **k: "table")
    prepare.run(ParamsFile(tiny_params()), ProjectPaths(tmp_path))
    sweep.run_sweep(tiny_params(), tmp_path, [3, 8], [], bar=None, note=events.append)  # type: ignore[arg-type]
    assert [e.split(",")[0] for e in events] == ["sweep seed 1/2: seed 3", "run 3", "sweep seed 2/2: seed 8", "run 8"]
    assert re.fullmatch(r"sweep seed 2/2: seed 8, \d+ s so far, ETA \d+ s", events[2])
