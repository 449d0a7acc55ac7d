"""Stage `prepare`: write the dataset once into data/ as HDF5 (params: data); an on-disk dataset's index
shows its hashing progress."""

from __future__ import annotations

from pipeline.api import prepare_data
from pipeline.core.paths import ProjectPaths
from pipeline.params import DataParams, parse_section
from stages import progress
from stages.common import ParamsFile


def run(params: ParamsFile, layout: ProjectPaths) -> str:
    p = parse_section(DataParams, "data", params.get("data"))
    bars: list[progress.Progress] = []

    def on_files(n: int, total: int) -> None:  # the total is known once prepare has listed the files
        if not bars:
            bars.append(progress.Progress("prepare: hashing", total, unit="file", lines=10))
        bars[0].update(n)

    try:
        return prepare_data(layout.dataset, params=p, on_files=on_files).fingerprint
    finally:
        for bar in bars:
            bar.close()
