"""The Python API: the README's examples run as written, and ambiguous positionals are refused."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

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
    assert targets.target([0, 1], temperature=2.0).p.shape == (2, 10)


def test_target_is_p_at_its_temperature_for_every_layout(exported_root: Path, tmp_path: Path) -> None:
    """One meaning per call: target() is p_T for a dense store too (it returned raw logits whatever T),
    equal to what the losses make of the raw logits; a top-k store with every class gives the same p_T."""
    from pipeline.losses import Probs, ban_loss, soften

    dense = pipeline.open_targets(exported_root / "cache/gen-0", "train")
    pipeline.export_store(
        exported_root / "models/gen-0/model.pt",
        exported_root / "data/dataset.h5",
        tmp_path / "topk",
        params=pipeline.ExportParams(layout="topk", topk=10, dtype="float16", device="cpu"),
        device="cpu",
    )
    full = pipeline.open_targets(tmp_path / "topk", "train")
    index = np.array([7, 0, 3, 3])
    logits = dense.rows(index)
    student = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 2.0, 4.0):
        p = dense.target(index, temperature=temperature)
        assert isinstance(p, Probs) and torch.equal(p.p, torch.softmax(logits / temperature, dim=-1))
        assert torch.equal(ban_loss(student, p, temperature), ban_loss(student, logits, temperature))
        assert torch.equal(full.target(index, temperature=temperature).p, soften(logits, temperature))
    assert not torch.equal(dense.target(index, temperature=1.0).p, dense.target(index, temperature=4.0).p)


def test_train_model_refuses_mse_from_a_sparse_store_and_trains_dkd_from_it(
    exported_root: Path, tmp_path: Path
) -> None:
    """The API checks the teacher's store as `bancache train` does: mse needs logits, a top-k store keeps a
    distribution; dkd needs only p_T and trains from the same store."""
    from pipeline.core.errors import ParamsError

    pipeline.export_store(
        exported_root / "models/gen-0/model.pt",
        exported_root / "data/dataset.h5",
        tmp_path / "topk",
        params=pipeline.ExportParams(layout="topk", topk=3, device="cpu"),
        device="cpu",
    )
    recipe = pipeline.TrainParams(arch="cnn1d", epochs=1, device="cpu")
    data = exported_root / "data/dataset.h5"
    with pytest.raises(ParamsError, match=r"students.1.loss = 'mse' matches the teacher's logits, .* layout 'topk'"):
        pipeline.train_model(
            data,
            gen=1,
            recipe=recipe,
            generation=pipeline.GenParams(loss="mse", teacher=0),
            teacher_store=tmp_path / "topk",
        )
    r = pipeline.train_model(
        data,
        gen=1,
        recipe=recipe,
        generation=pipeline.GenParams(loss="dkd", teacher=0),
        teacher_store=tmp_path / "topk",
    )
    assert np.isfinite(r.history[-1].train_loss)


def test_len_of_cached_targets_is_its_split(exported_root: Path) -> None:
    data = pipeline.load_prepared(exported_root / "data/dataset.h5")
    for split, (_, y) in (("train", (data.x_train, data.y_train)), ("test", (data.x_test, data.y_test))):
        assert len(pipeline.open_targets(exported_root / "cache/gen-0", split, data=data)) == len(y)
    assert len(data.y_train) != len(data.y_test)  # so the two lengths tell the splits apart


def test_params_dataclasses_validate_when_constructed() -> None:
    import dataclasses

    from pipeline.core.errors import ParamsError

    with pytest.raises(ParamsError, match=r"^train\.lr = 'fast': expected float$"):
        pipeline.TrainParams(lr="fast")
    with pytest.raises(ParamsError, match=r"^train\.lr = -1\.0: must be > 0\.0$"):
        pipeline.TrainParams(lr=-1.0)
    with pytest.raises(ParamsError, match=r"^export\.layout = 'zip'"):
        pipeline.ExportParams(layout="zip")
    with pytest.raises(ParamsError, match=r"^data\.val_fraction = 0\.95"):
        pipeline.DataParams(val_fraction=0.95)
    with pytest.raises(ParamsError, match=r"^train\.epochs = 0"):
        dataclasses.replace(pipeline.TrainParams(), epochs=0)
    assert pipeline.TrainParams(lr=1).lr == 1.0 and isinstance(pipeline.TrainParams(lr=1).lr, float)
    assert dataclasses.replace(pipeline.TrainParams(), epochs=3).epochs == 3
    control = pipeline.GenParams(loss="ce", teacher=None, seed=5)  # what control_params builds
    assert (control.loss, control.teacher) == ("ce", None)


def test_load_model_rebuilds_the_trained_network(exported_root: Path, tmp_path: Path) -> None:
    from pipeline.core.errors import CheckpointError

    path = exported_root / "models/gen-0/model.pt"
    model = pipeline.load_model(path)
    assert not model.training
    data = pipeline.load_prepared(exported_root / "data/dataset.h5")
    x = torch.as_tensor(data.x_test[:50]).float()
    with torch.no_grad():
        got = model(x)
    stored = pipeline.open_targets(exported_root / "cache/gen-0", "test").rows(np.arange(50))
    # the store holds this model's logits in float16, shifted by each row's max (export's `logit_shift`)
    torch.testing.assert_close(got - got.max(1, keepdim=True).values, stored, atol=2e-2, rtol=1e-3)
    meta = pipeline.load_checkpoint(path)["meta"]
    assert meta["arch"] == "cnn1d" and meta["generation"] == 0
    assert (
        pipeline.model_from_checkpoint(pipeline.load_checkpoint(path)).state_dict().keys() == model.state_dict().keys()
    )
    raw = path.read_bytes()
    for cut in (0, 1, 300, len(raw) // 2, len(raw) - 1):
        bad = tmp_path / f"cut-{cut}.pt"
        bad.write_bytes(raw[:cut])
        with pytest.raises(
            CheckpointError, match=r"truncated or not a bancache checkpoint \(.+\); retrain or restore it"
        ):
            pipeline.load_model(bad)


def test_readme_own_architecture_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.models import registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "ARCHS", dict(registry.ARCHS))  # the example's name stays in this test
    exec(compile(readme_example("your own architecture"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Linear(in_features=40, out_features=256" in out, out
    assert pipeline.LogitStore.open(tmp_path / "cache/gen-0").attrs["arch"] == "wide_mlp"
    model = pipeline.load_model(tmp_path / "models/gen-0/model.pt")
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [256, 10]


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
