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

import torch

from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.data import PreparedData
from pipeline.distributed import SINGLE_PROCESS, DistContext, barrier, broadcast, partition_rows
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
    ctx: DistContext = SINGLE_PROCESS,
) -> dict[str, Any]:
    """Write `out` (a complete store) from `checkpoint`; returns the store's attributes.

    Under torchrun each rank writes its own whole chunks (`partition_rows`); rank 0 creates the store
    first and seals it after a barrier."""
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
    tmp = None
    if ctx.is_main:
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp = Path(broadcast(ctx, str(tmp)))
    rows = {"train": len(data.y_train), "test": len(data.y_test)}
    try:
        if ctx.is_main:  # rank 0 alone creates the store and its attributes
            store = LogitStore.create(
                tmp, rows, data.num_classes, views=1, dtype=params.dtype, chunk_rows=params.chunk_rows,
                attributes=attributes,
            )  # fmt: skip
        barrier(ctx)
        if not ctx.is_main:
            store = LogitStore.attach(tmp)
        for split, n in rows.items():
            x, _ = data.split(split)
            begin, end = partition_rows(n, params.chunk_rows, ctx.world_size)[ctx.rank]
            # One whole chunk at a time, each written once, by one rank.
            for start in range(begin, end, params.chunk_rows):
                chunk = x[start : min(start + params.chunk_rows, end)]
                store.write(split, start, predict_logits(model, chunk, params.batch_size, device))
        barrier(ctx)
        if ctx.is_main:  # validation and the marker come after every rank's rows
            marker = store.seal()
            replace_dir(tmp, out, discard_first=MARKER)
            log.info("exported generation %s to %s: %s", meta["generation"], out, marker["rows"])
        barrier(ctx)
    except OSError as e:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise DiskFullError(
                f"{out}: no space left on the device while exporting; free space under {out.parent} and rerun "
                f"`bancache export-logits`. The previous store at {out}, if any, is untouched"
            ) from e
        raise
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LogitStore.open(out).attrs
