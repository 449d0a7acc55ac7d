"""Export a generation's logits over the whole train set and the test set into a logit store.

The model runs in eval mode under no_grad. View 0 of every row is the un-augmented input; with
`views` = V > 1 (uint8 images only) views 1..V-1 are crops and flips drawn per (row, view) from a seeded
generator (`pipeline.data.augment.view_params`) and stored beside the logits, so the student can replay the
exact image each cached output was computed on (FKD, Shen & Xing 2021; Beyer et al. 2022). Only the train
split gets them: the test split is exported with view 0 alone (`TEST_VIEWS`), since nothing reads its
augmented views (evaluation, ensembles and inspect use view 0; no student trains on test rows) and each
would cost one more inference pass over the test rows. The logits are
stored whole ("dense"), as their k largest entries ("topk"), or as the class counts of draws from the
teacher distribution ("sampled", Anshumann et al. 2025): the store format `export.layout` names
(`pipeline.cache.formats`) encodes them, and `store_spec` gathers what the store holds (format, slots,
views per split, augmentation recipe) into one `StoreSpec`. Rows go into a fresh temporary store beside the
target; the store is validated and sealed (completion marker last), then renamed into place,
so the target path only ever holds a complete store or its previous content.

Inference and store writes overlap: the caller's thread runs the model over chunk k+1 while one writer
thread encodes and writes chunk k (`ChunkWriter`, at most `WRITE_AHEAD` chunks waiting, so memory stays
bounded). A writer failure is re-raised in the caller at its next chunk or at the end, before anything is
sealed; the temporary store is then removed. So an export costs about one inference pass plus the last
chunk's write, not inference plus every write.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from pipeline.cache.formats import LAYOUTS, FormatOptions, StoreSpec
from pipeline.cache.store import MARKER, LogitStore
from pipeline.core.distributed import SINGLE_PROCESS, DistContext, barrier, broadcast, partition_rows
from pipeline.core.errors import CheckpointError, DiskFullError, NotWritableError, ParamsError
from pipeline.core.files import replace_dir, sha256_file
from pipeline.data.augment import PAD, RESIZED_KIND, apply_params, mix64, view_params
from pipeline.data.files import BoxRecipe, CropRecipe, ImageFiles, chunk_views
from pipeline.data.prepared import PreparedData
from pipeline.models.checkpoint import IMPORT_FORMAT, load_checkpoint, model_from_checkpoint
from pipeline.models.predict import predict_logits
from pipeline.params import ExportParams
from pipeline.teachers.foreign import model_from_import

log = logging.getLogger(__name__)

SPLIT_IDS = {"train": 0, "test": 1}  # keys of the per-(split, row, view) seeds
TEST_VIEWS = 1  # views exported for the test split: the clean image only
WRITE_AHEAD = 2  # inferred chunks that may wait for the writer thread (memory: 2 chunks of float32 logits)


def format_options(params: ExportParams) -> FormatOptions:
    """The export settings the store formats read, as plain values (the cache part knows no params)."""
    return FormatOptions(topk=params.topk, topk_rest=params.topk_rest, samples=params.samples)


def logit_shift(params: ExportParams) -> str:
    """What was subtracted from each stored row of logits: "row_max" (float16 values that are logits:
    dense, topk) or "none"."""
    return "row_max" if params.dtype == "float16" and LAYOUTS[params.layout].logit_values else "none"


def _resized_recipe(data: PreparedData, params: ExportParams, recipe: dict[str, Any]) -> dict[str, Any]:
    """The augmentation recipe of RandomResizedCrop views of files (the teacher's own train.crop_scale
    and crop_ratio): view v of row r is `seeded_box((seed, split_id, r, v), ...)` of the decoded file."""
    assert isinstance(data.x_train, ImageFiles)
    return {
        "kind": RESIZED_KIND,
        "fields": ["i", "j", "h", "w", "flip"],
        "size": data.x_train.size,
        "scale": list(recipe["crop_scale"]),
        "ratio": list(recipe["crop_ratio"]),
        "resize": "bilinear, antialias (torchvision.transforms.v2.functional.resized_crop on uint8)",
        "seed": params.seed,
        "view0": f"eval: shorter side resized to {data.x_train.eval_resize}, centre crop; stored as (0, 0, 0, 0, 0)",
        "seeding": "mix64(seed, split_id, row, view)",
        "split_ids": SPLIT_IDS,
    }


def store_spec(data: PreparedData, params: ExportParams, recipe: dict[str, Any] | None = None) -> StoreSpec:
    """What the store of these params holds (format, slots, views, views per split, augmentation recipe),
    or a ParamsError naming the setting that does not fit the dataset. `recipe` (the teacher's training
    recipe): on files trained with `train.crop: resized`, views are RandomResizedCrop boxes of the files."""
    images = (
        data.x_train.ndim == 4 and data.x_train.dtype == np.uint8 and data.x_train.shape[2] == data.x_train.shape[3]
    )
    if params.views > 1 and not images:
        raise ParamsError(
            f"export.views = {params.views}: augmented views need square uint8 images (N, C, H, H); dataset "
            f"{data.name!r} has {data.x_train.dtype} inputs of shape {data.x_train.shape[1:]}. Set export.views: 1"
        )
    fmt = LAYOUTS[params.layout]
    slots = fmt.slots(data.num_classes, format_options(params))
    augmentation = None
    if params.views > 1 and isinstance(data.x_train, ImageFiles) and (recipe or {}).get("crop") == "resized":
        augmentation = _resized_recipe(data, params, recipe or {})
    elif params.views > 1:
        augmentation = {
            "kind": "crop+flip",
            "pad": PAD,
            "size": int(data.x_train.shape[-1]),
            "seed": params.seed,
            "view0": "clean",
            "seeding": "mix64(seed, split_id, row, view)",
            "split_ids": SPLIT_IDS,
        }
    return StoreSpec(
        format=fmt,
        slots=slots,
        views=params.views,
        split_views={"train": params.views, "test": TEST_VIEWS},
        augmentation=augmentation,
    )


def infer_chunk(
    model: torch.nn.Module,
    x: np.ndarray,
    split: str,
    start: int,
    params: ExportParams,
    spec: StoreSpec,
    device: torch.device,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """(float32 logits (B, V, C), each view's (top, left, flip) (B, V, 3) or None) of rows
    [start, start + len(x)) of `split`, V its views (`spec.split_views`), on the caller's thread (the
    model's part of a chunk's export). A split with one view is inferred on the clean images as they are."""
    rows = np.arange(start, start + len(x))
    views = spec.split_views[split]
    augmentation = spec.augmentation if views > 1 else None
    if augmentation is not None and augmentation["kind"] == RESIZED_KIND:
        assert isinstance(x, ImageFiles), "resized-crop views are cut from the files"
        boxes, images = chunk_views(x, rows, views, _box_recipe(augmentation, split), params.num_workers)
        per_view = [predict_logits(model, xv, params.batch_size, device) for xv in images]
        return torch.from_numpy(np.stack(per_view, axis=1)), boxes
    if isinstance(x, ImageFiles):  # the evaluation views of the chunk's files
        x = chunk_views(x, rows, 1, None, params.num_workers)[1][0]
    per_view, aug = [], []
    for view in range(views):
        xv = x
        if augmentation is not None:
            ap = view_params(params.seed, SPLIT_IDS[split], rows, view, augmentation["pad"], augmentation["size"])
            xv = apply_params(torch.from_numpy(np.ascontiguousarray(x)), ap).numpy()
            aug.append(np.stack([ap.top.numpy(), ap.left.numpy(), ap.flip.numpy()], axis=1))
        per_view.append(predict_logits(model, xv, params.batch_size, device))
    logits = torch.from_numpy(np.stack(per_view, axis=1))  # (B, V, C) float32
    return logits, (np.stack(aug, axis=1) if augmentation is not None else None)


def _box_recipe(augmentation: dict[str, Any], split: str) -> BoxRecipe:
    """The RandomResizedCrop views' recipe of a store's `augmentation` attribute, for `split`'s rows."""
    crop = CropRecipe(augmentation["size"], tuple(augmentation["scale"]), tuple(augmentation["ratio"]))  # type: ignore[arg-type]
    return BoxRecipe(crop, augmentation["seed"], augmentation["split_ids"][split])


