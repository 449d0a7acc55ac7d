"""`bancache sweep`: the whole chain over several seeds (and gen-1 loss variants), one table. The
orchestration is `pipeline.chain.sweep`; this module hands it the params and the progress display."""

from __future__ import annotations

from pathlib import Path

from pipeline.chain.sweep import format_tables, run_sweep
from pipeline.core.errors import ParamsError
from pipeline.core.paths import ProjectPaths
from pipeline.params import parse_source
from stages import prepare
from stages.common import ParamsFile
from stages.progress import Progress, note

__all__ = ["format_tables", "run"]  # format_tables: re-exported for the benchmarks and tests


def run(params: ParamsFile, out: Path, seeds: list[int], losses: list[str], controls: bool = False) -> str:
    """Prepare the dataset into `out`, run every seed into `out`/seed-S/, write sweep.json after each and
    table.md; returns the table."""
    if parse_source(params.get("gen0")) is not None:
        raise ParamsError(
            "gen0.source is set: the sweep trains generation 0 per seed, and an imported teacher has no seed. "
            "Unset gen0.source for the sweep, or run the imported chain with `dvc repro`"
        )
    prepare.run(params, ProjectPaths(out))
    return run_sweep(params.raw, out, seeds, losses, Progress, note, controls=controls)
