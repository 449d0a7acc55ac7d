"""`dvc plots show` / `dvc plots diff` of dvc.yaml's top-level plots, with the templates in .dvc/plots/, run
by the real DVC on the committed CSVs in a temporary git repo: one colour per generation (read from the file
name), one dash per revision, and numeric axes for the histograms (no 50 float tick labels)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_dvc_e2e import _run

REPO = Path(__file__).resolve().parents[1]
PER_GENERATION = ("val_acc", "train_loss", "reliability", "entropy", "max_prob")
HISTOGRAMS = ("entropy", "max_prob")


def _plot_files() -> dict[str, list[str]]:
    """Each top-level plot of dvc.yaml -> the CSVs it reads."""
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    return {plot_id: list(spec["y"]) for entry in plots for plot_id, spec in entry.items()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repo holding dvc.yaml's plots section, the templates and the committed CSVs, committed."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    root = tmp_path_factory.mktemp("plots")
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    for rel in {f for files in _plot_files().values() for f in files}:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, root / rel)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "plots"], root)
    return root


def _specs(root: Path, *args: str) -> dict[str, dict[str, Any]]:
    out = _run([sys.executable, "-m", "dvc", "plots", *args, "--json"], root)
    data = json.loads(out[out.index("{") :])
    assert not data.get("errors"), data["errors"]
    return {plot_id: items[0]["content"] for plot_id, items in data["data"].items()}


def _encodings(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The encoding of the spec and of each of its layers."""
    return [s["encoding"] for s in [spec, *spec.get("layer", [])] if "encoding" in s]


def _generations(spec: dict[str, Any]) -> list[int]:
    """Each datapoint's generation as the template computes it (its `calculate` run here: the JavaScript
    regular expression is also a Python one)."""
    calc = next(t["calculate"] for s in [spec, *spec.get("layer", [])] for t in s.get("transform", []))
    found = re.fullmatch(r"datum\.filename \? toNumber\(replace\(datum\.filename, /(.+)/, '\$(\d)'\)\) : 0", calc)
    assert found, calc
    pattern, group = found.groups()
    return [int(re.sub(pattern, rf"\{group}", row["filename"])) for row in spec["data"]["values"]]


def test_each_generation_has_its_own_colour(repo: Path) -> None:
    specs = _specs(repo, "show")
    assert set(specs) == {*PER_GENERATION, "lr"}
    for plot_id in PER_GENERATION:
        spec = specs[plot_id]
        colours = {e["color"]["field"] for e in _encodings(spec) if "color" in e}
        assert colours == {"generation"}, plot_id  # DVC's own templates colour by revision only
        assert {e["strokeDash"]["field"] for e in _encodings(spec) if "strokeDash" in e} == {"rev"}, plot_id
        assert sorted(set(_generations(spec))) == [0, 1, 2, 3], plot_id
        generations = _generations(spec)
        for g, rel in enumerate(_plot_files()[plot_id]):  # generation g's rows are exactly its own file's
            assert f"gen-{g}/" in rel or rel.endswith(f"gen-{g}.csv")
            assert generations.count(g) == len((REPO / rel).read_text().splitlines()) - 1, (plot_id, rel)


def test_histograms_have_a_numeric_axis(repo: Path) -> None:
    """The entropy and max-probability charts were bar charts over 50 float labels (0.0230259, ...): now a
    quantitative x axis (the bin centre) and counts on a symlog axis."""
    specs = _specs(repo, "show")
    for plot_id in HISTOGRAMS:
        (enc,) = _encodings(specs[plot_id])
        assert enc["x"] == {"field": plot_id, "type": "quantitative", "title": enc["x"]["title"]}
        assert "bin centre" in enc["x"]["title"] and enc["y"]["scale"]["type"] == "symlog"
        values = {float(r[plot_id]) for r in specs[plot_id]["data"]["values"]}
        assert len(values) == 50  # 50 bins per generation, on one numeric axis


def test_plots_diff_tells_revisions_apart(repo: Path) -> None:
    """`dvc plots diff` still works: both revisions' rows, one dash each, the generations' colours kept."""
    csv = repo / "plots" / "train" / "gen-1.csv"
    committed = csv.read_bytes()  # CRLF lines, as the csv module writes them
    try:
        csv.write_bytes(b"".join(committed.splitlines(keepends=True)[:-5]))  # the workspace lost 5 epochs
        spec = _specs(repo, "diff", "HEAD")["val_acc"]
        revs = [r["rev"] for r in spec["data"]["values"]]
        assert set(revs) == {"HEAD", "workspace"}
        assert revs.count("HEAD") - revs.count("workspace") == 5
        (line, _points) = _encodings(spec)
        assert line["strokeDash"]["field"] == "rev" and line["color"]["field"] == "generation"
    finally:
        csv.write_bytes(committed)
    assert subprocess.run(["git", "diff", "--quiet"], cwd=repo).returncode == 0
