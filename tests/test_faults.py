"""Faults: killed stages, resumed training, a full disk. Nothing half-written is ever accepted, nothing
finished is lost, and a rerun ends identical to a clean run."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import DiskFullError, IncompleteStoreError
from pipeline.layout import Layout
from pipeline.store import LogitStore
from stages import export, train
from stages.common import ParamsFile
from tests.conftest import tiny_params


def _state_dicts_equal(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def _stores_equal(a: Path, b: Path) -> None:
    sa, sb = LogitStore.open(a), LogitStore.open(b)
    sa.verify()
    for split in ("train", "test"):
        np.testing.assert_array_equal(sa.array(split)[:], sb.array(split)[:])
    assert (a / "COMPLETE.json").read_text() == (b / "COMPLETE.json").read_text()


def test_resume_after_interruption_is_bit_identical(project: Layout, tmp_path: Path, monkeypatch) -> None:
    raw = tiny_params()
    raw["train"] = {**raw["train"], "epochs": 4, "select": "best_val"}
    params = ParamsFile(raw)
    train.run(params, project, 0)
    export.run(params, project, 0)
    train.run(params, project, 1)
    clean = tmp_path / "clean.pt"
    shutil.copy(project.model(1), clean)

    from pipeline import train as lib

    real = lib.train_one_epoch
    calls = {"n": 0}

    def dies_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(lib, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train.run(params, project, 1)
    assert project.train_state(1).exists()
    monkeypatch.setattr(lib, "train_one_epoch", real)
    train.run(params, project, 1, resume=True)
    _state_dicts_equal(project.model(1), clean)
    assert not project.train_state(1).exists()


def test_resume_ignores_state_of_another_config(project: Layout, tmp_path: Path, monkeypatch) -> None:
    raw = tiny_params()
    raw["train"] = {**raw["train"], "epochs": 3}
    train.run(ParamsFile(raw), project, 0)
    clean = tmp_path / "clean.pt"
    shutil.copy(project.model(0), clean)
    other = tiny_params()
    other["train"] = {**raw["train"], "lr": 0.5}
    from pipeline import train as lib

    real = lib.train_one_epoch
    calls = {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lib, "train_one_epoch", dies)
    with pytest.raises(KeyboardInterrupt):
        train.run(ParamsFile(other), project, 0)
    monkeypatch.setattr(lib, "train_one_epoch", real)
    train.run(ParamsFile(raw), project, 0, resume=True)  # the lr=0.5 state must not be resumed
    _state_dicts_equal(project.model(0), clean)


def _cli_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _write_params(root: Path, raw: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def _run_cli(root: Path, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["bancache", *args], cwd=root, env=_cli_env(), check=True, capture_output=True)
    return time.perf_counter() - t0


# A worker that runs the real CLI in a fresh process and SIGKILLs itself at the N-th call of a library
# function: kill points spread over the whole run without depending on how busy the machine is.
_KILLER = """
import os, signal, sys
import importlib
mod_name, attr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner_path, _, fn_name = attr.rpartition(".")
owner = importlib.import_module(mod_name)
for part in owner_path.split(".") if owner_path else []:
    owner = getattr(owner, part)
real = getattr(owner, fn_name)
calls = [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, fn_name, dying)
from stages.cli import main
main(sys.argv[4:])
"""


def _kill_at(root: Path, where: tuple[str, str], n: int, *args: str) -> int:
    """Run `bancache *args` in `root`, SIGKILLed at the n-th call of module `where[0]`'s `where[1]`."""
    cmd = [sys.executable, "-c", _KILLER, where[0], where[1], str(n), *args]
    env = {**_cli_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True).returncode


@pytest.fixture
def kill_project(project: Layout, tmp_path: Path) -> tuple[Layout, Layout]:
    """(victim, reference): two roots with the same data and a trained, exported generation 0."""
    raw = tiny_params()
    raw["train"] = {**raw["train"], "epochs": 6}
    raw["export"] = {**raw["export"], "chunk_rows": 32, "batch_size": 32}
    for root in (project.root,):
        _write_params(root, raw)
    params = ParamsFile(raw)
    train.run(params, project, 0)
    export.run(params, project, 0)
    ref = Layout(tmp_path / "ref")
    shutil.copytree(project.root, ref.root, ignore=shutil.ignore_patterns("ref"))
    return project, ref


