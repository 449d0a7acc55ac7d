"""Every bad input a user can hit, through the real CLI: exit status 2, one clear message, no traceback.

Each case is one row of docs/errors.md; regenerate that table with `python -m tests.test_errors`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

import pipeline.models.checkpoint
from pipeline.cache.store import MARKER, LogitStore
from pipeline.core.paths import ProjectPaths
from stages.cli import main
from tests.conftest import tiny_params


def _set(root: Path, dotted: str, value) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def _old_controls_key(root: Path) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["controls"] = raw.pop("train_controls")
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def _raw_params(root: Path, text: str) -> None:
    (root / "params.yaml").write_text(text)


def _chunk_file(store: Path) -> Path:
    return next(p for p in sorted((store / "train" / "c").rglob("*")) if p.is_file())


def _foreign_store(root: Path, num_classes: int | None = None, fingerprint: str | None = None) -> None:
    lay = ProjectPaths(root)
    attrs = LogitStore.open(lay.store(0)).attrs
    rows = attrs["splits"]
    c = num_classes or attrs["num_classes"]
    keep = {k: attrs[k] for k in ("generation", "arch", "seed", "temperature", "checkpoint_sha256", "class_names")}
    keep["dataset_fingerprint"] = fingerprint or attrs["dataset_fingerprint"]
    shutil.rmtree(lay.store(0))
    s = LogitStore.create(lay.store(0), rows, c, 1, "float16", 128, keep)
    for split, n in rows.items():
        s.write(split, 0, np.zeros((n, c), np.float32))
    s.seal()


def _edit_rows(store: Path, split: str, rows: slice, value: float) -> None:
    """Overwrite rows through zarr: the chunk decodes fine, only the marker's sha256 can tell."""
    zarr.open_array(str(store / split), mode="r+")[rows] = value


def _edit_marker_sha(store: Path) -> None:
    marker = json.loads((store / MARKER).read_text())
    marker["attributes"]["sha256"]["test"] = "0" * 64
    (store / MARKER).write_text(json.dumps(marker))


def _edit_dataset(root: Path) -> None:
    with h5py.File(ProjectPaths(root).dataset, "r+") as f:  # the fingerprint attribute is left as it was
        f["x_train"][0] = f["x_train"][0] + 1.0


def _delete_test_chunk(root: Path) -> None:
    _set(root, "students", {})  # the ensemble of generation 0 alone
    next(p for p in sorted((ProjectPaths(root).store(0) / "test" / "c").rglob("*")) if p.is_file()).unlink()


def _mse_on_a_topk_store(root: Path) -> None:
    """Generation 0 re-exported as a top-k store (a distribution, no full logits), then an mse student of it."""
    from stages import export
    from stages.common import ParamsFile

    _set(root, "export.layout", "topk")
    _set(root, "export.topk", 3)
    export.run(ParamsFile(yaml.safe_load((root / "params.yaml").read_text())), ProjectPaths(root), 0)
    _set(root, "students.1.loss", "mse")


def _two_members(root: Path, **student: object) -> None:
    """Generation 2 learns from the ensemble [0, 1]; generation 1's store is a copy of generation 0's."""
    lay = ProjectPaths(root)
    shutil.copytree(lay.store(0), lay.store(1))
    _set(root, "students.2", {"teacher": [0, 1], "loss": "ban", **student})


def _foreign_member(root: Path, **kw) -> None:
    _two_members(root)
    _foreign_store(root, **kw)  # member 0 (its copy, member 1, stays as exported)


def _sparse_member_of_a_logits_mean(root: Path) -> None:
    from stages import export
    from stages.common import ParamsFile

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["export"] = {**raw["export"], "layout": "topk", "topk": 3}
    export.run(ParamsFile(raw), ProjectPaths(root), 0)
    _two_members(root, ensemble="logits")


def _member_with_other_views(root: Path) -> None:
    _two_members(root)
    path = ProjectPaths(root).store(1) / "zarr.json"
    meta = json.loads(path.read_text())
    meta["attributes"]["augmentation"] = {"kind": "crop+flip", "pad": 4, "size": 32, "seed": 1}
    path.write_text(json.dumps(meta))


