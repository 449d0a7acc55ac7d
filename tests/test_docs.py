"""The README's numbers and figures come from the committed outputs of the default chain
(`tests/docs_values.py`): the committed README matches them, and a drifted copy is reported and rewritten."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.core import stats
from tests import docs_values as dv

ROOT = Path(__file__).resolve().parent.parent
CHAIN_OUTPUTS = ("inspect/", "metrics/", "reports/", "controls/", "plots/")
FIGURES = "inspect/gen-0/figures"


def test_dvc_md5_is_the_hash_dvc_lock_records() -> None:
    """The hashes the check compares are DVC's own: a committed file's and a committed folder's."""
    outs = dv.locked_outputs(ROOT)
    for rel in ("inspect/gen-0/statistics.json", "inspect/gen-1-vs-teacher/figures", "metrics/ensemble"):
        assert dv.dvc_md5(ROOT / rel) == outs[rel], rel
    assert outs["inspect/gen-1-vs-teacher/figures"].endswith(".dir")


def test_readme_numbers_match_the_committed_outputs() -> None:
    text = (ROOT / "README.md").read_text()
    values = dv.marked_values(text)
    assert len(values) >= 11 and all(v.shown is not None for v in values)
    assert all(v.file.startswith(CHAIN_OUTPUTS) for v in values)  # the default chain's outputs only
    assert dv.number_problems(dv.Committed(ROOT), text) == []


def test_readme_experiment_tables_are_the_experiments_own() -> None:
    """The Results section's Table 2 shape and paired tables are rows of the tables the sweeps wrote."""
    text = (ROOT / "README.md").read_text()
    tables = dv.ROWS.findall(text)
    assert tables.count("benchmarks/results/controls_mnist1d.md") == 2
    assert tables.count("benchmarks/results/controls_cifar10_cpu.md") == 2
    assert tables.count("benchmarks/results/kd_compression_mnist1d.md") == 2
    assert tables.count("benchmarks/results/kd_ensemble_mnist1d.md") == 2
    assert tables.count("benchmarks/results/kd_transfer_mnist1d.md") == 2
    assert tables.count("benchmarks/results/kd_compression_cifar10.md") == 2
    assert tables.count("benchmarks/results/kd_transfer_cifar10.md") == 2
    assert tables.count("benchmarks/results/kd_ensemble_cifar10.md") == 2
    assert dv.table_problems(ROOT, text) == []


def test_readme_paired_tables_state_their_power() -> None:
    """Every paired difference of the Results section, against control-k, the controls' ensemble and the
    compute-matched control, is recomputed from the experiment's per-seed JSON and stands beside the
    smallest difference its seeds could have detected (80% power), also recomputed."""
    text = (ROOT / "README.md").read_text()
    marked = dv.PAIRED.findall(text)
    for name in ("controls_mnist1d", "controls_cifar10_cpu", "long_controls_cifar10-cpu"):
        assert marked.count(f"benchmarks/results/{name}.json") == 1, name
    for m in dv.PAIRED.finditer(text):
        header = dv.cells(dv.next_table(text, m.end())[1][0])
        differences = [h for h in header if dv.MINUS in h]
        assert len(differences) == 2 and header.count(dv.DETECTABLE) == 2, header
    assert dv.paired_problems(ROOT, text) == []


def test_readme_figures_are_the_committed_outputs() -> None:
    """The README shows inspect/gen-0/figures/*.png themselves (committed with the run dvc.lock records),
    not copies under docs/ that drift (docs/img/reliability-gen0.png said acc 0.9360)."""
    text = (ROOT / "README.md").read_text()
    images = dv.IMAGE.findall(text)
    assert f"{FIGURES}/reliability.png" in images and not any(p.startswith("docs/") for p in images)
    assert dv.figure_problems(dv.Committed(ROOT), text) == []


def test_readme_figures_are_not_git_ignored() -> None:
    """The inspect figures are committed outputs (dvc.yaml: cache: false): no .gitignore hides them."""
    for path in dv.IMAGE.findall((ROOT / "README.md").read_text()):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False).returncode
        assert ignored == 1, f"{path} is git-ignored"


