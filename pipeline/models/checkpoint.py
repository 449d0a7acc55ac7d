"""Checkpoints: a dict with a format tag, the model's state_dict and its provenance, written atomically
and loaded with weights_only=True (no pickled code runs)."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import CheckpointError
from pipeline.core.files import atomic_path
from pipeline.core.machine import KEY as MACHINE
from pipeline.core.machine import machine
from pipeline.models.registry import build_model

FORMAT = "bancache-checkpoint-v1"
# generation 0 imported from a file bancache did not write (`pipeline.teachers.foreign`): that file's bytes,
# its sha256 and how to build the model from it; only the export reads it
IMPORT_FORMAT = "bancache-import-v1"
REQUIRED_META = ("arch", "input_shape", "num_classes", "generation", "seed", "dataset_fingerprint")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any], **extra: Any) -> None:
    """Write {format, state_dict, meta, **extra} to `path` via a temp file and rename; meta gains
    "machine", the record of the machine that saved it (`pipeline.core.machine`)."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic(path, {"format": FORMAT, "state_dict": state, "meta": {**meta, MACHINE: machine()}, **extra})


def save_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """torch.save `obj` to `path` atomically. It is serialized in memory and written by Python, so a full
    disk is an OSError (ENOSPC, turned into DiskFullError by `atomic_path`), not torch's RuntimeError."""
    buf = io.BytesIO()  # a file object (not a path) keeps the zip's inner names fixed: equal weights, equal bytes
    torch.save(obj, buf)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


def load_checkpoint(path: str | os.PathLike[str], imported: bool = False) -> dict[str, Any]:
    """Load and check a bancache checkpoint; every failure is a CheckpointError naming the file. With
    `imported`, an imported teacher's checkpoint (`IMPORT_FORMAT`) is returned too (the export's case)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found. Run `bancache train` for this generation first")
    if not zipfile.is_zipfile(p):  # torch.save's archive ends with its directory: a cut file has none
        raise CheckpointError(
            f"{p}: truncated or not a bancache checkpoint (not a complete zip archive, {p.stat().st_size} bytes); "
            "retrain or restore it"
        )
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{p}: refused: the file carries objects that only a full unpickle could load "
            f"(weights_only=True). Only bancache checkpoints are accepted ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # truncated zip, random bytes, ...: torch's reason alone reads like a system fault
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else "unreadable"  # torch appends a paragraph
        raise CheckpointError(
            f"{p}: truncated or not a bancache checkpoint ({type(e).__name__}: {reason}); retrain or restore it"
        ) from e
    if isinstance(ckpt, dict) and ckpt.get("format") == IMPORT_FORMAT:
        if imported:
            return ckpt
        raise CheckpointError(
            f"{p}: holds an imported teacher ({ckpt.get('meta', {}).get('arch')}), not a network bancache "
            "trained; only `bancache export-logits` reads it (its logits are in the generation's store)"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a bancache checkpoint (no '{FORMAT}' tag); retrain it with `bancache train`")
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
        raise CheckpointError(f"{p}: checkpoint metadata is incomplete; retrain it with `bancache train`")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str] = "<checkpoint>") -> nn.Module:
    """The network a loaded checkpoint describes (its recorded arch, input shape and classes) with its
    weights; `path` only names the file in errors."""
    meta = ckpt["meta"]
    model = build_model(meta["arch"], tuple(meta["input_shape"]), int(meta["num_classes"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not fit architecture {meta['arch']!r} ({e})") from e
    return model
