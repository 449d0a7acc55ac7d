"""The Python API: the chain's steps as functions, for notebooks and scripts (the CLI calls the same code).

Params are the dataclasses of `pipeline.params` (validated here as params.yaml is); every argument after
the first ones is keyword-only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline.cache.members import EnsembleTargets
from pipeline.cache.reader import CachedTargets
from pipeline.data.prepared import (
    MNIST1D_CLASSES,
    PreparedData,
    load_prepared,
    make_mnist1d,
    write_files_index,
    write_prepared,
)
from pipeline.losses import loss_spec
from pipeline.params import DataParams, ExportParams, GenParams, TrainParams, parse_generation, parse_section
from pipeline.train.loop import EpochLog, TrainResult

P = TypeVar("P")
PathLike = str | os.PathLike[str]


def _checked(cls: type[P], section: str, given: P | None) -> P:
    """`given` (or the defaults) validated like the params.yaml section `section`."""
    raw = dataclasses.asdict(given) if given is not None else {}  # type: ignore[call-overload]
    return parse_section(cls, section, raw)


def _data(data: PreparedData | PathLike) -> PreparedData:
    return data if isinstance(data, PreparedData) else load_prepared(data)


def describe_dataset(p: DataParams, arrays: dict[str, Any]) -> str:
    """A dataset name a person can read: source, where it came from, rows, and the subset if any."""
    rows = f"{len(arrays['y_train'])} train, {len(arrays['y_test'])} test rows"
    if p.n_unlabelled is not None:
        rows += f"; {p.n_unlabelled} of the train rows unlabelled"
    subset = p.n_train is not None or p.n_test is not None
    if p.dataset == "mnist1d":
        part = f", class-balanced subset, seed {p.split_seed}" if subset else ""
        return f"MNIST-1D ({p.num_samples} samples{part}: {rows})"
    where = f"{p.dataset} from {Path(p.root).resolve().name or p.root}"
    if subset:
        return f"{where} (class-balanced subset, seed {p.split_seed}: {rows})"
    return f"{where} ({rows})"


def prepare_data(
    path: PathLike, *, params: DataParams | None = None, on_files: Callable[[int, int], None] | None = None
) -> PreparedData:
    """Write the dataset `params` describes (default: MNIST-1D) to the HDF5 file `path`; returns it loaded.
    With `data.storage: files` only an index is written; `on_files(n, total)` reports files hashed (progress)."""
    p = _checked(DataParams, "data", params)
    if p.storage == "files":  # an index of the files, no pixels (pipeline.data.files)
        recipe = {"size": p.size, "eval_resize": p.eval_side}
        subset = (p.n_train, p.n_test)
        write_files_index(
            path, p.root, recipe, p.val_fraction, p.split_seed, subset, on_files=on_files, n_unlabelled=p.n_unlabelled
        )
        return load_prepared(path)
    from pipeline.data.sources import Loaded, load_dataset
    from pipeline.data.sources import subset as take_subset

    if p.dataset == "mnist1d":
        loaded = take_subset(
            Loaded(make_mnist1d(p.num_samples), MNIST1D_CLASSES), p.n_train, p.n_test, p.split_seed, p.n_unlabelled
        )
    else:
        loaded = load_dataset(
            p.dataset,
            p.root,
            download=p.download,
            size=p.size,
            n_train=p.n_train,
            n_test=p.n_test,
            seed=p.split_seed,
            n_unlabelled=p.n_unlabelled,
        )
    arrays, names = loaded.arrays, loaded.class_names
    desc = describe_dataset(p, arrays)
    write_prepared(path, arrays, names, p.dataset, p.val_fraction, p.split_seed, description=desc)
    return load_prepared(path)


def train_model(
    data: PreparedData | PathLike,
    *,
    gen: int,
    recipe: TrainParams | None = None,
    generation: GenParams | None = None,
    teacher_store: PathLike | list[PathLike] | None = None,
    out: PathLike | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> TrainResult:
    """Train generation `gen` (0, or a `ce` generation without a teacher: from labels; otherwise from
    `teacher_store`, the cached logits of `generation.teacher`, or a list of the member stores of an ensemble
    teacher, in the order of `generation.teacher`) and, with `out`, save its checkpoint there (what `export`
    reads)."""
    from pipeline.cache.store import LogitStore
    from pipeline.train.loop import checkpoint_meta, save_generation, train_generation

    r = _checked(TrainParams, "train", recipe)  # params first: a bad value fails before any work
    raw = dataclasses.asdict(generation) if generation is not None else {}
    gp = parse_generation(gen, raw)
    d = _data(data)
    store = _stores(teacher_store)
    needs_teacher = loss_spec(gp.loss).needs_teacher
    if needs_teacher and store is None:
        raise ValueError(f"generation {gen}: loss {gp.loss!r} learns from a teacher: pass teacher_store=")
    if isinstance(store, list) != isinstance(gp.teacher, list) or (
        isinstance(store, list) and len(store) != len(gp.members)
    ):
        raise ValueError(f"generation {gen}: give one teacher_store per member of teacher={gp.teacher!r}")
    result = train_generation(d, r, gen, gp, store if needs_teacher else None, on_epoch=on_epoch)
    if out is not None:
        shas = [LogitStore.open(s, fingerprint=d.fingerprint).attrs["checkpoint_sha256"] for s in _listed(store)]
        sha = None if store is None else shas if isinstance(store, list) else shas[0]
        save_generation(Path(out), result, checkpoint_meta(d, r, gen, gp, sha))
    return result


def _stores(given: PathLike | list[PathLike] | None) -> Path | list[Path] | None:
    if given is None:
        return None
    return [Path(s) for s in given] if isinstance(given, list) else Path(given)


def _listed(store: Path | list[Path] | None) -> list[Path]:
    return [] if store is None else store if isinstance(store, list) else [store]


def export_store(
    checkpoint: PathLike,
    data: PreparedData | PathLike,
    out: PathLike,
    *,
    params: ExportParams | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Write the logit store `out` from a checkpoint saved by `train_model(..., out=)`; returns its attributes."""
    from pipeline.core.devices import resolve_device
    from pipeline.teachers.export import export_logits

    p = _checked(ExportParams, "export", params)
    return export_logits(Path(checkpoint), _data(data), Path(out), p, resolve_device(device))


