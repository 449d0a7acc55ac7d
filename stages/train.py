"""Stage `train` (generation K): params train and gen0 (K = 0) or students.K."""

from __future__ import annotations

import os
from typing import Any

from pipeline.chain.generation import epoch_hook, import_generation, prepare_generation, train_job
from pipeline.core.distributed import context_from_env
from pipeline.core.errors import ParamsError
from pipeline.core.paths import ProjectPaths
from pipeline.params import TrainParams, parse_generation, parse_section, parse_source, section_of
from stages.common import ParamsFile
from stages.launch import worker_context
from stages.progress import Progress

__all__ = ["epoch_hook", "run"]  # epoch_hook: re-exported for benchmarks/long_controls.py


def run(
    params: ParamsFile, layout: ProjectPaths, gen: int, resume: bool = False, verify: bool = True
) -> dict[str, Any]:
    """Train generation `gen`; with `resume`, continue a killed run of the same config from its last epoch;
    `verify` False skips re-hashing the dataset and the teacher's store (trusted files)."""
    recipe = parse_section(TrainParams, "train", params.get("train"))
    raw = params.get(section_of(gen))
    if gen != 0 and raw is None:
        raise ParamsError(
            f"--gen {gen}: params.yaml has no section students.'{gen}' (generation {gen}); "
            "add it or pick another generation"
        )
    gp = parse_generation(gen, raw)
    source = parse_source(raw) if gen == 0 else None
    if source is not None:  # generation 0 imported from a file (gen0.source), not trained
        return import_generation(layout, source, recipe, verify=verify)
    is_main = context_from_env(os.environ).is_main  # the fitness check and its warnings: rank 0 only
    job = prepare_generation(layout, recipe, gen, gp, verify=verify, resume=resume, is_main=is_main)
    ctx = worker_context(params)
    with Progress(f"gen {gen}", recipe.epochs, unit="epoch", enabled=ctx.is_main) as bar:
        return train_job(job, ctx, on_epoch=epoch_hook(bar))
