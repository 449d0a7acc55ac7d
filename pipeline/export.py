"""Export a generation's logits over the whole train set and the test set into a logit store.

The model runs in eval mode under no_grad. View 0 of every row is the un-augmented input; with
`views` = V > 1 (uint8 images only) views 1..V-1 are crops and flips drawn per (row, view) from a seeded
generator (`pipeline.augment.view_params`) and stored beside the logits, so the student can replay the
exact image each cached output was computed on (FKD, Shen & Xing 2021; Beyer et al. 2022). The logits are
stored whole ("dense"), as their k largest entries ("topk"), or as the class counts of draws from the
teacher distribution ("sampled", Anshumann et al. 2025). Rows go into a fresh temporary store beside the
target; the store is validated and sealed (completion marker last), then renamed into place,
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

from pipeline.augment import PAD, apply_params, mix64, view_params
from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.data import PreparedData
from pipeline.distributed import SINGLE_PROCESS, DistContext, barrier, broadcast, partition_rows
from pipeline.errors import CheckpointError, DiskFullError, ParamsError
from pipeline.evaluate import predict_logits
from pipeline.io import replace_dir, sha256_file
from pipeline.params import ExportParams
from pipeline.store import MARKER, LogitStore, index_dtype

log = logging.getLogger(__name__)

SPLIT_IDS = {"train": 0, "test": 1}  # keys of the per-(split, row, view) seeds


def store_layout(data: PreparedData, params: ExportParams) -> dict[str, Any]:
    """`LogitStore.create` keywords for these params (views, layout, slots, augmentation recipe), or a
    ParamsError naming the setting that does not fit the dataset."""
    images = (
        data.x_train.ndim == 4 and data.x_train.dtype == np.uint8 and data.x_train.shape[2] == data.x_train.shape[3]
    )
    if params.views > 1 and not images:
        raise ParamsError(
            f"export.views = {params.views}: augmented views need square uint8 images (N, C, H, H); dataset "
            f"{data.name!r} has {data.x_train.dtype} inputs of shape {data.x_train.shape[1:]}. Set export.views: 1"
        )
    c = data.num_classes
    if params.layout == "topk" and params.topk > c:
        raise ParamsError(f"export.topk = {params.topk}: the dataset has only {c} classes; use 1..{c}")
    slots = {"dense": c, "topk": params.topk, "sampled": min(params.samples, c)}[params.layout]
    augmentation = None
    if params.views > 1:
        augmentation = {
            "kind": "crop+flip",
            "pad": PAD,
            "size": int(data.x_train.shape[-1]),
            "seed": params.seed,
            "view0": "clean",
            "seeding": "mix64(seed, split_id, row, view)",
            "split_ids": SPLIT_IDS,
        }
    return {"views": params.views, "layout": params.layout, "slots": slots, "augmentation": augmentation}


def _encode(
    logits: torch.Tensor, params: ExportParams, slots: int, generator: torch.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(values, sparse arrays) of float32 logits (B, V, C) in the store's layout."""
    if params.layout == "dense":
        return logits.numpy(), {}
    b, v, c = logits.shape
    p = torch.softmax(logits.double(), dim=-1).reshape(b * v, c)  # T = 1
    if params.layout == "topk":
        values, idx = logits.reshape(b * v, c).topk(slots, dim=-1)
    else:  # sampled: class counts of `samples` draws with replacement, the most drawn classes first
        draws = torch.multinomial(p, params.samples, replacement=True, generator=generator)
        counts = torch.zeros(b * v, c, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.float64)
        )
        values, idx = counts.topk(slots, dim=-1)  # at most `slots` distinct classes are drawn
    mass = (p.gather(1, idx) * (values > 0 if params.layout == "sampled" else 1)).sum(dim=-1)
    dtype = index_dtype(c)
    return values.reshape(b, v, slots).numpy(), {
        "idx": idx.reshape(b, v, slots).numpy().astype(dtype),
        "mass": mass.reshape(b, v).numpy().astype(np.float32),
    }


def export_chunk(
    model: torch.nn.Module,
    x: np.ndarray,
    split: str,
    start: int,
    params: ExportParams,
    layout: dict[str, Any],
    device: torch.device,
) -> dict[str, np.ndarray]:
    """`LogitStore.write` keywords for rows [start, start + len(x)) of `split`: every view's logits in
    the store's layout, and each view's crop/flip when the store has augmented views."""
    rows = np.arange(start, start + len(x))
    recipe = layout["augmentation"]
    per_view, aug = [], []
    for view in range(params.views):
        xv = x
        if recipe is not None:
            ap = view_params(params.seed, SPLIT_IDS[split], rows, view, recipe["pad"], recipe["size"])
            xv = apply_params(torch.from_numpy(np.ascontiguousarray(x)), ap).numpy()
            aug.append(np.stack([ap.top.numpy(), ap.left.numpy(), ap.flip.numpy()], axis=1))
        per_view.append(predict_logits(model, xv, params.batch_size, device))
    logits = torch.from_numpy(np.stack(per_view, axis=1))  # (B, V, C) float32
    g = torch.Generator().manual_seed(mix64(params.seed, SPLIT_IDS[split], start, 1 << 40))  # chunk-keyed draws
    values, sparse = _encode(logits, params, layout["slots"], g)
    out: dict[str, np.ndarray] = {"logits": values, **sparse}
    if recipe is not None:
        out["aug"] = np.stack(aug, axis=1).astype(np.int16)  # (B, V, 3)
    return out


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
    layout = store_layout(data, params)
    model = model_from_checkpoint(ckpt, checkpoint).to(device)
    attributes = {
        "generation": meta["generation"],
        "arch": meta["arch"],
        "seed": meta["seed"],
        "temperature": 1.0,  # logits are stored raw; soften at read time
        "checkpoint_sha256": sha256_file(checkpoint),
        "dataset_fingerprint": data.fingerprint,
        "dataset": data.name,
        "class_names": data.class_names,
        "teacher": meta.get("teacher"),
        "loss": meta.get("loss"),
        **({"topk_rest": params.topk_rest} if params.layout == "topk" else {}),
        **({"samples": params.samples} if params.layout == "sampled" else {}),
    }
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
                tmp,
                rows,
                data.num_classes,
                dtype=params.dtype,
                chunk_rows=params.chunk_rows,
                attributes=attributes,
                **layout,
            )
        barrier(ctx)
        if not ctx.is_main:
            store = LogitStore.attach(tmp)
        for split, n in rows.items():
            x, _ = data.split(split)
            begin, end = partition_rows(n, params.chunk_rows, ctx.world_size)[ctx.rank]
            # One whole chunk at a time, each written once, by one rank.
            for start in range(begin, end, params.chunk_rows):
                chunk = x[start : min(start + params.chunk_rows, end)]
                store.write(split, start, **export_chunk(model, chunk, split, start, params, layout, device))
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