def relock(root: Path, rel: str) -> None:
    """Record `rel`'s current md5 in root's dvc.lock, as `dvc repro` does when it makes the output."""
    yaml = YAML()
    lock = yaml.load((root / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == rel:
                out["md5"] = dv.dvc_md5(root / rel)
    with (root / "dvc.lock").open("w") as f:
        yaml.dump(lock, f)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A project root holding the README, dvc.lock and every file the README's numbers read, with made-up
    figures recorded in its dvc.lock (the committed ones are not needed to test the check)."""
    text = (ROOT / "README.md").read_text()
    tables = dv.ROWS.findall(text) + dv.PAIRED.findall(text)
    for rel in ["README.md", "dvc.lock", *{v.file for v in dv.marked_values(text)}, *tables]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, tmp_path / rel)
    for rel in dv.IMAGE.findall(text):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\x89PNG " + rel.encode())
    relock(tmp_path, FIGURES)
    assert dv.check(tmp_path) == []
    return tmp_path


def test_a_drifted_number_is_reported_and_rewritten(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = copy / "README.md"
    committed = readme.read_text()
    v = next(v for v in dv.marked_values(committed) if v.key == "test.ece")
    stale = "0.0450" if v.shown != "0.0450" else "0.0451"  # the stale figure issue 22 found
    readme.write_text(committed[: v.start] + stale + committed[v.end :])
    assert dv.check(copy) == [f"README.md:{v.line}: shows {stale}, but {v.file} test.ece gives {v.shown}"]
    assert dv.main(["--root", str(copy)]) == 1 and f"shows {stale}" in capsys.readouterr().out

    assert dv.main(["--root", str(copy), "--write"]) == 0
    assert readme.read_text() == committed  # only the drifted number changed back
    assert dv.main(["--root", str(copy), "--write"]) == 0 and readme.read_text() == committed  # idempotent
    assert "1 numbers rewritten" in capsys.readouterr().out


def test_a_regenerated_output_is_written_into_the_readme(copy: Path) -> None:
    """After `dvc repro` (a new metrics file, and its md5 in dvc.lock) the check fails until --write puts the
    new values, in the comments' formats, in their places; a metrics file that dvc.lock does not record is
    refused and not written."""
    metrics = copy / "inspect" / "gen-0" / "statistics.json"
    m = json.loads(metrics.read_text())
    was = [format(m["train"]["accuracy"], ".2%"), str(m["train"]["likely_noisy"])]
    m["train"]["accuracy"], m["train"]["likely_noisy"] = 0.5, 7777
    metrics.write_text(json.dumps(m))
    before = (copy / "README.md").read_text()
    stale = dv.check(copy)
    assert stale and all("inspect/gen-0/statistics.json is not the output dvc.lock records" in p for p in stale)
    assert dv.write(copy) == 0 and (copy / "README.md").read_text() == before

    relock(copy, "inspect/gen-0/statistics.json")
    problems = dv.check(copy)
    assert len(problems) == 2 and "gives 50.00%" in problems[0] and "gives 7777" in problems[1]
    assert dv.write(copy) == 2 and dv.check(copy) == []
    after = (copy / "README.md").read_text()
    assert "50.00%<!-- value: inspect/gen-0/statistics.json train.accuracy .2% -->" in after
    assert "7777<!-- value: inspect/gen-0/statistics.json train.likely_noisy d -->" in after
    assert len(after) == len(before) + len("50.00%7777") - len("".join(was))  # nothing else moved


def test_unreadable_sources_and_bare_comments_are_reported(copy: Path) -> None:
    readme = copy / "README.md"
    text = readme.read_text()
    extra = (
        "\nmissing key 1<!-- value: inspect/gen-0/statistics.json train.acc .2% -->"
        "\nnot an output 1<!-- value: benchmarks/results/verify.json x .2% -->"
        "\nno number <!-- value: inspect/gen-0/statistics.json train.likely_noisy d -->\n"
    )
    readme.write_text(text + extra)
    n = text.count("\n") + 1
    noisy = json.loads((copy / "inspect/gen-0/statistics.json").read_text())["train"]["likely_noisy"]
    assert dv.check(copy) == [
        f"README.md:{n + 1}: inspect/gen-0/statistics.json has no key 'train.acc' (missing 'acc'): fix the "
        "comment's key",
        f"README.md:{n + 2}: benchmarks/results/verify.json is not an output that dvc.lock records: take README "
        "numbers from the default chain's outputs",
        f"README.md:{n + 3}: no number before the comment (its source gives {noisy})",
    ]
    dv.write(copy)  # writes what it can read, leaves the rest for the lines above
    end = f"no number {noisy}<!-- value: inspect/gen-0/statistics.json train.likely_noisy d -->\n"
    assert readme.read_text().endswith(end)
    assert "missing key 1<!--" in readme.read_text() and len(dv.check(copy)) == 2


def test_a_copied_missing_or_other_runs_figure_is_reported(copy: Path) -> None:
    readme = copy / "README.md"
    text = readme.read_text()
    (copy / "docs" / "img").mkdir(parents=True)
    (copy / "docs" / "img" / "reliability-gen0.png").write_bytes(b"\x89PNG")
    readme.write_text(text + "\n![copy](docs/img/reliability-gen0.png)\n![gone](inspect/gen-1/figures/entropy.png)\n")
    n = text.count("\n") + 1
    assert dv.check(copy) == [
        f"README.md:{n + 1}: image docs/img/reliability-gen0.png is not an output that dvc.lock records: link the "
        "committed figure (inspect/gen-K/figures/...) instead of a copy",
        f"README.md:{n + 2}: image inspect/gen-1/figures/entropy.png does not exist (run `dvc repro` and commit it)",
    ]
    readme.write_text(text)
    (copy / FIGURES / "reliability.png").write_bytes(b"\x89PNG drawn by another run")
    problems = dv.check(copy)
    assert len(problems) == 2 and all(f"image {FIGURES} is not the output dvc.lock records" in p for p in problems)


def test_a_changed_experiment_table_row_is_reported(copy: Path) -> None:
    readme = copy / "README.md"
    text = readme.read_text()
    row = "| 3 | 92.80 ± 0.89 | 91.84 ± 0.92 | +0.96 [+0.06, +1.86] | 1.22 | 94.42 ± 0.62 | 94.88 ± 0.86 | "
    row += "-0.46 [-1.68, +0.76] | 1.65 |"
    bold = "| 2 | 66.45 ± 0.36 | 65.29 ± 0.51 | **+1.16 [+0.83, +1.49]** |"
    assert text.count(row) == 1 and text.count(bold) == 1  # a bold cell still matches its plain row
    readme.write_text(text.replace(row, row.replace("+0.96", "+1.96")))
    line = text[: text.index(row)].count("\n") + 1
    assert dv.check(copy) == [
        f"README.md:{line}: table row not in benchmarks/results/controls_mnist1d.md: {row.replace('+0.96', '+1.96')}",
        f"README.md:{line}: BAN-k − Control-k, row 3, shows +1.96 [+0.06, +1.86], but "
        "benchmarks/results/controls_mnist1d.json gives +0.96 [+0.06, +1.86]",
    ]


def test_a_wrong_power_or_difference_is_reported(copy: Path) -> None:
    """A detectable cell (not in the sweep's own .md table) or a difference of the compute-matched table
    (which has no .md table) that the JSON does not give is reported; so is a difference column that lost
    its detectable column."""
    readme = copy / "README.md"
    text = readme.read_text()
    runs = json.loads((copy / "benchmarks/results/controls_cifar10_cpu.json").read_text())["runs"]
    d = stats.paired([100 * r["BAN-2"] for r in runs], [100 * r["Control-2"] for r in runs])
    want = f"{stats.detectable_effect(d.sd, d.n):.2f}"  # BAN-2 − control-2's power, from the JSON
    power = f"| **+1.16 [+0.83, +1.49]** | {want} |"
    long = "| 2 | 66.96 ± 0.85 (180) | -0.51 [-1.26, +0.24] | 1.02 |"
    assert text.count(power) == 1 and text.count(long) == 1 and want != "0.40"
    drifted = text.replace(power, power.replace(want, "0.40")).replace(long, long.replace("-0.51", "-0.61"))
    readme.write_text(drifted)
    at = {cell: text[: text.index(cell)].count("\n") + 1 for cell in (power, long)}
    assert dv.check(copy) == [
        f"README.md:{at[power]}: detectable (80% power) of BAN-k − Control-k, row 2, shows 0.40, but "
        f"benchmarks/results/controls_cifar10_cpu.json gives {want}",
        f"README.md:{at[long]}: BAN-k − Long-control-k, row 2, shows -0.61 [-1.26, +0.24], but "
        "benchmarks/results/long_controls_cifar10-cpu.json gives -0.51 [-1.26, +0.24]",
    ]
    header = "| k | Long-control-k (epochs) | BAN-k − Long-control-k | detectable (80% power) |"
    assert text.count(header) == 1
    readme.write_text(text.replace(header, "| k | Long-control-k (epochs) | BAN-k − Long-control-k | power |"))
    assert dv.check(copy) == [
        f"README.md:{text[: text.index(header)].count(chr(10)) + 1}: column 'BAN-k − Long-control-k' has no "
        "'detectable (80% power)' column after it: add one"
    ]
