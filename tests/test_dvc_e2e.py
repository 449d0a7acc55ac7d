"""The real `dvc repro` on a tiny config in a temporary git repo."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.models.checkpoint import load_checkpoint
from pipeline.results.ensemble import read_ensemble_metrics
from tests.conftest import tiny_params

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: float = 600, **env_extra: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env_extra}
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only contend on a shared CPU
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def spelled_out_tiny_params() -> dict:
    """The repo's params.yaml (every key spelled out) with the tiny config's values: 3 students."""
    from stages.common import ParamsFile

    raw = ParamsFile.load(REPO / "params.yaml").raw
    for section, values in tiny_params().items():
        if isinstance(values, dict) and section != "students":
            raw[section].update(values)
        elif section != "students":  # a scalar section such as `train_controls: false`
            raw[section] = values
    return raw


def _new_repo(root: Path, raw: dict) -> Path:
    """A git + DVC repo at `root` holding the project's dvc.yaml and `raw` as params.yaml. dvc.yaml's
    teachers_K stages are written for students 1..3 (see its comment); those of generations `raw` lacks
    are dropped, as a user with a shorter chain drops them."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    root.mkdir()
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name in [n for n in spec["stages"] if n.startswith("teachers_")]:
        if name.removeprefix("teachers_") not in raw["students"]:
            del spec["stages"][name]
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copytree(REPO / "teachers", root / "teachers")  # the teacher stage's dep (imported teachers' files)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    return root


@dataclass(frozen=True)
class Chain:
    """One clean `dvc repro` of the spelled-out tiny params (3 students): its repo (read-only: copy it to
    change anything), the repro's log and its wall time."""

    root: Path
    log: str
    seconds: float


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """The full chain, run once for the module: the tests that read a clean run share it."""
    root = _new_repo(tmp_path_factory.mktemp("chain") / "repo", spelled_out_tiny_params())
    t0 = time.perf_counter()
    log = _run([sys.executable, "-m", "dvc", "repro"], root)
    return Chain(root, log, time.perf_counter() - t0)


@pytest.fixture
def repo(chain: Chain, tmp_path: Path) -> Path:
    """A copy of the clean chain's repo (outputs, dvc.lock and DVC cache included) that a test may change."""
    root = tmp_path / "repo"
    shutil.copytree(chain.root, root, symlinks=True)
    return root


def _stages_to_run(repo: Path) -> set[str]:
    out = _run([sys.executable, "-m", "dvc", "status", "--json"], repo)
    return set(json.loads(out[out.index("{") :]))


