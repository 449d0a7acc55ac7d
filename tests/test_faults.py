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

from pipeline.cache.store import MARKER, LogitStore
from pipeline.core.errors import DiskFullError, IncompleteStoreError
from pipeline.core.paths import ProjectPaths
from pipeline.models.checkpoint import load_checkpoint
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
    assert (a / "complete/zarr.json").read_text() == (b / "complete/zarr.json").read_text()


def test_resume_after_interruption_is_bit_identical(project: ProjectPaths, tmp_path: Path, monkeypatch) -> None:
    raw = tiny_params()
    raw["train"] = {**raw["train"], "epochs": 4, "select": "best_val"}
    params = ParamsFile(raw)
    train.run(params, project, 0)
    export.run(params, project, 0)
    train.run(params, project, 1)
    clean = tmp_path / "clean.pt"
    shutil.copy(project.model(1), clean)

    from pipeline.train import loop as lib

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


def test_resume_ignores_state_of_another_config(project: ProjectPaths, tmp_path: Path, monkeypatch) -> None:
    raw = tiny_params()
    raw["train"] = {**raw["train"], "epochs": 3}
    train.run(ParamsFile(raw), project, 0)
    clean = tmp_path / "clean.pt"
    shutil.copy(project.model(0), clean)
    other = tiny_params()
    other["train"] = {**raw["train"], "lr": 0.5}
    from pipeline.train import loop as lib

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
def kill_project(project: ProjectPaths, tmp_path: Path) -> tuple[ProjectPaths, ProjectPaths]:
    """(victim, reference): two roots with the same data and a trained, exported generation 0."""
    raw = tiny_params()
    raw["train"] = {**raw["train"], "epochs": 6}
    raw["export"] = {**raw["export"], "chunk_rows": 32, "batch_size": 32}
    for root in (project.root,):
        _write_params(root, raw)
    params = ParamsFile(raw)
    train.run(params, project, 0)
    export.run(params, project, 0)
    ref = ProjectPaths(tmp_path / "ref")
    shutil.copytree(project.root, ref.root, ignore=shutil.ignore_patterns("ref"))
    return project, ref


