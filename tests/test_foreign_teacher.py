"""Teachers bancache did not train (issue 21, acceptance 2): a torchvision architecture's state_dict, a
TorchScript file, a torch.export file and a `module:factory` export to stores whose rows are the model's own
eval-mode forward on the images transformed its way; pickled payloads and class-count mismatches are refused.

The references are computed here, independently of `pipeline.teachers.foreign`: torchvision's v2 transform
classes (Resize, CenterCrop, ToDtype, Normalize) on the prepared uint8 images, one forward of the model in
eval mode, and the float16 store's encoding (each row minus its max, `pipeline.cache.formats`).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import zarr
from torch import nn
from torchvision.transforms import v2

from pipeline.cache.store import LogitStore
from pipeline.core.errors import CheckpointError, ParamsError
from pipeline.core.paths import ProjectPaths
from pipeline.data.augment import apply_params, view_params
from pipeline.data.prepared import load_prepared
from pipeline.models.checkpoint import load_checkpoint
from stages import export, prepare, train
from stages.common import ParamsFile
from tests.conftest import tiny_params

CLASSES = ["airplane", "automobile", "bird"]
TRANSFORM = {"resize": 18, "crop": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def write_npz(folder: Path, n_train: int = 40, n_test: int = 20, size: int = 16) -> Path:
    """A tiny CIFAR-like dataset in the npz layout (x uint8 NHWC, y, classes), with a cue for class 0."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % len(CLASSES)
        x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        x[..., 0] = np.where(y[:, None, None] == 0, 255, x[..., 0])
        np.savez(folder / f"{split}.npz", x=x, y=y.astype(np.int64), classes=np.array(CLASSES))
    return folder


def image_params(raw_dir: Path, source: dict[str, Any] | None = None, **export: Any) -> dict[str, Any]:
    """The tiny config on the npz images (cnn3 students), generation 0 imported from `source`."""
    raw = tiny_params()
    raw["data"] = {"dataset": "npz", "root": str(raw_dir), "val_fraction": 0.2}
    raw["train"].update({"arch": "cnn3", "epochs": 1, "batch_size": 16})
    raw["gen0"] = {"loss": "ce", "source": source}
    raw["students"] = {"1": {"teacher": 0, "loss": "ban"}}
    raw["export"].update({"chunk_rows": 64, "batch_size": 64, **export})  # one batch per split
    return raw


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root with the npz images prepared (read-only: `project` copies the dataset)."""
    root = tmp_path_factory.mktemp("images")
    prepare.run(ParamsFile(image_params(write_npz(root / "raw"))), ProjectPaths(root))
    return root


def project(image_root: Path, tmp_path: Path) -> ProjectPaths:
    lay = ProjectPaths(tmp_path / "p")
    lay.dataset.parent.mkdir(parents=True)
    lay.dataset.write_bytes(ProjectPaths(image_root).dataset.read_bytes())
    lay.teachers.mkdir()
    return lay


def resnet18(num_classes: int = 3) -> nn.Module:
    """torchvision's resnet18 at random init, with BatchNorm statistics that are not the identity."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class TinyNet(nn.Module):
    def __init__(self, classes: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean(dim=(2, 3)))


def tiny_net(classes: int, width: int = 4) -> nn.Module:
    """The `module:factory` of the factory test (`tests.test_foreign_teacher:tiny_net`)."""
    torch.manual_seed(1)
    return TinyNet(classes, width)


def flat_net(inputs: int, classes: int) -> nn.Module:
    """A `module:factory` for MNIST-1D rows (1, inputs): the error cases of tests/test_errors.py."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))


def their_transform(transform: dict[str, Any]) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(transform["resize"], antialias=True),
            v2.CenterCrop(transform["crop"]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(transform["mean"], transform["std"]),
        ]
    )


@torch.no_grad()
def reference_rows(model: nn.Module, x: np.ndarray, dtype: str = "float16") -> np.ndarray:
    """The store rows an export must hold: the model's forward on the transformed images, encoded."""
    z = model(their_transform(TRANSFORM)(torch.from_numpy(x))).float()
    if dtype == "float16":
        z = z - z.amax(dim=-1, keepdim=True)
    return z.numpy().astype(dtype)


