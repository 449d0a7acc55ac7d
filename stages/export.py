"""Stage `export` (generation K): params export."""

from __future__ import annotations

from typing import Any

from pipeline.chain.generation import export_generation
from pipeline.core.paths import ProjectPaths
from pipeline.params import ExportParams, parse_section
from stages.common import ParamsFile
from stages.launch import worker_context
from stages.progress import Progress


def run(params: ParamsFile, layout: ProjectPaths, gen: int, verify: bool = True) -> dict[str, Any]:
    p = parse_section(ExportParams, "export", params.get("export"))
    return export_generation(layout, gen, p, worker_context(params), Progress, verify=verify)
