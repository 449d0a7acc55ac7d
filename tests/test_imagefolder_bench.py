"""benchmarks/imagefolder.py (issue 21's benchmarks of images kept on disk) at its smallest size: every
measurement must run and leave its numbers, so the script cannot rot between full runs. Speed is not
asserted (benchmarks measure ratios; tests check behaviour)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import benchmark_module

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("airplane", "automobile", "bird")


def positive(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-shaped npz source (train.npz / test.npz: x uint8 (N, 32, 32, 3), y, classes), rows by class."""
    src = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 15)):
        y = np.repeat(np.arange(len(CLASSES)), n // len(CLASSES))
        x = (rng.random((len(y), 32, 32, 3)) * 80).astype(np.uint8)
        x[np.arange(len(y)), :, :, y] += 150  # a class colour, so the images differ by class
        np.savez(src / f"{split}.npz", x=x, y=y.astype(np.int64), classes=np.array(CLASSES))
    return src


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """benchmarks/imagefolder.py imported, and undone after (it registers its architecture in-process)."""
    with benchmark_module("imagefolder", monkeypatch) as module:
        yield module


def test_folder_is_generated_once_upscaled_and_balanced(bench: Any, source: Path, tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    made = bench.make_folder(source, root, 12, 6, 48)
    assert made["cached"] is False
    train = sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.jpg"))
    assert len(train) == 12 and len(list((root / "test").rglob("*.jpg"))) == 6
    assert [len(list((root / "train" / c).glob("*.jpg"))) for c in CLASSES] == [4, 4, 4]
    with Image.open(root / train[0]) as img:
        assert img.format == "JPEG" and img.size == (48, 48)
    stamp = (root / train[0]).stat().st_mtime_ns
    assert bench.make_folder(source, root, 12, 6, 48)["cached"] is True  # same recipe: kept
    assert (root / train[0]).stat().st_mtime_ns == stamp
    assert bench.make_folder(source, root, 12, 6, 40)["cached"] is False  # another size: regenerated
    with Image.open(root / train[0]) as img:
        assert img.size == (40, 40)


def test_smallest_run_measures_every_arm_and_size(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "imagefolder.json"
    cmd = [sys.executable, "benchmarks/imagefolder.py", "--files", "60", "--sizes", "30,60", "--px", "40"]
    cmd += ["--source", str(source), "--image-root", str(tmp_path / "imgs"), "--workdir", str(tmp_path / "work")]
    cmd += ["--reps", "1", "--batch-size", "8", "--out", str(out), "--keep-workdir"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["folder"]["train"] == 60 and payload["folder"]["px"] == 40
    rows = payload["memory"]["rows"]
    steps = [(s, n) for n in (30, 60) for s in ("prepare", "export", "student")]
    assert [(r["step"], r["files"]) for r in rows] == steps
    for r in rows:
        assert positive(r["peak_mib"]) and r["peak_mib"] >= r["after_imports_mib"] > 0 and positive(r["wall_s"])
        if r["step"] != "prepare":  # export and the student decode in one DataLoader worker process
            assert r["workers_seen"] >= 1 and positive(r["worker_peak_mib"])
    flat = payload["memory"]["largest_over_smallest"]
    assert set(flat) == {"prepare", "export", "student"} and all(positive(v["peak"]) for v in flat.values())
    epoch, export = payload["speed"]["student_epoch"], payload["speed"]["export_vs_inference"]
    assert set(epoch["wall_s"]) == {"plain", "bancache"} and set(export["wall_s"]) == {"inference", "export"}
    assert all(positive(t) for arm in (epoch, export) for ts in arm["wall_s"].values() for t in ts)
    assert epoch["images_per_epoch"] == 60  # fit + validation rows, both arms
    assert positive(epoch["bancache_over_plain_images_per_s"]) and positive(export["ratio"])
    for target in (">= 0.95", "<= 1.2", "<= 1.1"):
        assert target in payload["tables"]
    assert (Path(payload["args"]["workdir"]) / "60" / "store").is_dir()  # the export the student read
