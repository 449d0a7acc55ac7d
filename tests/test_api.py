"""The Python API: the README's examples run as written, and ambiguous positionals are refused."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import pipeline

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(title: str) -> str:
    """The ```python block of README.md whose first line is `# README example: <title> ...`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(f"# README example: {title}")]
    assert len(found) == 1, f"README has {len(found)} examples titled {title!r}"
    return found[0]


def test_readme_chain_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example("the chain from Python"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"generation 1: val acc 0\.\d{3}", out), out
    assert "torch.Size([3, 10]) {'loss': 'ce', 'temperature': 1.0, 'alpha': 0.5, 'teacher': None, 'seed': 0}" in out
    ckpt = pipeline.LogitStore.open(tmp_path / "cache/gen-0").attrs["checkpoint_sha256"]
    from pipeline.models.checkpoint import load_checkpoint

    meta = load_checkpoint(tmp_path / "models/gen-1/model.pt")["meta"]
    assert meta["teacher_store_checkpoint_sha256"] == ckpt and meta["temperature"] == 2.0

    # Then the user's own model and DataLoader against the same store: the BAN loss goes down.
    exec(compile(readme_example("your own model and DataLoader"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.fullmatch(r"last batch BAN loss \d+\.\d{3}\n", out), out


def test_own_model_example_learns_the_teacher(exported_root: Path, monkeypatch, capsys) -> None:
    """The example's loop fits the cached targets: agreement with the teacher rises well above chance."""
    import torch

    monkeypatch.chdir(exported_root)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(readme_example("your own model and DataLoader"), "README.md", "exec"), scope)
    model, x, targets = scope["model"], scope["x"], scope["targets"]
    with torch.no_grad():
        agree = (model(x).argmax(1) == targets.rows(np.arange(len(x))).argmax(1)).float().mean().item()
    assert agree > 0.3  # 10 classes: chance is 0.1


def test_target_takes_views_and_temperature_by_keyword_only(exported_root: Path) -> None:
    targets = pipeline.open_targets(exported_root / "cache/gen-0", "train")
    with pytest.raises(TypeError):
        targets.target([0, 1], 1.0)  # would have read 1.0 as the views
    assert targets.target([0, 1], temperature=2.0).shape == (2, 10)


def test_api_validates_params_like_params_yaml(tmp_path: Path) -> None:
    from pipeline.core.errors import ParamsError

    with pytest.raises(ParamsError, match="train.epochs = 0: must be >= 1"):
        pipeline.train_model(tmp_path / "none.h5", gen=0, recipe=pipeline.TrainParams(epochs=0))
    with pytest.raises(ParamsError, match="students.1.teacher: unset"):
        pipeline.train_model(tmp_path / "none.h5", gen=1, generation=pipeline.GenParams(loss="ban"))
    assert set(pipeline.__all__) >= {
        "prepare_data",
        "train_model",
        "export_store",
        "open_targets",
        "CachedTargets",
        "ban_loss",
    }
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None