def encode_chunk(
    logits: torch.Tensor,
    aug: np.ndarray | None,
    split: str,
    start: int,
    params: ExportParams,
    spec: StoreSpec,
) -> dict[str, np.ndarray]:
    """`LogitStore.write` keywords from `infer_chunk`'s output (every view's logits encoded by the store's
    format, and each view's crop/flip when the store has augmented views), run on the writer thread."""
    g = torch.Generator().manual_seed(mix64(params.seed, SPLIT_IDS[split], start, 1 << 40))  # chunk-keyed draws
    values, extra = spec.format.encode(logits, params.dtype, spec.slots, format_options(params), g)
    out: dict[str, np.ndarray] = {"logits": values, **extra}
    if aug is not None:
        out["aug"] = aug.astype(np.int32 if aug.shape[-1] == 5 else np.int16)  # (B, V, 3) or resized (B, V, 5)
    return out


def write_provenance(store: LogitStore, data: PreparedData) -> None:
    """Arrays beside the logits: `<split>_labels`, `val_index` (the validation rows of train) and, for a
    subset, `<split>_source_index` (each row's index in the original dataset); attribute `provenance` lists
    them, so `seal` hashes them with the rest. A transfer set's store says which rows carry labels:
    train_labels is -1 (`UNLABELLED`) on the others, and attribute `unlabelled_rows` counts them per split."""
    arrays = {"train_labels": data.y_train, "test_labels": data.y_test, "val_index": data.val_index}
    for split, index in (data.source_index or {}).items():
        arrays[f"{split}_source_index"] = index
    for name, values in arrays.items():
        store.group.create_array(name, data=np.asarray(values, dtype=np.int64))
    store.group.attrs.update({"provenance": sorted(arrays)})
    if data.num_unlabelled:  # absent on a labelled dataset's store, whose attributes stay as they were
        store.group.attrs.update({"unlabelled_rows": {"train": data.num_unlabelled}})


