"""Shared fixtures: a tiny MNIST-1D project (400 train rows, 2 epochs) built through the stage functions."""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.paths import ProjectPaths
from stages.common import ParamsFile

TINY: dict[str, Any] = {
    "data": {"dataset": "mnist1d", "num_samples": 500, "val_fraction": 0.1, "split_seed": 0},
    "train": {"arch": "cnn1d", "epochs": 2, "batch_size": 64, "lr": 0.01, "seed": 0, "device": "cpu"},
    "gen0": {"loss": "ce"},
    "students": {"1": {"teacher": 0, "loss": "ban"}, "2": {"teacher": 1, "loss": "kd", "temperature": 2.0}},
    "export": {"dtype": "float16", "chunk_rows": 128, "batch_size": 100, "device": "cpu"},
    "launch": {"nproc_per_node": 1},
    "inspect": {"temperature": 1.0, "ece_bins": 10, "noise_confidence": 0.9, "max_listed": 20},
    "train_controls": False,  # dvc.yaml declares it for the control stages: DVC refuses a missing declared param
}


def tiny_params(**overrides: Any) -> dict[str, Any]:
    raw = copy.deepcopy(TINY)
    for section, values in overrides.items():
        raw[section] = values
    return raw


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root with data/dataset.h5 prepared from the tiny config (shared, read-only)."""
    from stages import prepare

    root = tmp_path_factory.mktemp("prepared")
    prepare.run(ParamsFile(tiny_params()), ProjectPaths(root))
    return root


@pytest.fixture
def project(tmp_path: Path, prepared_root: Path) -> ProjectPaths:
    """A fresh project root with the prepared tiny dataset copied in."""
    layout = ProjectPaths(tmp_path)
    layout.dataset.parent.mkdir(parents=True)
    layout.dataset.write_bytes(ProjectPaths(prepared_root).dataset.read_bytes())
    return layout


@pytest.fixture(scope="session")
def exported_root(tmp_path_factory: pytest.TempPathFactory, prepared_root: Path) -> Path:
    """A tiny project with params.yaml, generation 0 trained and exported (shared, read-only: copy it)."""
    import yaml

    from stages import export, train

    root = tmp_path_factory.mktemp("exported")
    layout = ProjectPaths(root)
    layout.dataset.parent.mkdir(parents=True)
    layout.dataset.write_bytes(ProjectPaths(prepared_root).dataset.read_bytes())
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    params = ParamsFile(tiny_params())
    train.run(params, layout, 0)
    export.run(params, layout, 0)
    return root


@contextlib.contextmanager
def benchmark_module(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """benchmarks/<name>.py imported, and undone after: importing a benchmark registers its architectures,
    which would change the registry's list in other tests, and imports benchmarks/_benchlib.py."""
    from pipeline.models.registry import ARCHS

    before = set(ARCHS)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        yield importlib.import_module(name)
    finally:
        for arch in set(ARCHS) - before:
            del ARCHS[arch]
        for module in (name, "_benchlib"):
            sys.modules.pop(module, None)