def test_sigkill_export_at_random_points(kill_project: tuple[ProjectPaths, ProjectPaths]) -> None:
    victim, ref = kill_project
    _run_cli(ref.root, "export-logits", "--gen", "0")  # clean reference export
    writes = -(-400 // 32) + -(-100 // 32)  # chunk writes of the tiny config (train + test)
    rng = random.Random(0)
    points = [(("pipeline.cache.store", "LogitStore.write"), n) for n in rng.sample(range(1, writes + 1), 3)]
    points += [
        (("pipeline.cache.store", "write_json"), 1),
        (("pipeline.teachers.export", "replace_dir"), 1),
    ]  # marker, swap
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


def test_sigkill_training_at_random_points(kill_project: tuple[ProjectPaths, ProjectPaths]) -> None:
    victim, ref = kill_project
    _run_cli(ref.root, "train", "--gen", "1")  # clean, uninterrupted reference
    steps = 6 * -(-360 // 64)  # epochs x batches of the tiny config
    rng = random.Random(1)
    points = [(("pipeline.losses", "ban_loss"), n) for n in sorted(rng.sample(range(1, steps + 1), 4))]
    points += [(("pipeline.models.checkpoint", "atomic_path"), 1)]  # while the final checkpoint is being written
    for where, n in points:
        before = victim.model(1).read_bytes() if victim.model(1).exists() else None
        assert _kill_at(victim.root, where, n, "train", "--gen", "1", "--resume") == -signal.SIGKILL, (where, n)
        # Only ever a whole checkpoint at the target: the previous one (here: none) or nothing.
        assert (victim.model(1).read_bytes() if victim.model(1).exists() else None) == before
        # The teacher's artifacts are never touched by a student run.
        _stores_equal(victim.store(0), ref.store(0))
    _run_cli(victim.root, "train", "--gen", "1", "--resume")
    _state_dicts_equal(victim.model(1), ref.model(1))


def test_full_disk_during_export_keeps_previous_store(project: ProjectPaths, monkeypatch) -> None:
    params = ParamsFile(tiny_params())
    train.run(params, project, 0)
    export.run(params, project, 0)
    before = LogitStore.open(project.store(0)).array("train")[:]
    from pipeline.cache import store as store_mod

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


def test_full_disk_while_saving_checkpoint_keeps_previous(project: ProjectPaths, monkeypatch) -> None:
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


# -- issue 13: full disk at checkpoint time, read-only cache, divergence, thread count, fp16 range -----


def _cli(root: Path, *args: str, env: dict | None = None, preexec=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.cli", "--params", str(root / "params.yaml"), "--root", str(root), *args]
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, preexec_fn=preexec, timeout=600)


def test_full_disk_while_writing_the_checkpoint_is_a_one_line_error(exported_root: Path, tmp_path: Path) -> None:
    import resource

    root = tmp_path / "p"
    shutil.copytree(exported_root, root)
    before = ProjectPaths(root).model(0).read_bytes()
    limit = len(before) // 2  # every checkpoint (and resume state) write runs out of room half-way

    def small_disk() -> None:  # the OS fails the write (EFBIG) as a full disk does (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    r = _cli(root, "-q", "train", "--gen", "0", preexec=small_disk)  # -q: no per-epoch progress lines
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("bancache: error: ") and "no space left on the device" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert ProjectPaths(root).model(0).read_bytes() == before  # nothing lost
    assert not [p for p in ProjectPaths(root).model_dir(0).iterdir() if p.name != "model.pt"]


def test_export_into_a_read_only_cache_dir(exported_root: Path, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from stages.cli import main

    root = tmp_path / "p"
    shutil.copytree(exported_root, root)
    cache = ProjectPaths(root).store(0).parent
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    cache.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: fail the creation as the OS does for anyone else

        def denied(path, *a, **k):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(LogitStore, "create", denied)
    try:
        r = CliRunner().invoke(
            main, ["--params", str(root / "params.yaml"), "--root", str(root), "export-logits", "--gen", "0"]
        )
    finally:
        cache.chmod(0o755)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("bancache: error: ") and "cannot write the store there (Permission denied)" in r.output
    assert "chmod u+w" in r.output and "Traceback" not in r.output
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before


def test_a_diverging_run_stops_and_writes_no_model(project: ProjectPaths) -> None:
    from pipeline.core.errors import DivergedError

    raw = tiny_params()
    raw["train"]["lr"] = 1e30
    with pytest.raises(DivergedError, match=r"generation 0: the training loss became (nan|inf) in epoch 1") as e:
        train.run(ParamsFile(raw), project, 0)
    assert "no model was written" in str(e.value) and "train.lr" in str(e.value)
    assert not project.model(0).exists() and not project.train_metrics(0).exists()
    assert not project.train_state(0).exists()


def test_thread_count_from_the_environment_does_not_change_the_checkpoint(
    project: ProjectPaths, tmp_path: Path
) -> None:
    roots = []
    for threads in ("1", "2"):
        root = tmp_path / f"omp{threads}"
        shutil.copytree(project.root, root)
        (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        for command in (("train", "--gen", "0"), ("export-logits", "--gen", "0")):
            r = _cli(root, *command, env=env)
            assert r.returncode == 0, r.stderr
        roots.append(root)
    a, b = (ProjectPaths(r).model(0).read_bytes() for r in roots)
    assert a == b
    markers = [(ProjectPaths(r).store(0) / MARKER).read_text() for r in roots]  # sha256 of every array
    assert markers[0] == markers[1]
    assert load_checkpoint(ProjectPaths(roots[0]).model(0))["meta"]["recipe"]["threads"] == 1  # in the provenance


def test_float16_export_never_overflows(exported_root: Path, tmp_path: Path) -> None:
    """Logits beyond +-65504 export to float16: each row is stored minus its max (attribute logit_shift),
    which leaves every consumer's softmax, hence targets, ensembles and inspect statistics, unchanged."""
    from pipeline.audit.statistics import audit_store, open_checked
    from pipeline.cache.reader import CachedTargets
    from pipeline.data.prepared import load_prepared, open_labels
    from pipeline.models.checkpoint import model_from_checkpoint, save_checkpoint
    from pipeline.params import ExportParams, InspectParams
    from pipeline.results.ensemble import evaluate_chain
    from pipeline.teachers.export import export_logits

    lay = ProjectPaths(exported_root)
    ckpt = load_checkpoint(lay.model(0))
    model = model_from_checkpoint(ckpt)
    with torch.no_grad():
        model.head.weight.mul_(1e5)  # a diverged or very confident model: logits of order 1e5..1e6
        model.head.bias.mul_(1e5)
    big = tmp_path / "big.pt"
    save_checkpoint(big, model, ckpt["meta"])
    data = load_prepared(lay.dataset)
    stores = {}
    for dtype in ("float16", "float32"):  # float16 used to fail: "171 non-finite rows ..."
        p = ExportParams(dtype=dtype, chunk_rows=128, batch_size=100, device="cpu")
        stores[dtype] = tmp_path / dtype
        attrs = export_logits(big, data, stores[dtype], p, torch.device("cpu"))
        assert attrs.get("logit_shift") == ("row_max" if dtype == "float16" else "none")
    raw32 = LogitStore.open(stores["float32"]).array("train")[:, 0, :]
    assert np.abs(raw32).max() > 65504  # the case that used to fail
    rows = np.arange(len(data.y_train))
    t32, t16 = (CachedTargets(stores[d], "train", data.fingerprint, len(rows), 10) for d in ("float32", "float16"))
    for temperature in (1.0, 4.0):  # the targets every loss softens
        p32, p16 = (t.target(rows, temperature=temperature).p for t in (t32, t16))
        assert (p32.argmax(1) == p16.argmax(1)).all()
        torch.testing.assert_close(p16, p32, atol=2e-3, rtol=0)
    e32, e16 = (evaluate_chain({0: stores[d]}, data) for d in ("float32", "float16"))
    assert e16["accuracy"] == e32["accuracy"]
    with open_labels(lay.dataset) as labels:
        s32, s16 = (audit_store(open_checked(stores[d], labels), labels, InspectParams()) for d in stores)
        m32, m16 = s32[0].metrics(), s16[0].metrics()
        assert m16["accuracy"] == m32["accuracy"]
        assert m16["entropy_mean"] == pytest.approx(m32["entropy_mean"], abs=1e-3)
        assert s16[1].metrics()["ece"] == pytest.approx(s32[1].metrics()["ece"], abs=1e-3)
