"""The CLI: user errors end in one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from stages.cli import main
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
