"""benchmarks/gpu.sh, the one command a session lent a GPU runs (issue 23), run here as its CPU dry run:
every step must finish and leave its numbers, so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import benchmark_module

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("student_step-b512", "student_step-b128", "export-50k", "chain", "syncs", "deterministic", "compile")
ARMS = ("plain", "offline", "online", "plain-stream", "offline-stream", "reference", "reference-offline")
RATIOS = (
    "plain / reference",
    "offline / reference-offline",
    "offline / plain",
    "offline / online",
    "plain-stream / plain",
    "offline-stream / offline",
    "offline-stream / plain-stream",
    "offline-stream / online",
)
# dvc.yaml's order; the dry run's chain is the teacher and one student
CHAIN = ["prepare", "train --gen 0 --resume", "export-logits --gen 0", "train --gen 1 --resume"]
CHAIN += ["export-logits --gen 1", "ensemble"]


def positive(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return proc, out


def result(out: Path, step: str) -> dict[str, Any]:
    payload = json.loads((out / f"{step}.json").read_text())
    assert payload["benchmark"] == step
    assert payload["dry_run"] is True
    for key in ("device_name", "torch", "cuda", "commit"):
        assert payload[key], key
    assert payload["torch"] == __import__("torch").__version__
    assert payload["commit"] != ""
    return payload["result"]  # type: ignore[no-any-return]


def test_dry_run_exits_0_with_every_step(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    status = json.loads((out / "summary.json").read_text())["steps"]
    assert list(status) == list(STEPS)
    assert all(s["status"] == "ok" for s in status.values()), status
    for step in STEPS:
        assert (out / "logs" / f"{step}.log").exists()


def test_student_step_and_export_numbers(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = dry_run
    for batch in (512, 128):
        res = result(out, f"student_step-b{batch}")
        assert res["batch_size"] == batch and res["augment"] is True
        assert all(positive(res["arms"][a]["epoch_s_median"]) for a in ARMS)
        assert set(res["ratios"]) == set(RATIOS) and all(positive(v) for v in res["ratios"].values())
    ex = result(out, "export-50k")
    for key in ("export_s_median", "export_sequential_s_median", "inference_s_median", "export_over_inference"):
        assert positive(ex[key]), key


def test_chain_runs_every_stage_in_order(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = dry_run
    ch = result(out, "chain")
    assert [s["stage"] for s in ch["stages"]] == CHAIN
    assert all(positive(s["wall_s"]) for s in ch["stages"]) and positive(ch["total_s"])
    assert sorted(ch["test_acc"]) == ["gen-0", "gen-1"]  # the dry run's chain: the teacher and one student
    assert ch["params"]["data"]["dataset"] == "npz" and ch["params"]["train"]["device"] == "cpu"


def test_syncs_and_settings(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = dry_run
    sy = result(out, "syncs")
    names = {f"{p} gen {g} ({loss})" for p in ("resident", "streaming") for g, loss in ((0, "ce"), (1, "ban"))}
    assert set(sy["arms"]) == names
    for a in sy["arms"].values():  # no CUDA here: the runs happen, the counts are recorded as skipped
        assert len(a["epoch_s"]) == sy["epochs"] and all(positive(s) for s in a["epoch_s"])
        assert a["syncs_per_epoch"] is None and "CUDA" in a["skipped"]
    det = result(out, "deterministic")["arms"]
    assert set(det) == {"deterministic: false (config)", "deterministic: true"}
    assert all(positive(a["epoch_s_median"]) and positive(a["ratio_vs_config"]) for a in det.values())
    comp = result(out, "compile")["arms"]
    assert positive(comp["compile: false (config)"]["epoch_s_median"])
    assert "skipped" in comp["compile: true"] or positive(comp["compile: true"]["epoch_s_median"])


def test_summary_lists_every_benchmark_ratio_and_target(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = dry_run
    text = (out / "summary.md").read_text()
    for needle in (*STEPS, *RATIOS, *CHAIN, "Dry run", "syncs / epoch", "deterministic: true", "compile: true"):
        assert needle in text, needle
    for target in ("0.9 x the reference", "offline / plain <= 1.03", "offline / online <= 0.85", "<= 1.2", "< 180 s"):
        line = next(ln for ln in text.splitlines() if target in ln)
        assert "PASS" in line or "MISS" in line, line


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """benchmarks/gpu.py imported here, and undone after (it registers bench_cnn2d and bench_resnet8)."""
    with benchmark_module("gpu", monkeypatch) as module:
        yield module


def test_sync_counts_per_epoch(gpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch of the sync count, without a GPU: torch's warning per synchronising call is emitted by
    hand (3 in the setup and first epoch, then 2 and 1), beside a warning that is not a sync."""
    import warnings

    import torch

    modes: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def train(on_epoch: Any) -> Any:
        history = []
        for epoch, syncs in enumerate((3, 2, 1), start=1):
            for _ in range(syncs):
                warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
            history.append(gpu.EpochLog(epoch, 0.5, 0.5, 0.1, 0.25))
            on_epoch(history[-1])
        return gpu.TrainResult(model=torch.nn.Identity(), history=history)

    counted = gpu.count_syncs(train, cuda=True)
    assert modes == ["warn", 0]  # on for the run, off after it
    assert counted["syncs_per_epoch"] == [3, 2, 1]
    assert counted["syncs_per_epoch_after_first"] == 1.5
    assert counted["syncs_in_first_epoch_and_setup"] == 3
    assert counted["other_warnings"] == 3
    assert sum(counted["where_after_first"].values()) == 3 and counted["epoch_s"] == [0.25] * 3
    assert gpu.count_syncs(train, cuda=False)["syncs_per_epoch"] is None
    assert modes == ["warn", 0]  # the CPU run leaves the mode alone
