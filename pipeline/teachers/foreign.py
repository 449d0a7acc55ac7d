"""Teachers bancache did not train (issue 21): a torchvision architecture or an importable `module:factory`
with a state_dict file, a TorchScript file or a `torch.export` file, each seeing the dataset's images its
own way (resize, centre crop, normalisation: `TransformParams`).

`import_teacher` reads the file (state_dict files with `torch.load(weights_only=True)` only: a file that
needs a full unpickle is refused, never loaded otherwise), builds the model, checks on one batch that its
transform fits the data and that it outputs the data's class count, and writes generation 0's checkpoint
as an *import record* (`IMPORT_FORMAT`): the file's bytes, their sha256, the source (kind, arch or factory,
file, transform) and the dataset's fingerprint. The export reads that record (`model_from_import`) as it
reads a trained generation's checkpoint, so the store, its layouts and views, and the students that learn
from it are the same as for a trained generation 0; the store's `arch` reads "imported: resnet18 (sha256
abcd1234abcd...)" and its attribute `source` holds the record.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import CheckpointError, ParamsError
from pipeline.data.prepared import PreparedData
from pipeline.models.checkpoint import IMPORT_FORMAT, save_atomic
from pipeline.params import SourceParams

TRANSFORM_ORDER = "resize (bilinear, antialiased, shorter side), centre crop, scale to [0, 1], normalise"


def source_record(source: SourceParams, sha256: str) -> dict[str, Any]:
    """What the import checkpoint and the store record of the teacher: where it came from and how it sees
    the images (JSON values only)."""
    t = source.transform
    return {
        "kind": source.kind,
        "arch": source.arch,
        "factory": source.factory,
        "kwargs": dict(source.kwargs),
        "weights": source.weights,
        "sha256": sha256,
        "transform": {
            "resize": t.resize,
            "crop": t.crop,
            "mean": list(t.mean) if t.mean is not None else None,
            "std": list(t.std) if t.std is not None else None,
            "order": TRANSFORM_ORDER,
        },
    }


def teacher_label(record: Mapping[str, Any]) -> str:
    """The imported teacher's name in stores, reports and inspect summaries."""
    name = record["arch"] or record["factory"] or f"{record['kind']} {Path(record['weights']).name}"
    return f"imported: {name} (sha256 {record['sha256'][:12]}...)"


def transform_input(x: torch.Tensor, transform: Mapping[str, Any]) -> torch.Tensor:
    """The teacher's float input from a batch of dataset rows: for uint8 images (B, C, H, W) resize, centre
    crop and scale to [0, 1] (torchvision's tensor kernels, deterministic); then normalise per channel."""
    from torchvision.transforms.v2 import functional as tvf

    if transform["resize"] is not None:
        x = tvf.resize(x, [transform["resize"]], antialias=True)
    if transform["crop"] is not None:
        x = tvf.center_crop(x, [transform["crop"], transform["crop"]])
    x = tvf.to_dtype(x, torch.float32, scale=True) if x.dtype == torch.uint8 else x.float()
    if transform["mean"] is not None:  # the arithmetic of torchvision's normalize, for any input rank
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.tensor(transform["mean"], device=x.device).view(shape)
        x = (x - mean) / torch.tensor(transform["std"], device=x.device).view(shape)
    return x


