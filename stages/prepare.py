"""Stage `prepare`: write the dataset once into data/ as HDF5 (params: data)."""

from __future__ import annotations

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
    return write_prepared(layout.dataset, arrays, names, p.dataset, p.val_fraction, p.split_seed)