def test_dvc_repro_runs_the_chain_then_nothing(chain: Chain, repo: Path) -> None:
    log = chain.log
    for stage in ("prepare", "teacher", "export_teacher", "train@1", "export@3", "ensemble", "report", "compare@3"):
        assert f"Running stage '{stage}'" in log
    acc = read_ensemble_metrics(repo / "metrics/ensemble")["accuracy"]
    assert set(acc) >= {"gen0", "gen1", "gen2", "gen3", "ens2", "ens3"}
    report = (repo / "reports/report.md").read_text()
    assert "| Teacher | BAN-1 | BAN-2 | BAN-3 | Ens*2 | Ens*3 |" in report
    for g in range(4):
        assert (repo / f"cache/gen-{g}/complete/zarr.json").exists()
    # Right after, nothing is out of date and a second repro runs nothing.
    assert _stages_to_run(repo) == set()
    assert "Running stage" not in _run([sys.executable, "-m", "dvc", "repro"], repo)

    # An experiment on generation 2's temperature (a key params.yaml spells out) reruns generation 2 and
    # what depends on it, nothing before.
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "chain"], repo)
    log = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "students.2.temperature=2"], repo)
    ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
    students = {f"{stage}@{k}" for stage in ("train", "export", "inspect") for k in (2, 3)}
    # control@2 declares students.2 (its seed and arch): with controls off it rewrites the same one-line file.
    # teachers_2 declares students.2 and teachers_3 depends on cache/gen-2: both rewrite their records.
    rest = {"ensemble", "report", "compare@1", "compare@2", "compare@3", "control@2", "teachers_2", "teachers_3"}
    assert ran == students | rest
    assert yaml.safe_load((repo / "params.yaml").read_text())["students"]["2"]["temperature"] == 2
    assert load_checkpoint(repo / "models/gen-2/model.pt")["meta"]["temperature"] == 2.0
    assert load_checkpoint(repo / "models/gen-1/model.pt")["meta"]["temperature"] == 1.0

    # With an experiment to show: the README's `dvc exp show` recipe, run exactly as written, fits 120
    # columns with no cell elided and shows the changed param and Ens*3; the filter that crashed on the
    # params key `controls` (also the controls/ folder) runs too.
    out = _run([sys.executable, "-m", *readme_exp_show()], repo, COLUMNS="120")
    lines = out.rstrip("\n").splitlines()
    assert max(map(len, lines)) <= 120 and "…" not in out, out
    assert "students.2.temperature" in out and "ens3.json:test_acc" in out, out
    _run([sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", ".*test_acc"], repo)

    # Share the results through a DVC remote (a local folder); a fresh clone pulls them and has nothing to run.
    remote = repo.parent / "remote"
    _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "temperature 2, remote"], repo)
    _run([sys.executable, "-m", "dvc", "push"], repo)
    clone = repo.parent / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], repo.parent)
    assert not (clone / "models/gen-3/model.pt").exists()
    _run([sys.executable, "-m", "dvc", "pull"], clone)
    for rel in ("models/gen-3/model.pt", "cache/gen-3/complete/zarr.json", "data/dataset.h5"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert _stages_to_run(clone) == set()


def readme_exp_show() -> list[str]:
    """The README's `dvc exp show` recipe (section "DVC tables") as an argv."""
    line = next(ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("dvc exp show "))
    return shlex.split(line)


def test_dvc_metrics_show_fits_200_columns(chain: Chain) -> None:
    """One name per quantity across the metrics files (README "DVC tables"): at the default chain's shape (3
    students) the 19 files share 12 columns, and the machine records (one-item lists) add none."""
    out = _run([sys.executable, "-m", "dvc", "metrics", "show"], chain.root)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert max(map(len, lines)) <= 200, out
    header = lines[0].split()
    assert header[0] == "Path" and "test_acc" in header and len(lines) == 1 + 4 + 8 + 4 + 3, out
    assert not any(h.startswith(("machine", "test.", "accuracy.")) for h in header), header


def test_killed_dvc_repro_then_repro_equals_clean_run(chain: Chain, tmp_path: Path) -> None:
    """The victim runs the clean chain's params from scratch, is killed in the students' stages, and a
    rerun ends identical to the clean chain."""
    import random
    import signal

    clean, total = chain.root, chain.seconds
    victim = _new_repo(tmp_path / "victim", spelled_out_tiny_params())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("OMP_NUM_THREADS", "1")  # as `_run` ran the clean chain: same threads, same floats
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=victim,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.perf_counter() + 2 * total
    while not (victim / "cache/gen-0/complete/zarr.json").exists() and time.perf_counter() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(2).uniform(0.0, 2.0))  # somewhere in the students' stages
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage it is running
    assert proc.wait() < 0, "the kill must land while dvc repro runs"
    _run([sys.executable, "-m", "dvc", "repro"], victim)
    for rel in ("metrics/ensemble/ens3.json", "reports/report.md"):
        assert (victim / rel).read_text() == (clean / rel).read_text(), rel

    # Every cached output (models, stores) is bit-identical; plots carry wall-clock seconds, so skip them.
    def outs(root: Path) -> dict[str, str]:
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        return {
            o["path"]: o["md5"]
            for st in lock.values()
            for o in st.get("outs", [])
            if o["path"].startswith(("models/", "cache/", "metrics/"))
        }

    assert outs(victim) == outs(clean) and len(outs(clean)) >= 6
    assert _stages_to_run(victim) == set()