class TransformedInput(nn.Module):
    """An imported network behind its own input transform. A `torch.export` program keeps the mode it
    was exported in (it has no train/eval switch), so `train()` leaves it alone (`fixed_mode`)."""

    def __init__(self, net: nn.Module, transform: Mapping[str, Any], fixed_mode: bool = False) -> None:
        super().__init__()
        self.net = net
        self.transform = dict(transform)
        self.fixed_mode = fixed_mode

    def train(self, mode: bool = True) -> TransformedInput:
        self.training = mode
        if not self.fixed_mode:
            self.net.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(transform_input(x, self.transform))


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def read_state_dict(payload: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a `torch.save` file, loaded with weights_only=True; a file that needs a full
    unpickle (a pickled model object, custom classes) is refused, naming what it holds."""
    try:
        sd = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)} object" if found else "pickled Python objects"
        raise CheckpointError(
            f"{path}: refused: it holds {what}, which torch.load(weights_only=True) will not run; only "
            "state_dict/tensor files are accepted. Save the weights with torch.save(model.state_dict(), path)"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch.save state_dict file ({_one_line(e, 120)})") from e
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(
            f"{path}: holds a {type(sd).__name__}, not a state_dict (a mapping of parameter names to tensors); "
            "save the weights with torch.save(model.state_dict(), path)"
        )
    return dict(sd)


def _factory(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ParamsError(
            f"gen0.source.factory = {spec!r}: cannot import it ({_one_line(e, 120)}); install the module or put "
            "its folder on PYTHONPATH"
        ) from e
    if not callable(fn):
        raise ParamsError(f"gen0.source.factory = {spec!r}: {attr} is a {type(fn).__name__}, not a function")
    return fn


def _build(record: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The untrained network of a torchvision or factory source, called with the source's kwargs (torchvision:
    num_classes defaults to the data's)."""
    kwargs = dict(record["kwargs"])
    try:
        if record["kind"] == "torchvision":
            from torchvision.models import get_model

            return get_model(record["arch"], **{"num_classes": num_classes, **kwargs})
        net = _factory(record["factory"])(**kwargs)
    except ParamsError:
        raise
    except Exception as e:
        name = record["arch"] or record["factory"]
        raise ParamsError(f"gen0.source: building {name}(**{kwargs}) failed ({_one_line(e, 160)})") from e
    if not isinstance(net, nn.Module):
        raise ParamsError(f"gen0.source.factory = {record['factory']!r}: returned a {type(net).__name__}, not a module")
    return net


def load_weights(net: nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str, num_classes: int) -> None:
    """Load `sd` into `net` (strict); a layer whose size differs where the model has the data's class count
    is refused as a class-count mismatch, any other misfit naming torch's reason."""
    own = net.state_dict()
    for key, value in own.items():
        theirs = tuple(sd[key].shape) if key in sd else tuple(value.shape)
        classes = [t for t, o in zip(theirs, value.shape, strict=False) if t != o and o == num_classes]
        if len(theirs) == value.ndim and classes:
            raise CheckpointError(
                f"{path}: the weights are for {classes[0]} classes ({key} has shape {list(theirs)}), the data has "
                f"{num_classes}; use weights trained for these {num_classes} classes"
            )
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit {name} ({_one_line(e)})") from e


def _read_program(kind: str, payload: bytes, path: Path) -> nn.Module:
    """The module of a TorchScript (`torch.jit.load`) or `torch.export` (`torch.export.load`) file."""
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():  # torch.jit's deprecation notice is not the user's concern here
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(io.BytesIO(payload), map_location="cpu")  # type: ignore[no-any-return]
        return torch.export.load(io.BytesIO(payload)).module()
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable {kind} file ({_one_line(e, 160)})") from e


def build_teacher(record: Mapping[str, Any], payload: bytes, path: Path, num_classes: int) -> TransformedInput:
    """The imported teacher (eval mode, on the CPU) behind its input transform, from the file's bytes."""
    kind = record["kind"]
    if kind in ("torchvision", "factory"):
        net = _build(record, num_classes)
        load_weights(net, read_state_dict(payload, path), path, record["arch"] or record["factory"], num_classes)
    else:
        net = _read_program(kind, payload, path)
    return TransformedInput(net, record["transform"], fixed_mode=kind == "export").eval()


@torch.no_grad()
def check_teacher(model: nn.Module, data: PreparedData, path: Path, kind: str) -> None:
    """One batch of two train rows through the teacher: it must run on the transformed images and give one
    logit per class of the data."""
    x = torch.from_numpy(np.ascontiguousarray(data.x_train[:2]))
    hint = "; export it with a dynamic batch dimension (dynamic_shapes)" if kind == "export" else ""
    try:
        out = model(x)
    except Exception as e:
        raise CheckpointError(
            f"{path}: the teacher fails on a batch of dataset rows {tuple(x.shape)} {x.dtype} after its transform "
            f"({_one_line(e, 200)}){hint}"
        ) from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != data.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(
            f"{path}: the teacher outputs {shape} for 2 rows; the data has {data.num_classes} classes "
            f"({data.name}): it must return (rows, {data.num_classes}) logits"
        )


def _check_transform(source: SourceParams, data: PreparedData) -> None:
    t, shape = source.transform, data.x_train.shape
    if (t.resize is not None or t.crop is not None) and len(shape) != 4:
        raise ParamsError(
            f"gen0.source.transform: resize and crop need images (N, C, H, W); dataset {data.name!r} has inputs of "
            f"shape {shape[1:]}. Remove them"
        )
    size = t.resize if t.resize is not None else min(shape[2:]) if len(shape) == 4 else None
    if t.crop is not None and size is not None and t.crop > size:
        raise ParamsError(f"gen0.source.transform.crop = {t.crop}: larger than the image it crops ({size} px)")
    if t.mean is not None and len(t.mean) != shape[1]:
        raise ParamsError(
            f"gen0.source.transform.mean: {len(t.mean)} values for inputs of {shape[1]} channels; one per channel"
        )


def import_teacher(
    source: SourceParams, weights: Path, data: PreparedData, out: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """Check the teacher in `weights` against `data` and write `out`, generation 0's import record; returns
    the teacher (eval mode, CPU) and its source record."""
    if not weights.is_file():
        raise ParamsError(
            f"gen0.source.weights = {source.weights!r}: no such file ({weights}); put the teacher's file there"
        )
    _check_transform(source, data)
    payload = weights.read_bytes()
    record = source_record(source, hashlib.sha256(payload).hexdigest())
    model = build_teacher(record, payload, weights, data.num_classes)
    check_teacher(model, data, weights, source.kind)
    meta = {
        "generation": 0,
        "arch": teacher_label(record),
        "input_shape": list(data.x_train.shape[1:]),
        "num_classes": data.num_classes,
        "seed": None,
        "teacher": None,
        "loss": None,
        "dataset_fingerprint": data.fingerprint,
    }
    blob = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    save_atomic(out, {"format": IMPORT_FORMAT, "source": record, "meta": meta, "payload": blob})
    return model, record


def model_from_import(ckpt: Mapping[str, Any], path: Path) -> nn.Module:
    """The teacher of an import record (`import_teacher`), its file's bytes checked against the recorded
    sha256."""
    payload = ckpt["payload"].numpy().tobytes()
    record = ckpt["source"]
    if hashlib.sha256(payload).hexdigest() != record["sha256"]:
        raise CheckpointError(
            f"{path}: the imported teacher's bytes differ from their recorded sha256; rerun `bancache train --gen 0`"
        )
    return build_teacher(record, payload, path, int(ckpt["meta"]["num_classes"]))