class ChunkWriter:
    """Runs write jobs in order on one background thread, at most `ahead` of them waiting (0: each job
    runs at once in the caller). Use as a context manager: a job's exception is re-raised in the caller at
    the next `submit` or at exit; later jobs are dropped unrun. An exception in the caller stops the
    thread (queued jobs dropped) before it propagates, so the caller can remove what was written."""

    def __init__(self, ahead: int = WRITE_AHEAD) -> None:
        self.ahead = ahead
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(ahead, 1))
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ChunkWriter:
        if self.ahead > 0:
            self._thread = threading.Thread(target=self._run, name="bancache-export-writer", daemon=True)
            self._thread.start()
        return self

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job` (blocks while `ahead` jobs wait); raises the error of an earlier job, if any."""
        self._raise()
        if self._thread is None:
            job()
        else:
            self._jobs.put(job)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop = kind is not None  # the caller failed: drop what is queued
        if self._thread is not None:
            self._jobs.put(None)  # the writer keeps draining, so this never blocks for long
            self._thread.join()
        if kind is None:
            self._raise()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None and not self._stop:
                try:
                    job()
                except BaseException as e:  # handed to the caller's thread, which re-raises it
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _write_rows(
    store: LogitStore,
    model: torch.nn.Module,
    data: PreparedData,
    params: ExportParams,
    spec: StoreSpec,
    device: torch.device,
    ctx: DistContext,
    write_ahead: int,
    on_rows: Callable[[str, int], None] | None = None,
) -> None:
    """Every chunk of this rank's rows of both splits: inference here, encoding and writes on the writer;
    `on_rows(split, n)` after each chunk is handed to the writer (progress display)."""
    with ChunkWriter(write_ahead) as writer:
        for split, n in store.attrs["splits"].items():
            x, _ = data.split(split)
            begin, end = partition_rows(n, params.chunk_rows, ctx.world_size)[ctx.rank]
            # One whole chunk at a time, each written once, by one rank.
            for start in range(begin, end, params.chunk_rows):
                stop = min(start + params.chunk_rows, end)
                chunk = x[np.arange(start, stop)] if isinstance(x, ImageFiles) else x[start:stop]  # files: lazy
                logits, aug = infer_chunk(model, chunk, split, start, params, spec, device)

                def job(split: str = split, start: int = start, logits: torch.Tensor = logits, aug: Any = aug) -> None:
                    store.write(split, start, **encode_chunk(logits, aug, split, start, params, spec))

                writer.submit(job)
                if on_rows is not None:
                    on_rows(split, len(chunk))


def _attributes(checkpoint: Path, meta: dict[str, Any], data: PreparedData, params: ExportParams) -> dict[str, Any]:
    """The store's provenance attributes (`pipeline.cache.store.REQUIRED_ATTRS` and the format's extras); an
    imported teacher's (`meta["source"]`) name its file's sha256 and add the attribute `source`."""
    source = meta.get("source")
    imported = {"source": source} if source is not None else {}
    return {
        "generation": meta["generation"],
        "arch": meta["arch"],
        "seed": meta["seed"],
        "temperature": 1.0,  # logits are stored raw; soften at read time
        "checkpoint_sha256": source["sha256"] if source is not None else sha256_file(checkpoint),
        **imported,
        "dataset_fingerprint": data.fingerprint,
        "dataset": data.name,
        "class_names": data.class_names,
        "dataset_name": data.description or data.name,
        "teacher": meta.get("teacher"),
        "loss": meta.get("loss"),
        "logit_shift": logit_shift(params),  # softmax, hence every target and statistic, is unaffected
        # how the generation that produced these logits was trained (`temperature` above is the stored T = 1)
        "trained_with": {
            **{k: meta.get(k) for k in ("loss", "temperature", "alpha", "teacher", "seed")},
            **({"beta": meta["beta"]} if "beta" in meta else {}),  # a dkd generation's NCKD weight
        },
        **LAYOUTS[params.layout].attributes(format_options(params)),
        **({"input": _input_recipe(data.x_train)} if isinstance(data.x_train, ImageFiles) else {}),
    }


def _input_recipe(files: ImageFiles) -> dict[str, Any]:
    """How an on-disk dataset's rows became the model's inputs (view 0 and the test split)."""
    return {
        "storage": "files",
        "decode": "torchvision.io.decode_image RGB",
        "eval_resize": files.eval_resize,
        "size": files.size,
        "view": "shorter side resized (bilinear, antialias), centre crop",
    }


def _temporary_path(out: Path, ctx: DistContext) -> Path:
    """A fresh temporary store path beside `out` (rank 0 removes stale ones and picks it; all ranks get it)."""
    tmp = None
    if ctx.is_main:
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    return Path(broadcast(ctx, str(tmp)))


def _load_model(checkpoint: Path, data: PreparedData, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The generation's model (eval mode, on `device`) and its checkpoint meta (an imported teacher's with
    its `source` record); refuses another dataset's."""
    ckpt = load_checkpoint(checkpoint, imported=True)
    meta = ckpt["meta"]
    if meta["dataset_fingerprint"] != data.fingerprint:
        raise CheckpointError(
            f"{checkpoint}: trained on another dataset (fingerprint {meta['dataset_fingerprint'][:12]}..., "
            f"prepared data is {data.fingerprint[:12]}...). Retrain this generation on the prepared data"
        )
    if ckpt["format"] == IMPORT_FORMAT:
        return model_from_import(ckpt, checkpoint).to(device), {**meta, "source": ckpt["source"]}
    return model_from_checkpoint(ckpt, checkpoint).to(device), meta


def _use_recipe_threads(meta: dict[str, Any]) -> None:
    """Run on the thread count the generation trained with (deterministic recipes): CPU float sums depend
    on it. Called by export_logits itself, so that loading a model changes no process-wide setting."""
    recipe = meta.get("recipe") or {}
    if recipe.get("deterministic") and recipe.get("threads"):
        torch.set_num_threads(recipe["threads"])


def _write_error(e: OSError, out: Path) -> OSError:
    """The user-facing error for an OSError while writing the store `out` (the error itself if unknown)."""
    if e.errno == errno.ENOSPC:
        return DiskFullError(
            f"{out}: no space left on the device while exporting; free space under {out.parent} and rerun "
            f"`bancache export-logits`. The previous store at {out}, if any, is untouched"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return NotWritableError(
            f"{out.parent}: cannot write the store there ({e.strerror}); make the directory writable "
            f"(chmod u+w) or run from a project root you can write to. The previous store at {out}, if any, "
            f"is untouched"
        )
    return e


def _create_store(
    tmp: Path, data: PreparedData, params: ExportParams, attributes: dict[str, Any], spec: StoreSpec
) -> LogitStore:
    """The empty store at `tmp` with its attributes and provenance arrays (rank 0 only)."""
    rows = {"train": len(data.y_train), "test": len(data.y_test)}
    store = LogitStore.create(
        tmp,
        rows,
        data.num_classes,
        spec.views,
        params.dtype,
        params.chunk_rows,
        attributes,
        layout=spec.format,
        slots=spec.slots,
        augmentation=spec.augmentation,
        split_views=spec.split_views,
    )
    write_provenance(store, data)
    return store


def export_logits(
    checkpoint: Path,
    data: PreparedData,
    out: Path,
    params: ExportParams,
    device: torch.device,
    ctx: DistContext = SINGLE_PROCESS,
    write_ahead: int = WRITE_AHEAD,
    on_rows: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Write `out` (a complete store) from `checkpoint`; returns the store's attributes.

    Under torchrun each rank writes its own whole chunks (`partition_rows`); rank 0 creates the store
    first and seals it after a barrier. `write_ahead` = 0 writes each chunk before inferring the next;
    `on_rows(split, n)` is called after each chunk of `split` this process infers (progress display)."""
    model, meta = _load_model(checkpoint, data, device)
    _use_recipe_threads(meta)
    spec = store_spec(data, params, meta.get("recipe"))
    attributes = _attributes(checkpoint, meta, data, params)
    tmp = _temporary_path(out, ctx)
    try:
        if ctx.is_main:  # rank 0 alone creates the store and its attributes
            store = _create_store(tmp, data, params, attributes, spec)
        barrier(ctx)
        if not ctx.is_main:
            store = LogitStore.attach(tmp)
        _write_rows(store, model, data, params, spec, device, ctx, write_ahead, on_rows)
        barrier(ctx)
        if ctx.is_main:  # validation and the marker come after every rank's rows
            marker = store.seal()
            replace_dir(tmp, out, discard_first=MARKER)
            log.info("exported generation %s to %s: %s", meta["generation"], out, marker["rows"])
        barrier(ctx)
    except OSError as e:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, out) from e
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LogitStore.open(out).attrs
