"""torch.distributed on CPU (gloo, 2 processes through torchrun): sharded export and DDP training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cache.store import LogitStore
from pipeline.core.distributed import check_partition, partition_rows
from pipeline.core.paths import ProjectPaths
from pipeline.params import LaunchParams
from stages.launch import torchrun_command
from tests.conftest import tiny_params


def test_partition_is_whole_chunks_and_covers_every_row() -> None:
    for n, chunk, world in [(400, 128, 2), (100, 128, 2), (1000, 7, 3), (5, 1, 8), (0, 4, 2)]:
        plan = partition_rows(n, chunk, world)
        assert len(plan) == world and plan[0][0] == 0 and plan[-1][1] == n
        for start, stop in plan:
            assert (start % chunk == 0 or start == n) and (stop % chunk == 0 or stop == n)


def test_partition_with_a_boundary_inside_a_chunk_is_rejected() -> None:
    with pytest.raises(ValueError, match="boundary 100 falls inside a chunk of 128 rows"):
        check_partition([(0, 100), (100, 400)], 400, 128)
    with pytest.raises(ValueError, match="expected to start at 128"):
        check_partition([(0, 128), (256, 400)], 400, 128)  # a gap
    with pytest.raises(ValueError, match="covers rows up to 256"):
        check_partition([(0, 128), (128, 256)], 400, 128)


def test_torchrun_command_single_and_multi_node() -> None:
    one = torchrun_command(LaunchParams(nproc_per_node=4), ["train", "--gen", "1"])
    assert "--standalone" in one and "--nproc-per-node=4" in one and one[-3:] == ["train", "--gen", "1"]
    multi = torchrun_command(LaunchParams(nproc_per_node=8, nnodes=2, rdzv_endpoint="n0:29500"), ["x"])
    assert "--nnodes=2" in multi and "--rdzv-endpoint=n0:29500" in multi and "--standalone" not in multi


def _cli(root: Path, *args: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(["bancache", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def _set_launch(root: Path, nproc: int, **train) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["launch"] = {"nproc_per_node": nproc, "backend": "gloo"}
    raw["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def test_two_process_export_is_bit_equal_to_single_process(exported_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "p"
    shutil.copytree(exported_root, root)
    _set_launch(root, 2)
    _cli(root, "export-logits", "--gen", "0")
    single, multi = LogitStore.open(ProjectPaths(exported_root).store(0)), LogitStore.open(ProjectPaths(root).store(0))
    multi.verify()
    for split in ("train", "test"):
        np.testing.assert_array_equal(single.array(split)[:], multi.array(split)[:])
    assert (ProjectPaths(root).store(0) / "complete/zarr.json").read_text() == (
        ProjectPaths(exported_root).store(0) / "complete/zarr.json"
    ).read_text()


def test_two_process_training_matches_single_process(tmp_path: Path) -> None:
    raw = tiny_params()
    raw["data"]["num_samples"] = 2000
    # both on the DataLoader path (torchrun always streams): the comparison is DDP against one process
    raw["train"].update({"epochs": 15, "lr": 0.02, "batch_size": 64, "memory_budget_mib": 0})
    accs = {}
    for nproc in (1, 2):
        root = tmp_path / f"n{nproc}"
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        _set_launch(root, nproc)
        _cli(root, "prepare")
        _cli(root, "train", "--gen", "0")
        _cli(root, "export-logits", "--gen", "0")
        _cli(root, "train", "--gen", "1")
        accs[nproc] = [json.loads(ProjectPaths(root).train_metrics(g).read_text())["test_acc"] for g in (0, 1)]
    # Same data, same global batch, different shards per step: equal within noise (400 test rows).
    for single, ddp in zip(accs[1], accs[2], strict=True):
        assert ddp > 0.5 and abs(single - ddp) <= 0.08, accs


def test_two_process_export_of_images_on_disk_is_bit_equal(tmp_path: Path) -> None:
    """data.storage: files with RandomResizedCrop views: torchrun (gloo, 2 processes) writes the same store,
    logits and (i, j, h, w, flip) boxes, as one process."""
    from tests.test_files_dataset import make_folder

    make_folder(tmp_path / "imgs", {"train": 8, "test": 4})
    raw = tiny_params()
    raw["data"] = {"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "storage": "files", "size": 16}
    raw["train"].update({"arch": "cnn3", "epochs": 1, "batch_size": 8, "crop": "resized"})
    raw["export"].update({"views": 3, "chunk_rows": 8})
    one = tmp_path / "one"
    one.mkdir()
    (one / "params.yaml").write_text(yaml.safe_dump(raw))
    for args in (["prepare"], ["train", "--gen", "0"], ["export-logits", "--gen", "0"]):
        _cli(one, "-q", *args)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    _set_launch(two, 2)
    _cli(two, "-q", "export-logits", "--gen", "0")
    single, multi = LogitStore.open(ProjectPaths(one).store(0)), LogitStore.open(ProjectPaths(two).store(0))
    multi.verify()
    assert single.attrs["augmentation"]["kind"] == "resized-crop+flip"
    for name in ("train", "test", "train_aug"):
        np.testing.assert_array_equal(single.array(name)[:], multi.array(name)[:])
    assert (single.array("train_aug")[:, 1:, 2:4] > 0).all()  # views 1, 2 are real boxes