def _unknown_metrics_column(root: Path) -> None:
    path = ProjectPaths(root).ensemble_metrics
    path.mkdir(parents=True, exist_ok=True)
    for key, members in (("gen0", [0]), ("gen1x", [1])):
        (path / f"{key}.json").write_text(json.dumps({"test_acc": 0.5, "members": members}))


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def _full_disk_in_export(_root: Path) -> Iterator[None]:
    """Every write into the store runs out of room, as on a full disk."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LogitStore, "write", _no_space)
        yield


class _FullDiskFile:
    """A file opened on a full disk: it opens, and every write fails with ENOSPC as the OS's would."""

    def __init__(self, f) -> None:
        self._f = f

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def write(self, data) -> int:
        _no_space()
        return 0


@contextlib.contextmanager
def _full_disk_for_checkpoints(_root: Path) -> Iterator[None]:
    """The checkpoint and resume-state writes (`save_atomic`'s own open) run out of room; nothing else."""
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullDiskFile(f) if "w" in mode else f

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.models.checkpoint, "open", full_open, raising=False)
        yield


@contextlib.contextmanager
def _read_only_cache(root: Path) -> Iterator[None]:
    """cache/ without write permission; root ignores permission bits, so there the store's creation fails
    as the OS fails it for anyone else (as in tests/test_faults.py::test_export_into_a_read_only_cache_dir)."""

    def denied(path, *_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    cache = ProjectPaths(root).store(0).parent
    cache.chmod(0o555)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if os.geteuid() == 0:
                mp.setattr(LogitStore, "create", denied)
            yield
    finally:
        cache.chmod(0o755)


def _files_project(root: Path, damage: str) -> None:
    """An on-disk ImageFolder dataset (data.storage: files) prepared, then one file damaged: `truncated`
    before prepare (indexed as it is, unreadable when decoded), `edited` (same size) or `missing` after."""
    from tests.test_files_dataset import make_folder

    make_folder(root / "imgs", {"train": 4, "test": 2})
    jpg = root / "imgs" / "train" / "dog" / "002.jpg"
    blob = jpg.read_bytes()
    if damage == "truncated":
        jpg.write_bytes(blob[: len(blob) // 2])
    data = {"dataset": "imagefolder", "root": str(root / "imgs"), "storage": "files", "size": 16}
    for key, value in {**{f"data.{k}": v for k, v in data.items()}, "train.arch": "cnn3"}.items():
        _set(root, key, value)
    r = CliRunner().invoke(main, ["-q", "--params", str(root / "params.yaml"), "--root", str(root), "prepare"])
    assert r.exit_code == 0, r.output
    if damage == "edited":
        jpg.write_bytes(blob[:-3] + bytes(b ^ 0xFF for b in blob[-3:]))
    elif damage == "missing":
        jpg.unlink()


@dataclass
class Case:
    what: str
    setup: Callable[[Path], None]
    args: tuple[str, ...]
    expect: str
    # A fault of the machine (full disk, no permission) held while the command runs: the real error path
    fault: Callable[[Path], contextlib.AbstractContextManager[None]] = lambda _root: contextlib.nullcontext()


CASES = [
    Case(
        "unknown key in params",
        lambda r: _set(r, "train.epoch", 3),
        ("train", "--gen", "0"),
        "train.epoch: unknown key. Allowed keys in 'train'",
    ),
    Case(
        "unknown params section", lambda r: _set(r, "trian.lr", 1), ("train", "--gen", "0"), "unknown section 'trian'"
    ),
    Case(
        "wrong type",
        lambda r: _set(r, "train.epochs", "ten"),
        ("train", "--gen", "0"),
        "train.epochs = 'ten': expected int",
    ),
    Case(
        "warmup as long as training",
        lambda r: _set(r, "train.warmup_epochs", 2),
        ("train", "--gen", "0"),
        "train.warmup_epochs = 2: must be below epochs (2)",
    ),
    Case(
        "temperature <= 0",
        lambda r: _set(r, "students.1.temperature", 0),
        ("train", "--gen", "1"),
        "students.1.temperature = 0.0: must be > 0.0",
    ),
    Case(
        "alpha outside [0, 1]",
        lambda r: _set(r, "students.2.alpha", 1.5),
        ("train", "--gen", "2"),
        "students.2.alpha = 1.5: must be >= 0.0 and <= 1.0",
    ),
    Case(
        "teacher that does not exist",
        lambda r: _set(r, "students.4", {"teacher": 3}),
        ("train", "--gen", "1"),
        "students.4.teacher = 3: no such generation",
    ),
    Case(
        "teacher generation >= student",
        lambda r: _set(r, "students.1.teacher", 1),
        ("train", "--gen", "1"),
        "students.1.teacher = 1: a teacher must be an earlier generation",
    ),
    Case(
        "ensemble member that is not earlier",
        lambda r: _set(r, "students.2.teacher", [0, 2]),
        ("train", "--gen", "2"),
        "students.2.teacher = [0, 2]: member 2 is not an earlier generation",
    ),
    Case(
        "ensemble member listed twice",
        lambda r: _set(r, "students.2.teacher", [0, 1, 0]),
        ("train", "--gen", "2"),
        "students.2.teacher = [0, 1, 0]: generation 0 is listed more than once",
    ),
    Case(
        "ensemble member from another dataset",
        lambda r: _foreign_member(r, fingerprint="0" * 64),
        ("train", "--gen", "2"),
        "cache/gen-0: exported from another dataset",
    ),
    Case(
        "ensemble member with another class count",
        lambda r: _foreign_member(r, num_classes=7),
        ("train", "--gen", "2"),
        "cache/gen-0: has 7 classes, the dataset has 10",
    ),
    Case(
        "ensemble members with different views",
        _member_with_other_views,
        ("train", "--gen", "2"),
        "hold different views",
    ),
    Case(
        "logits mean of an ensemble with a sparse member",
        _sparse_member_of_a_logits_mean,
        ("train", "--gen", "2"),
        "ensemble = 'logits' averages every member's C logits, but member generation 0",
    ),
    Case(
        "label loss with a teacher",
        lambda r: _set(r, "students.1.loss", "ce"),
        ("train", "--gen", "1"),
        "students.1.loss = 'ce' ignores the teacher 0: use one of",
    ),
    Case(
        "teacher loss without a teacher",
        lambda r: _set(r, "students.1.teacher", None),
        ("train", "--gen", "1"),
        "students.1.teacher: unset, but loss 'ban' learns from a teacher",
    ),
    Case(
        "generation 0 with a teacher loss",
        lambda r: _set(r, "gen0.loss", "ban"),
        ("train", "--gen", "0"),
        "generation 0 trains from labels",
    ),
    Case(
        "unquoted students key",
        lambda r: _raw_params(r, yaml.safe_dump(tiny_params()).replace("'1':", "1:")),
        ("validate",),
        "keys are generation numbers >= 1 written as quoted strings",
    ),
    Case(
        "data root does not exist",
        lambda r: _set(r, "data", {"dataset": "npz", "root": str(r / "nowhere")}),
        ("validate",),
        "nowhere': no such folder (dataset 'npz'). Point it at the folder holding the data",
    ),
    Case("params.yaml is not YAML", lambda r: _raw_params(r, "train: [unclosed"), ("validate",), "not valid YAML"),
    Case("--gen not in params", lambda r: None, ("train", "--gen", "7"), "no section students.'7'"),
    Case(
        "dataset not prepared",
        lambda r: ProjectPaths(r).dataset.unlink(),
        ("train", "--gen", "0"),
        "prepared dataset not found. Run `bancache prepare`",
    ),
    Case(
        "dataset file corrupted",
        lambda r: ProjectPaths(r).dataset.write_bytes(b"\\x89HDF\\r\\n" + bytes(100)),
        ("train", "--gen", "0"),
        "unreadable prepared dataset",
    ),
    Case(
        "unlabelled rows without a labelled subset (transfer set)",
        lambda r: _set(r, "data.n_unlabelled", 100),
        ("prepare",),
        "data.n_unlabelled = 100: the unlabelled rows are the train rows a labelled subset leaves out; set data.n_tr",
    ),
    Case(
        "more unlabelled rows than the labelled subset leaves out",
        lambda r: (_set(r, "data.n_train", 300), _set(r, "data.n_unlabelled", 200)),
        ("prepare",),
        "data.n_unlabelled = 200: of the 400 train rows, 100 are outside the 300-row labelled subset (data.n_train)",
    ),
    Case(
        "checkpoint missing",
        lambda r: ProjectPaths(r).model(0).unlink(),
        ("export-logits", "--gen", "0"),
        "checkpoint not found. Run `bancache train`",
    ),
    Case(
        "checkpoint is not a bancache checkpoint",
        lambda r: torch.save({"w": torch.zeros(2)}, ProjectPaths(r).model(0)),
        ("export-logits", "--gen", "0"),
        "not a bancache checkpoint",
    ),
    Case(
        "checkpoint carries a pickle payload",
        lambda r: torch.save({"x": _Payload()}, ProjectPaths(r).model(0)),
        ("export-logits", "--gen", "0"),
        "weights_only=True",
    ),
    Case(
        "checkpoint truncated",
        lambda r: ProjectPaths(r).model(0).write_bytes(ProjectPaths(r).model(0).read_bytes()[:300]),
        ("export-logits", "--gen", "0"),
        "truncated or not a bancache checkpoint",
    ),
    Case(
        "teacher store missing",
        lambda r: shutil.rmtree(ProjectPaths(r).store(0)),
        ("train", "--gen", "1"),
        "no logit store here. Run `bancache export-logits --gen 0` first",
    ),
    Case(
        "teacher store incomplete (export killed)",
        lambda r: (ProjectPaths(r).store(0) / "complete/zarr.json").unlink(),
        ("train", "--gen", "1"),
        "incomplete store (no complete/zarr.json)",
    ),
    Case(
        "teacher store from another dataset",
        lambda r: _foreign_store(r, fingerprint="0" * 64),
        ("train", "--gen", "1"),
        "exported from another dataset",
    ),
    Case(
        "teacher store with another class count",
        lambda r: _foreign_store(r, num_classes=7),
        ("train", "--gen", "1"),
        "has 7 classes, the dataset has 10",
    ),
    Case(
        "teacher store with a corrupted chunk",
        lambda r: _chunk_file(ProjectPaths(r).store(0)).write_bytes(b"junk" * 9),
        ("train", "--gen", "1"),
        "a chunk is damaged, re-export the store",
    ),
    Case(
        "augmented views on non-image data",
        lambda r: _set(r, "export.views", 4),
        ("export-logits", "--gen", "0"),
        "export.views = 4: augmented views need square uint8 images",
    ),
    Case(
        "top-k larger than the class count",
        lambda r: (_set(r, "export.layout", "topk"), _set(r, "export.topk", 50)),
        ("export-logits", "--gen", "0"),
        "export.topk = 50: the dataset has only 10 classes",
    ),
    Case(
        "view policy on a one-view store",
        lambda r: _set(r, "students.1.view_policy", "cycle"),
        ("train", "--gen", "1"),
        "students.1.view_policy = 'cycle': the teacher's store",
    ),
    Case(
        "device cuda without a GPU",
        lambda r: _set(r, "train.device", "cuda"),
        ("train", "--gen", "0"),
        "no CUDA device is visible",
    ),
    Case(
        "teacher store edited after export",
        lambda r: _edit_rows(ProjectPaths(r).store(0), "train", slice(0, 5), 0.0),
        ("train", "--gen", "1"),
        "'train' content differs from its marker (sha256 in complete/zarr.json)",
    ),
    Case(
        "edited sha256 in the completion marker",
        lambda r: _edit_marker_sha(ProjectPaths(r).store(0)),
        ("train", "--gen", "1"),
        "differs from its own marker_sha256",
    ),
    Case(
        "store with missing test rows (deleted chunk), read as trusted",
        _delete_test_chunk,
        ("--trust-stores", "ensemble"),
        "are missing or not finite",
    ),
    Case(
        "store with non-finite rows, read as trusted",
        lambda r: _edit_rows(ProjectPaths(r).store(0), "train", slice(3, 4), float("nan")),
        ("--trust-stores", "inspect", "--gen", "0"),
        "rows [3] of 'train' are missing or not finite",
    ),
    Case(
        "NaN temperature",
        lambda r: _set(r, "students.1.temperature", float("nan")),
        ("train", "--gen", "1"),
        "students.1.temperature = nan: must be a finite number",
    ),
    Case(
        "infinite learning rate",
        lambda r: _set(r, "train.lr", float("inf")),
        ("train", "--gen", "0"),
        "train.lr = inf: must be a finite number",
    ),
    Case(
        "NaN alpha",
        lambda r: _set(r, "students.2.alpha", float("nan")),
        ("train", "--gen", "2"),
        "students.2.alpha = nan: must be a finite number",
    ),
    Case(
        "training loss becomes non-finite",
        lambda r: _set(r, "train.lr", 1e30),
        ("train", "--gen", "0"),
        "the training loss became",
    ),
    Case(
        "dataset arrays edited in place",
        _edit_dataset,
        ("train", "--gen", "0"),
        "its arrays differ from its recorded fingerprint",
    ),
    Case(
        "teacher store metadata corrupted",
        lambda r: (ProjectPaths(r).store(0) / "zarr.json").write_text("{"),
        ("train", "--gen", "1"),
        "unreadable store metadata",
    ),
    Case(
        "unknown column in the ensemble metrics",
        _unknown_metrics_column,
        ("report",),
        "names an unknown result column 'gen1x'; known columns: gen{g}, ens{k}",
    ),
    Case(
        "disk full during export",
        lambda r: None,
        ("-q", "export-logits", "--gen", "0"),  # -q: the error is the only line (no progress line before it)
        "no space left on the device while exporting",
        _full_disk_in_export,
    ),
    Case(
        "disk full while writing a checkpoint or resume state",
        lambda r: None,
        ("-q", "train", "--gen", "0"),
        ".bancache/state/gen-0.pt: no space left on the device while writing it (No space left on device)",
        _full_disk_for_checkpoints,
    ),
    Case(
        "export into a read-only cache directory",
        lambda r: None,
        ("-q", "export-logits", "--gen", "0"),
        "cannot write the store there (Permission denied); make the directory writable (chmod u+w)",
        _read_only_cache,
    ),
    Case(
        "image file missing after prepare (data.storage: files)",
        lambda r: _files_project(r, "missing"),
        ("train", "--gen", "0"),
        "imgs/train/dog/002.jpg: missing (listed by `bancache prepare`); restore it, or rerun `bancache prepare`",
    ),
    Case(
        "image file edited after prepare (data.storage: files)",
        lambda r: _files_project(r, "edited"),
        ("train", "--gen", "0"),
        "imgs/train/dog/002.jpg: changed since `bancache prepare` (its sha256 differs from the index)",
    ),
    Case(
        "truncated JPEG (data.storage: files)",
        lambda r: _files_project(r, "truncated"),
        ("train", "--gen", "0"),
        "imgs/train/dog/002.jpg: unreadable image (truncated or not an image:",
    ),
    Case(
        "a torchvision model's own name as arch",
        lambda r: _set(r, "train.arch", "resnet18"),
        ("validate",),
        "depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got 18. For torchvision's resnet18, write "
        "'tv_resnet18'",
    ),
    Case(
        "logit MSE from a sparse (top-k) teacher store",
        _mse_on_a_topk_store,
        ("train", "--gen", "1"),
        "students.1.loss = 'mse' matches the teacher's logits, and the teacher's store",
    ),
    Case(
        "the old `controls:` params key",
        _old_controls_key,
        ("validate",),
        "section 'controls' was renamed to 'train_controls'",
    ),
]


def _imported(root: Path, weights: object, kind: str = "factory", classes: int = 10, file: str = "t.pt") -> None:
    """gen0.source importing `weights` (saved with torch.save under teachers/, unless None) into the tiny
    MNIST-1D project: a `tests.test_foreign_teacher:flat_net` factory, or torchvision's resnet18."""
    (root / "teachers").mkdir(exist_ok=True)
    if weights is not None:
        torch.save(weights, root / "teachers" / file)
    builder = {"factory": "tests.test_foreign_teacher:flat_net", "kwargs": {"inputs": 40, "classes": classes}}
    if kind == "torchvision":
        builder = {"arch": "resnet18"}
    _set(root, "gen0.source", {"kind": kind, "weights": f"teachers/{file}", **builder})


def _flat_net_weights(classes: int) -> dict:
    from tests.test_foreign_teacher import flat_net

    return flat_net(40, classes).state_dict()


CASES += [
    Case(
        "imported teacher's weights file holds a pickled object",
        lambda r: _imported(r, torch.nn.Linear(40, 10), kind="torchvision"),
        ("train", "--gen", "0"),
        "teachers/t.pt: refused: it holds a pickled torch.nn.modules.linear.Linear object, which "
        "torch.load(weights_only=True) will not run; only state_dict/tensor files are accepted",
    ),
    Case(
        "imported teacher with another class count",
        lambda r: _imported(r, _flat_net_weights(7), classes=7),
        ("train", "--gen", "0"),
        "teachers/t.pt: the teacher outputs (2, 7) for 2 rows; the data has 10 classes",
    ),
    Case(
        "imported teacher's weights for another class count",
        lambda r: _imported(r, _flat_net_weights(7)),
        ("train", "--gen", "0"),
        "teachers/t.pt: the weights are for 7 classes (1.weight has shape [7, 40]), the data has 10",
    ),
    Case(
        "imported teacher's weights file missing",
        lambda r: _imported(r, None),
        ("train", "--gen", "0"),
        "gen0.source.weights = 'teachers/t.pt': no such file",
    ),
    Case(
        "imported teacher's factory cannot be imported",
        lambda r: (_imported(r, _flat_net_weights(10)), _set(r, "gen0.source.factory", "nosuchpkg.nets:build")),
        ("train", "--gen", "0"),
        "gen0.source.factory = 'nosuchpkg.nets:build': cannot import it (ModuleNotFoundError: No module named "
        "'nosuchpkg'); install the module or put its folder on PYTHONPATH",
    ),
    Case(
        "imported teacher of an unknown kind",
        lambda r: _set(r, "gen0.source", {"kind": "onnx", "weights": "teachers/t.onnx"}),
        ("validate",),
        "gen0.source.kind = 'onnx': allowed values are torchvision, factory, torchscript, export",
    ),
]


def run_case(case: Case, root: Path):
    case.setup(root)
    with case.fault(root):
        return CliRunner().invoke(main, ["--params", str(root / "params.yaml"), "--root", str(root), *case.args])


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gets_a_clear_error(case: Case, exported_root: Path, tmp_path: Path) -> None:
    if case.what == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    root = tmp_path / "p"
    shutil.copytree(exported_root, root)
    command = next(a for a in case.args if not a.startswith("-"))  # the subcommand, after the global options
    before = {p: p.read_bytes() for p in (root / "cache").rglob("*") if p.is_file()} if command != "train" else {}
    r = run_case(case, root)
    assert r.exit_code == 2, r.output
    assert case.expect in r.output
    assert r.output.startswith("bancache: error: ") and "Traceback" not in r.output
    if command == "export-logits":  # a refused export leaves the existing store as it was
        assert {p: p.read_bytes() for p in (root / "cache").rglob("*") if p.is_file()} == before


def main_table(out: Path = Path("docs/errors.md")) -> None:
    """Write docs/errors.md from the same cases the tests run."""
    import tempfile

    from stages import export, prepare, train
    from tests.conftest import ParamsFile

    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        lay = ProjectPaths(base)
        prepare.run(ParamsFile(tiny_params()), lay)
        (base / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
        train.run(ParamsFile(tiny_params()), lay, 0)
        export.run(ParamsFile(tiny_params()), lay, 0)
        rows = ["| bad input | command | what the user sees (exit status 2) |", "|---|---|---|"]
        for i, case in enumerate(CASES):
            root = Path(d) / f"c{i}"
            shutil.copytree(base, root)
            msg = run_case(case, root).output.strip().replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {case.what} | `bancache {' '.join(case.args)}` | {msg} |")
    head = (
        "# Errors a user can hit\n\nEvery row is a test in `tests/test_errors.py` (regenerate with "
        "`python -m tests.test_errors`). Paths are shown relative to a temporary project.\n\n"
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(head + "\n".join(rows).replace(d + "/", "") + "\n")


if __name__ == "__main__":
    main_table()
