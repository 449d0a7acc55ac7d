"""Stage `prepare`: write the dataset once into data/ as HDF5 (params: data)."""

from __future__ import annotations

from pipeline.data import MNIST1D_CLASSES, make_mnist1d, write_prepared
from pipeline.layout import Layout
from pipeline.params import DataParams, parse_section
from stages.common import ParamsFile


def run(params: ParamsFile, layout: Layout) -> str:
    p = parse_section(DataParams, "data", params.get("data"))
    arrays = make_mnist1d(p.num_samples)
    return write_prepared(layout.dataset, arrays, MNIST1D_CLASSES, p.dataset, p.val_fraction, p.split_seed)