def test_dvc_repro_two_generation_image_chain(tmp_path: Path) -> None:
    """A tiny image subset (npz arrays in the shared CIFAR copy's format) through the real dvc repro."""
    import numpy as np

    rng = np.random.default_rng(0)
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    classes = np.array(["airplane", "automobile", "bird"])
    for split, n in (("train", 60), ("test", 30)):
        y = np.arange(n) % 3
        x = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        x[..., 0] = np.where(y[:, None, None] == 0, 255, x[..., 0])  # a learnable cue for class 0
        np.savez(raw_dir / f"{split}.npz", x=x, y=y.astype(np.int64), classes=classes)
    raw = tiny_params()
    raw["data"] = {"dataset": "npz", "root": str(raw_dir), "n_train": 45, "val_fraction": 0.2}
    raw["train"].update({"arch": "cnn3", "epochs": 2, "batch_size": 16})
    raw["students"] = {"1": {"teacher": 0, "loss": "ban"}}
    raw["train_controls"] = True  # dvc repro also trains control-1 and the report pairs it with BAN-1
    root = _new_repo(tmp_path / "repo", raw)
    _run([sys.executable, "-m", "dvc", "repro"], root)
    acc = read_ensemble_metrics(root / "metrics/ensemble")["accuracy"]
    assert set(acc) == {"gen0", "gen1"}
    from pipeline.cache.store import LogitStore

    attrs = LogitStore.open(root / "cache/gen-1").attrs
    assert attrs["splits"] == {"train": 45, "test": 30} and attrs["class_names"] == list(classes)
    report = (root / "reports/report.md").read_text()
    assert "| Teacher | BAN-1 |" in report and "Paired table" in report and "1 seed, 30 test rows" in report
    assert (root / "controls/gen-1/test_logits.npy").exists() and (root / "controls/gen-1/model.pt").exists()


def test_dvc_repro_chain_on_images_kept_on_disk(tmp_path: Path) -> None:
    """An ImageFolder of JPEG and PNG files of mixed sizes kept on disk (data.storage: files): prepare
    indexes it, the teacher trains on RandomResizedCrops decoded in a worker, the export stores resized-crop
    views, the student replays them (view_policy random); inspect, the ensemble and the report run too."""
    import h5py

    from pipeline.cache.store import LogitStore
    from tests.test_files_dataset import make_folder

    make_folder(tmp_path / "imgs", {"train": 8, "test": 4})
    raw = tiny_params()
    raw["data"] = {"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "storage": "files", "size": 16}
    raw["train"].update({"arch": "cnn3", "epochs": 2, "batch_size": 8, "crop": "resized", "num_workers": 1})
    raw["export"].update({"views": 2, "chunk_rows": 8})
    raw["students"] = {"1": {"teacher": 0, "loss": "ban", "view_policy": "random"}}
    root = _new_repo(tmp_path / "repo", raw)
    _run([sys.executable, "-m", "dvc", "repro"], root)
    with h5py.File(root / "data/dataset.h5") as f:
        assert "files_train" in f and not any(k.startswith("x_") for k in f)
    attrs = LogitStore.open(root / "cache/gen-0").attrs
    assert attrs["augmentation"]["kind"] == "resized-crop+flip" and attrs["splits"] == {"train": 24, "test": 12}
    assert load_checkpoint(root / "models/gen-1/model.pt")["meta"]["recipe"]["crop"] == "resized"
    assert set(read_ensemble_metrics(root / "metrics/ensemble")["accuracy"]) == {"gen0", "gen1"}
    assert (root / "inspect/gen-0/summary.md").exists() and (root / "reports/report.md").exists()


def test_dvc_repro_student_from_an_imported_teacher(tmp_path: Path) -> None:
    """Generation 0 imported from a torchvision resnet18 state_dict under teachers/ (gen0.source), not
    trained; a student trains from its store through the real dvc repro, the report names the teacher, and
    a changed weights file reruns the import and what follows."""
    import numpy as np
    import torch
    import torchvision

    from pipeline.cache.store import LogitStore
    from tests.test_foreign_teacher import TRANSFORM, image_params, write_npz

    raw = image_params(
        write_npz(tmp_path / "raw"),
        {"kind": "torchvision", "arch": "resnet18", "weights": "teachers/resnet18.pt", "transform": TRANSFORM},
    )
    root = _new_repo(tmp_path / "repo", raw)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), root / "teachers/resnet18.pt")
    log = _run([sys.executable, "-m", "dvc", "repro"], root)
    assert "Running stage 'teacher'" in log and "Running stage 'train@1'" in log
    label = json.loads((root / "metrics/train/gen-0.json").read_text())["imported"]
    assert label.startswith("imported: resnet18 (sha256 ")
    assert LogitStore.open(root / "cache/gen-0").attrs["source"]["arch"] == "resnet18"
    student = load_checkpoint(root / "models/gen-1/model.pt")["meta"]
    teacher_sha = LogitStore.open(root / "cache/gen-0").attrs["checkpoint_sha256"]
    assert student["teacher_store_checkpoint_sha256"] == teacher_sha
    assert np.isfinite(json.loads((root / "metrics/ensemble/gen1.json").read_text())["test_acc"])
    assert f"{label} -> cnn3" in (root / "reports/report.md").read_text()
    assert _stages_to_run(root) == set()

    torch.manual_seed(1)  # other weights in the same file: the import reruns, then the export after it
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), root / "teachers/resnet18.pt")
    assert _stages_to_run(root) == {"teacher"}
    _run([sys.executable, "-m", "dvc", "repro", "--single-item", "teacher"], root)
    assert "export_teacher" in _stages_to_run(root)


