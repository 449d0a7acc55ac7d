"""A store describes itself: how its generation was trained, labels, validation rows, a subset's original
indices, a readable dataset name; plain zarr opens it without a warning; `convert` names its file."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cache.store import MARKER, LogitStore
from pipeline.core.errors import IncompleteStoreError
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import load_prepared, write_prepared
from pipeline.data.sources import Loaded, subset
from pipeline.teachers.export import write_provenance
from stages import export, train
from stages.cli import main
from stages.common import ParamsFile
from tests.conftest import tiny_params


def test_student_store_records_how_it_was_trained_and_its_data(project: ProjectPaths) -> None:
    raw = tiny_params(
        students={
            "1": {"teacher": 0, "loss": "ban", "temperature": 2.0, "seed": 7},
            "2": {"teacher": 1, "loss": "dkd", "temperature": 4.0, "alpha": 1.0, "beta": 3.0, "seed": 8},
        }
    )
    params = ParamsFile(raw)
    for gen in (0, 1, 2):
        train.run(params, project, gen)
        export.run(params, project, gen)
    store = LogitStore.open(project.store(1))
    attrs = store.attrs
    # beta only where the loss reads it (dkd): the other generations' stores keep the attributes they had
    assert attrs["trained_with"] == {"loss": "ban", "temperature": 2.0, "alpha": 0.5, "teacher": 0, "seed": 7}
    dkd = {"loss": "dkd", "temperature": 4.0, "alpha": 1.0, "beta": 3.0, "teacher": 1, "seed": 8}
    assert LogitStore.open(project.store(2)).attrs["trained_with"] == dkd
    assert attrs["temperature"] == 1.0  # the stored logits themselves are raw
    assert LogitStore.open(project.store(0)).attrs["trained_with"]["loss"] == "ce"
    assert attrs["dataset_name"] == "MNIST-1D (500 samples: 400 train, 100 test rows)"
    data = load_prepared(project.dataset)
    np.testing.assert_array_equal(store.array("train_labels")[:], data.y_train)
    np.testing.assert_array_equal(store.array("test_labels")[:], data.y_test)
    np.testing.assert_array_equal(store.array("val_index")[:], data.val_index)
    # The provenance arrays are sealed with the logits: changing a label is caught by verify.
    labels = zarr.open_array(str(project.store(1) / "train_labels"), mode="r+")
    labels[0] = (int(labels[0]) + 1) % 10
    with pytest.raises(Exception, match="differs from its marker"):
        LogitStore.open(project.store(1)).verify()


def test_subset_store_keeps_original_indices(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = {"train": np.arange(40) % 4, "test": np.arange(20) % 4}
    arrays = {f"y_{s}": v.astype(np.int64) for s, v in y.items()}
    arrays |= {f"x_{s}": rng.integers(0, 255, (len(v), 3, 8, 8), dtype=np.uint8) for s, v in y.items()}
    loaded = subset(Loaded(arrays, ["a", "b", "c", "d"]), 8, 4, seed=3)
    write_prepared(tmp_path / "d.h5", loaded.arrays, loaded.class_names, "npz", 0.25, 0, description="toy")
    data = load_prepared(tmp_path / "d.h5")
    assert data.source_index is not None and data.description == "toy"
    for split in ("train", "test"):
        index = data.source_index[split]
        np.testing.assert_array_equal(arrays[f"x_{split}"][index], data.split(split)[0])  # rows map back
    store = LogitStore.create(tmp_path / "s", {"train": 8, "test": 4}, 4, 1, "float32", 4, {})
    write_provenance(store, data)
    np.testing.assert_array_equal(store.array("train_source_index")[:], data.source_index["train"])


def test_plain_zarr_opens_the_store_without_a_warning(exported_root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(ProjectPaths(exported_root).store(0)), mode="r")
        members = dict(group.members())
    assert {"train", "test", "train_labels", "val_index"} <= set(members)
    assert members["complete"].attrs["rows"] == {"train": 400, "test": 100}  # the marker, as a zarr group


def test_store_with_a_bare_marker_file_is_refused(exported_root: Path, tmp_path: Path) -> None:
    """A marker file `COMPLETE.json` instead of the `complete` group: no released version wrote one."""
    path = tmp_path / "old"
    shutil.copytree(ProjectPaths(exported_root).store(0), path)
    marker = json.loads((path / MARKER).read_text())["attributes"]
    shutil.rmtree(path / "complete")
    (path / "COMPLETE.json").write_text(json.dumps(marker))
    with pytest.raises(IncompleteStoreError, match=r"incomplete store \(no complete/zarr.json\)"):
        LogitStore.open(path)


@pytest.mark.parametrize(("out", "fmt", "written"), [("g0b", "npz", "g0b.npz"), ("g0b", "h5", "g0b.h5")])
def test_convert_adds_the_extension(exported_root: Path, tmp_path: Path, out: str, fmt: str, written: str) -> None:
    root = str(exported_root)
    args = ["--params", f"{root}/params.yaml", "--root", root, "convert", "--gen", "0", "--format", fmt]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [written]
    bad = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x.h5" if fmt == "npz" else tmp_path / "x.npz")])
    assert bad.exit_code == 2 and "does not match --format" in bad.output


def test_checkpoints_and_metrics_files_record_the_machine(project: ProjectPaths) -> None:
    """Every checkpoint (models/gen-K, controls/gen-K) and every metrics file the chain writes records the
    machine that made it: results are bit-identical only on the same CPU kind, kernels, versions, threads."""
    import torch

    from pipeline.core.machine import cpu_model, machine
    from pipeline.models.checkpoint import load_checkpoint
    from stages import audit, control, ensemble

    raw = {**tiny_params(students={"1": {"teacher": 0, "loss": "ban"}}), "train_controls": True}
    for gen in (0, 1):
        train.run(ParamsFile(raw), project, gen)
        export.run(ParamsFile(raw), project, gen)
    ensemble.run(ParamsFile(raw), project)
    audit.run(ParamsFile(raw), project, 0)
    audit.run(ParamsFile(raw), project, 1, against=0)
    control.run(ParamsFile(raw), project, 1)
    here = machine()
    assert set(here) == {"cpu", "cpu_capability", "threads", "torch", "numpy", "zarr", "python", "cuda"}
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and here["torch"] == torch.__version__
    assert here["numpy"] == np.__version__ and here["zarr"] == zarr.__version__
    assert here["threads"] == tiny_params()["train"].get("threads", 1) == torch.get_num_threads()
    assert here["cuda"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert here["cpu"] == cpu_model() and f": {here['cpu']}\n" in cpuinfo.read_text()
    for ckpt in (project.model(0), project.model(1), project.control_model(1)):
        assert load_checkpoint(ckpt)["meta"]["machine"] == here, ckpt
    files = [project.train_metrics(0), project.train_metrics(1), project.control_metrics(1)]
    files += sorted(project.ensemble_metrics.glob("*.json"))
    files += [project.inspect(*g) / f for g in ((0, None), (1, 0)) for f in ("metrics.json", "statistics.json")]
    assert len(files) == 3 + 2 + 4  # ensemble: gen0.json, gen1.json (no Ens*k with one student); 2 audits x 2
    for path in files:
        # a one-item list: DVC's tables skip lists, so the record adds no column to `dvc metrics show`
        assert json.loads(path.read_text())["machine"] == [here], path


def test_readme_one_liner_prints_a_checkpoints_machine(exported_root: Path) -> None:
    """The README's `python -c` line, run as written in a project, prints the checkpoint's machine."""
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("python -c") and "'machine'" in ln)
    code = line.split('"', 2)[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=exported_root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from pipeline.core.machine import machine

    assert all(str(v) in r.stdout for v in machine().values() if v is not None), r.stdout
