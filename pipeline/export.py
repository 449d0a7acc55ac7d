"""Export a generation's logits over the whole train set and the test set into a logit store.

The model runs in eval mode under no_grad on un-augmented inputs. Rows go into a fresh temporary store
beside the target; the store is validated and sealed (completion marker last), then renamed into place,
so the target path only ever holds a complete store or its previous content.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.data import PreparedData
from pipeline.errors import CheckpointError, DiskFullError
from pipeline.io import replace_dir, sha256_file
from pipeline.params import ExportParams
from pipeline.store import MARKER, LogitStore
from pipeline.train import predict_logits

log = logging.getLogger(__name__)


def export_logits(
    checkpoint: Path,
    data: PreparedData,
    out: Path,
    params: ExportParams,
    device: torch.device,
) -> dict[str, Any]:
    """Write `out` (a complete store) from `checkpoint`; returns the store's attributes."""
    ckpt = load_checkpoint(checkpoint)
    meta = ckpt["meta"]
    if meta["dataset_fingerprint"] != data.fingerprint:
        raise CheckpointError(
            f"{checkpoint}: trained on another dataset (fingerprint {meta['dataset_fingerprint'][:12]}..., "
            f"prepared data is {data.fingerprint[:12]}...). Retrain this generation on the prepared data"
        )
    model = model_from_checkpoint(ckpt, checkpoint).to(device)
    attributes = {
        "generation": meta["generation"], "arch": meta["arch"], "seed": meta["seed"],
        "temperature": 1.0,  # logits are stored raw; soften at read time
        "checkpoint_sha256": sha256_file(checkpoint), "dataset_fingerprint": data.fingerprint,
        "dataset": data.name, "class_names": data.class_names, "teacher": meta.get("teacher"),
        "loss": meta.get("loss"),
    }  # fmt: skip
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        store = LogitStore.create(
            tmp, {"train": len(data.y_train), "test": len(data.y_test)}, data.num_classes, views=1,
            dtype=params.dtype, chunk_rows=params.chunk_rows, attributes=attributes,
        )  # fmt: skip
        for split in ("train", "test"):
            x, _ = data.split(split)
            # One chunk of rows at a time, so every chunk is written whole, once.
            for start in range(0, len(x), params.chunk_rows):
                rows = x[start : start + params.chunk_rows]
                store.write(split, start, predict_logits(model, rows, params.batch_size, device))
        marker = store.seal()
        replace_dir(tmp, out, discard_first=MARKER)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise DiskFullError(
                f"{out}: no space left on the device while exporting; free space under {out.parent} and rerun "
                f"`bancache export-logits`. The previous store at {out}, if any, is untouched"
            ) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported generation %s to %s: %s", meta["generation"], out, marker["rows"])
    return LogitStore.open(out).attrs


def store_accuracy(store: LogitStore, split: str, labels: np.ndarray, view: int = 0) -> float:
    """Top-1 accuracy of a store's logits against `labels`, read one chunk at a time."""
    from pipeline.store import iter_blocks

    correct = 0
    for start, block in iter_blocks(store.array(split)):
        correct += int((block[:, view].argmax(-1) == labels[start : start + len(block)]).sum())
    return correct / len(labels)