def stored(lay: ProjectPaths, split: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(lay.store(0) / split), mode="r")[:, 0])


def import_and_export(lay: ProjectPaths, raw: dict[str, Any]) -> dict[str, Any]:
    metrics = train.run(ParamsFile(raw), lay, 0)
    export.run(ParamsFile(raw), lay, 0)
    return metrics


def test_torchvision_state_dict_exports_the_models_forward(image_root: Path, tmp_path: Path) -> None:
    lay = project(image_root, tmp_path)
    model = resnet18()
    torch.save(model.state_dict(), lay.teachers / "resnet18.pt")
    source = {"kind": "torchvision", "arch": "resnet18", "weights": "teachers/resnet18.pt", "transform": TRANSFORM}
    metrics = import_and_export(lay, image_params(image_root / "raw", source))

    data = load_prepared(lay.dataset)
    for split in ("train", "test"):
        np.testing.assert_array_equal(stored(lay, split), reference_rows(model, data.split(split)[0]))
    sha = hashlib.sha256((lay.teachers / "resnet18.pt").read_bytes()).hexdigest()
    attrs = LogitStore.open(lay.store(0)).attrs
    assert attrs["checkpoint_sha256"] == sha and attrs["source"]["sha256"] == sha
    assert attrs["arch"] == f"imported: resnet18 (sha256 {sha[:12]}...)" == metrics["imported"]
    assert {k: attrs["source"][k] for k in ("kind", "arch", "weights")} == {
        "kind": "torchvision",
        "arch": "resnet18",
        "weights": "teachers/resnet18.pt",
    }
    assert {k: attrs["source"]["transform"][k] for k in TRANSFORM} == TRANSFORM
    assert attrs["generation"] == 0 and attrs["trained_with"]["loss"] is None
    logits = torch.from_numpy(reference_rows(model, data.x_test, "float32"))
    assert metrics["test_acc"] == float((logits.argmax(1).numpy() == data.y_test).mean())
    with pytest.raises(CheckpointError, match="holds an imported teacher .*only `bancache export-logits` reads it"):
        load_checkpoint(lay.model(0))  # what load_model and the other readers of trained checkpoints call


def test_torchscript_file_exports_its_forward_and_views(image_root: Path, tmp_path: Path) -> None:
    """A float32 store with 3 views: view 0 is the clean image, views 1-2 the stored crops and flips, each
    transformed the teacher's way before its forward."""
    lay = project(image_root, tmp_path)
    model = resnet18()
    torch.jit.save(torch.jit.script(model), lay.teachers / "resnet18.ts")
    source = {"kind": "torchscript", "weights": "teachers/resnet18.ts", "transform": TRANSFORM}
    metrics = import_and_export(lay, image_params(image_root / "raw", source, dtype="float32", views=3))

    assert metrics["imported"].startswith("imported: torchscript resnet18.ts (sha256 ")
    x = load_prepared(lay.dataset).x_train
    train_rows = np.asarray(zarr.open_array(str(lay.store(0) / "train"), mode="r")[:])
    for view in range(3):
        ap = view_params(0, 0, np.arange(len(x)), view, 4, x.shape[-1])
        xv = apply_params(torch.from_numpy(x), ap).numpy()
        np.testing.assert_array_equal(train_rows[:, view], reference_rows(model, xv, "float32"))


