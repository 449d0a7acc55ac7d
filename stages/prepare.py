"""Stage `prepare`: write the dataset once into data/ as HDF5 (params: data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data import MNIST1D_CLASSES, make_mnist1d, write_prepared
from pipeline.datasets import load_dataset
from pipeline.layout import Layout
from pipeline.params import DataParams, parse_section
from stages.common import ParamsFile


def run(params: ParamsFile, layout: Layout) -> str:
    p = parse_section(DataParams, "data", params.get("data"))
    if p.dataset == "mnist1d":
        arrays, names = make_mnist1d(p.num_samples), MNIST1D_CLASSES
    else:
        loaded = load_dataset(
            p.dataset,
            p.root,
            download=p.download,
            size=p.size,
            n_train=p.n_train,
            n_test=p.n_test,
            seed=p.split_seed,
        )
        arrays, names = loaded.arrays, loaded.class_names
    return write_prepared(
        layout.dataset, arrays, names, p.dataset, p.val_fraction, p.split_seed, description=describe(p, arrays)
    )


def describe(p: DataParams, arrays: dict[str, Any]) -> str:
    """A dataset name a person can read: source, where it came from, rows, and the subset if any."""
    rows = f"{len(arrays['y_train'])} train, {len(arrays['y_test'])} test rows"
    if p.dataset == "mnist1d":
        return f"MNIST-1D ({p.num_samples} samples: {rows})"
    where = f"{p.dataset} from {Path(p.root).resolve().name or p.root}"
    if p.n_train is not None or p.n_test is not None:
        return f"{where} (class-balanced subset, seed {p.split_seed}: {rows})"
    return f"{where} ({rows})"