def test_sigkill_export_at_random_points(kill_project: tuple[Layout, Layout]) -> None:
    victim, ref = kill_project
    _run_cli(ref.root, "export-logits", "--gen", "0")  # clean reference export
    writes = -(-400 // 32) + -(-100 // 32)  # chunk writes of the tiny config (train + test)
    rng = random.Random(0)
    points = [(("pipeline.store", "LogitStore.write"), n) for n in rng.sample(range(1, writes + 1), 3)]
    points += [(("pipeline.store", "write_json"), 1), (("pipeline.export", "replace_dir"), 1)]  # marker, swap
    for where, n in points:
        assert _kill_at(victim.root, where, n, "export-logits", "--gen", "0") == -signal.SIGKILL, (where, n)
        # The target holds a complete store (the previous one), never a partial one ...
        _stores_equal(victim.store(0), ref.store(0))
        # ... and the leftover temporary store is refused by the reader unless it was sealed whole (killed
        # between the marker and the swap), in which case it verifies and equals the clean export.
        leftovers = list(victim.store(0).parent.glob(".gen-0.*"))
        assert leftovers, (where, n)
        for leftover in leftovers:
            if where[1] == "replace_dir":
                _stores_equal(leftover, ref.store(0))
                continue
            with pytest.raises(IncompleteStoreError):
                LogitStore.open(leftover)
    _run_cli(victim.root, "export-logits", "--gen", "0")
    _stores_equal(victim.store(0), ref.store(0))
    assert not list(victim.store(0).parent.glob(".gen-0.*"))


def test_sigkill_training_at_random_points(kill_project: tuple[Layout, Layout]) -> None:
    victim, ref = kill_project
    _run_cli(ref.root, "train", "--gen", "1")  # clean, uninterrupted reference
    steps = 6 * -(-360 // 64)  # epochs x batches of the tiny config
    rng = random.Random(1)
    points = [(("pipeline.train", "ban_loss"), n) for n in sorted(rng.sample(range(1, steps + 1), 4))]
    points += [(("pipeline.checkpoint", "atomic_path"), 1)]  # while the final checkpoint is being written
    for where, n in points:
        before = victim.model(1).read_bytes() if victim.model(1).exists() else None
        assert _kill_at(victim.root, where, n, "train", "--gen", "1", "--resume") == -signal.SIGKILL, (where, n)
        # Only ever a whole checkpoint at the target: the previous one (here: none) or nothing.
        assert (victim.model(1).read_bytes() if victim.model(1).exists() else None) == before
        # The teacher's artifacts are never touched by a student run.
        _stores_equal(victim.store(0), ref.store(0))
    _run_cli(victim.root, "train", "--gen", "1", "--resume")
    _state_dicts_equal(victim.model(1), ref.model(1))


def test_full_disk_during_export_keeps_previous_store(project: Layout, monkeypatch) -> None:
    params = ParamsFile(tiny_params())
    train.run(params, project, 0)
    export.run(params, project, 0)
    before = LogitStore.open(project.store(0)).array("train")[:]
    from pipeline import store as store_mod

    real_write = store_mod.LogitStore.write
    calls = {"n": 0}

    def full_disk(self, split, start, logits):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, split, start, logits)

    monkeypatch.setattr(store_mod.LogitStore, "write", full_disk)
    with pytest.raises(DiskFullError, match="no space left.*free space.*previous store.*untouched"):
        export.run(params, project, 0)
    np.testing.assert_array_equal(LogitStore.open(project.store(0)).array("train")[:], before)
    assert not list(project.store(0).parent.glob(".gen-0.*"))


def test_full_disk_while_saving_checkpoint_keeps_previous(project: Layout, monkeypatch) -> None:
    params = ParamsFile(tiny_params())
    train.run(params, project, 0)
    before = project.model(0).read_bytes()
    real_fsync = os.fsync

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError, match="no space left on the device"):
        train.run(params, project, 0)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert project.model(0).read_bytes() == before
    assert not [p for p in project.model_dir(0).iterdir() if p.name != "model.pt"]
