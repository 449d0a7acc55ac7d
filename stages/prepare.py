"""Stage `prepare`: write the dataset once into data/ as HDF5 (params: data)."""

from __future__ import annotations

from pipeline.api import prepare_data
from pipeline.core.paths import ProjectPaths
from pipeline.params import DataParams, parse_section
from stages.common import ParamsFile


def run(params: ParamsFile, layout: ProjectPaths) -> str:
    p = parse_section(DataParams, "data", params.get("data"))
    return prepare_data(layout.dataset, params=p).fingerprint