def test_torch_export_file_exports_its_forward(image_root: Path, tmp_path: Path) -> None:
    lay = project(image_root, tmp_path)
    model = resnet18()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, lay.teachers / "resnet18.pt2")
    source = {"kind": "export", "weights": "teachers/resnet18.pt2", "transform": TRANSFORM}
    import_and_export(lay, image_params(image_root / "raw", source))

    data = load_prepared(lay.dataset)
    for split in ("train", "test"):
        np.testing.assert_array_equal(stored(lay, split), reference_rows(model, data.split(split)[0]))


def test_factory_with_kwargs_exports_its_forward(image_root: Path, tmp_path: Path) -> None:
    lay = project(image_root, tmp_path)
    model = tiny_net(3, width=6).eval()
    torch.save(model.state_dict(), lay.teachers / "tiny.pt")
    source = {
        "kind": "factory",
        "factory": "tests.test_foreign_teacher:tiny_net",
        "kwargs": {"classes": 3, "width": 6},
        "weights": "teachers/tiny.pt",
        "transform": TRANSFORM,
    }
    metrics = import_and_export(lay, image_params(image_root / "raw", source))

    assert metrics["imported"].startswith("imported: tests.test_foreign_teacher:tiny_net (sha256 ")
    data = load_prepared(lay.dataset)
    np.testing.assert_array_equal(stored(lay, "train"), reference_rows(model, data.x_train))


def test_a_pickle_payload_is_refused_in_one_line(image_root: Path, tmp_path: Path) -> None:
    """torch.save(model) pickles the module object: weights_only=True refuses it and so does the import,
    naming the file and the class it would have had to unpickle; nothing is written."""
    lay = project(image_root, tmp_path)
    torch.save(resnet18(), lay.teachers / "model.pt")
    source = {"kind": "torchvision", "arch": "resnet18", "weights": "teachers/model.pt"}
    with pytest.raises(CheckpointError) as e:
        train.run(ParamsFile(image_params(image_root / "raw", source)), lay, 0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{lay.teachers / 'model.pt'}: refused: ")
    assert "pickled torchvision.models.resnet.ResNet object" in msg
    assert "only state_dict/tensor files are accepted" in msg
    assert not lay.model(0).exists()


def test_a_class_count_that_differs_from_the_data_is_refused(image_root: Path, tmp_path: Path) -> None:
    """Read from the final layer (a state_dict for 5 classes, data with 3) and, for a TorchScript file, from
    the output of one batch."""
    lay = project(image_root, tmp_path)
    torch.save(resnet18(num_classes=5).state_dict(), lay.teachers / "r5.pt")
    source = {"kind": "torchvision", "arch": "resnet18", "weights": "teachers/r5.pt"}
    with pytest.raises(CheckpointError, match=r"r5.pt: the weights are for 5 classes \(fc.weight has shape \[5, 512\]"):
        train.run(ParamsFile(image_params(image_root / "raw", source)), lay, 0)
    torch.jit.save(torch.jit.script(tiny_net(5)), lay.teachers / "t5.ts")
    source = {"kind": "torchscript", "weights": "teachers/t5.ts"}
    with pytest.raises(CheckpointError, match=r"t5.ts: the teacher outputs \(2, 5\) for 2 rows; the data has 3"):
        train.run(ParamsFile(image_params(image_root / "raw", source)), lay, 0)
    assert not lay.model(0).exists()


def test_an_import_record_whose_bytes_changed_is_refused_at_export(image_root: Path, tmp_path: Path) -> None:
    lay = project(image_root, tmp_path)
    torch.save(tiny_net(3).state_dict(), lay.teachers / "tiny.pt")
    source = {"kind": "factory", "factory": "tests.test_foreign_teacher:tiny_net", "kwargs": {"classes": 3}}
    raw = image_params(image_root / "raw", {**source, "weights": "teachers/tiny.pt"})
    train.run(ParamsFile(raw), lay, 0)
    ckpt = torch.load(lay.model(0), weights_only=True)
    ckpt["payload"][-1] ^= 1
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    lay.model(0).write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="bytes differ from their recorded sha256; rerun `bancache train"):
        export.run(ParamsFile(raw), lay, 0)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ({"kind": "onnx", "weights": "t.pt"}, "gen0.source.kind = 'onnx': allowed values are torchvision"),
        ({"kind": "torchvision", "weights": "t.pt"}, "gen0.source.arch: required for kind 'torchvision'"),
        ({"kind": "torchvision", "arch": "resnet19", "weights": "t.pt"}, "not a torchvision model name"),
        ({"kind": "torchscript", "arch": "resnet18", "weights": "t.pt"}, "only for kind 'torchvision'; remove it"),
        ({"kind": "factory", "factory": "nets.build", "weights": "t.pt"}, "expected 'module:function'"),
        ({"kind": "export"}, "gen0.source.weights: required"),
        (
            {"kind": "export", "weights": "t.pt", "transform": {"mean": [0.5], "std": [0.2, 0.2]}},
            "mean (0.5,) and std (0.2, 0.2) must be given together, one value per channel",
        ),
        ({"kind": "export", "weights": "t.pt", "transform": {"std": [0, 1], "mean": [0, 0]}}, "must be > 0"),
        ({"kind": "export", "weights": "t.pt", "kwargs": {"a": 1}}, "reads the whole model from its file"),
    ],
)
def test_bad_sources_are_refused_by_params(source: dict[str, Any], needle: str) -> None:
    with pytest.raises(ParamsError) as e:
        ParamsFile(tiny_params(gen0={"loss": "ce", "source": source})).validate()
    assert needle in str(e.value)