def _ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_label_trained_members_and_an_ensemble_student(tmp_path: Path) -> None:
    """Generations 1 and 2 train from labels (teacher null, their own seeds), generation 3 from the ensemble
    [0, 1, 2]; a changed member (generation 1's seed) reruns that member, its export and the ensemble
    student, not the other members; `dvc exp run -S students.3.teacher=[0,2]` drops member 1."""
    raw = spelled_out_tiny_params()
    base = raw["students"]["1"]
    raw["students"] = {
        "1": {**base, "teacher": None, "loss": "ce"},
        "2": {**base, "teacher": None, "loss": "ce"},
        "3": {**base, "teacher": [0, 1, 2], "loss": "ban", "temperature": 2.0},
    }
    root = _new_repo(tmp_path / "repo", raw)
    log = _run([sys.executable, "-m", "dvc", "repro"], root, timeout=1800)  # 25 stages: 7 min on a busy 2-core box
    assert {"train@1", "train@2", "train@3", "compare@3", "ensemble", "report"} <= _ran(log)
    meta = load_checkpoint(root / "models/gen-3/model.pt")["meta"]
    assert meta["teacher"] == [0, 1, 2] and len(meta["teacher_store_checkpoint_sha256"]) == 3
    assert load_checkpoint(root / "models/gen-2/model.pt")["meta"]["seed"] == 2  # train.seed + K
    assert "# Generation 3 against ensemble 0+1+2" in (root / "inspect/gen-3-vs-teacher/summary.md").read_text()
    assert _stages_to_run(root) == set()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert [d["path"] for d in lock["train@3"]["deps"]] == ["data/dataset.h5", "members/gen-3.json"]

    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "chain"], root)
    raw["students"]["1"]["seed"] = 77
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ran = _ran(_run([sys.executable, "-m", "dvc", "repro"], root))
    assert {"train@1", "export@1", "train@3", "export@3"} <= ran
    assert not ran & {"teacher", "export_teacher", "train@2", "export@2"}  # the other members stay
    assert load_checkpoint(root / "models/gen-1/model.pt")["meta"]["seed"] == 77

    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "seed 77"], root)
    ran = _ran(_run([sys.executable, "-m", "dvc", "exp", "run", "-S", "students.3.teacher=[0,2]"], root))
    assert {"teachers_3", "train@3", "export@3"} <= ran and not ran & {"train@1", "train@2"}
    assert load_checkpoint(root / "models/gen-3/model.pt")["meta"]["teacher"] == [0, 2]