def load_model(checkpoint: PathLike) -> torch.nn.Module:
    """The network saved by `train_model(..., out=)` (or `bancache train`), rebuilt from the architecture its
    checkpoint records, with its weights, in eval mode. A missing, truncated or foreign file raises
    `CheckpointError`; `load_checkpoint(path)["meta"]` gives the provenance (arch, generation, seed, ...)."""
    from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(checkpoint), checkpoint).eval()


def open_targets(
    store: PathLike | list[PathLike],
    split: str = "train",
    *,
    data: PreparedData | PathLike | None = None,
    view: int = 0,
    ensemble: str = "probs",
) -> CachedTargets | EnsembleTargets:
    """The cached targets of `split` of `store`, read by dataset row index (`rows`, `target`). With `data`,
    the store is checked against that dataset (fingerprint, rows, classes); without, its own attributes
    are trusted. A list of stores is an ensemble teacher (`target`: the mean of the members' p_T, or with
    `ensemble="logits"` the softmax of their mean logits), its members checked against each other."""
    from pipeline.cache.members import EnsembleTargets

    if isinstance(store, list):
        members = [_open_one(s, split, data, view) for s in store]
        return EnsembleTargets(members, ensemble)
    return _open_one(store, split, data, view)


def _open_one(store: PathLike, split: str, data: PreparedData | PathLike | None, view: int) -> CachedTargets:
    from pipeline.cache.store import LogitStore

    if data is None:
        attrs = LogitStore.open(store).attrs
        fingerprint, rows, classes = attrs["dataset_fingerprint"], attrs["splits"].get(split, -1), attrs["num_classes"]
    else:
        d = _data(data)
        fingerprint, rows, classes = d.fingerprint, len(d.split(split)[1]), d.num_classes
    return CachedTargets(store, split, fingerprint, rows, classes, view=view)