def test_a_transform_that_does_not_fit_the_images_is_refused(image_root: Path, tmp_path: Path) -> None:
    lay = project(image_root, tmp_path)
    torch.save(tiny_net(3).state_dict(), lay.teachers / "tiny.pt")
    source = {"kind": "factory", "factory": "tests.test_foreign_teacher:tiny_net", "kwargs": {"classes": 3}}
    for transform, needle in (
        ({"crop": 20}, "gen0.source.transform.crop = 20: larger than the image it crops (16 px)"),
        ({"mean": [0.5], "std": [0.5]}, "gen0.source.transform.mean: 1 values for inputs of 3 channels"),
    ):
        raw = image_params(image_root / "raw", {**source, "weights": "teachers/tiny.pt", "transform": transform})
        with pytest.raises(ParamsError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            train.run(ParamsFile(raw), lay, 0)


def test_the_sweep_refuses_an_imported_teacher(tmp_path: Path) -> None:
    from stages import sweep

    source = {"kind": "torchscript", "weights": "teachers/t.ts"}
    with pytest.raises(ParamsError, match="gen0.source is set: the sweep trains generation 0 per seed"):
        sweep.run(ParamsFile(tiny_params(gen0={"loss": "ce", "source": source})), tmp_path / "out", [0], [])
    assert not (tmp_path / "out").exists()


def test_the_pretrained_config_is_valid() -> None:
    from pipeline.params import parse_source

    params = ParamsFile.load(Path(__file__).resolve().parents[1] / "configs/cifar10-pretrained.yaml")
    params.validate()
    source = parse_source(params.get("gen0"))
    assert source is not None and (source.kind, source.arch) == ("torchvision", "resnet18")
    assert source.weights.startswith("teachers/")


def test_weights_of_another_architecture_are_refused(image_root: Path, tmp_path: Path) -> None:
    lay = project(image_root, tmp_path)
    torch.save(resnet18().state_dict(), lay.teachers / "resnet18.pt")
    source = {"kind": "torchvision", "arch": "resnet34", "weights": "teachers/resnet18.pt"}
    with pytest.raises(CheckpointError) as e:
        train.run(ParamsFile(image_params(image_root / "raw", source)), lay, 0)
    assert "\n" not in str(e.value)
    assert "resnet18.pt: the weights do not fit resnet34 (RuntimeError: Error(s) in loading state_dict" in str(e.value)
    assert "Missing key(s)" in str(e.value)
