"""Stage `export` (generation K): params export."""

from __future__ import annotations

from typing import Any

from pipeline.core.devices import resolve_device
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import load_prepared
from pipeline.params import ExportParams, parse_section
from pipeline.teachers.export import export_logits
from stages.common import ParamsFile
from stages.launch import worker_context
from stages.progress import Progress


def run(params: ParamsFile, layout: ProjectPaths, gen: int, verify: bool = True) -> dict[str, Any]:
    p = parse_section(ExportParams, "export", params.get("export"))
    data = load_prepared(layout.dataset, verify=verify)
    ctx = worker_context(params)
    device = resolve_device(p.device, ctx)
    rows = (len(data.y_train) + len(data.y_test)) // ctx.world_size
    with Progress(f"export gen {gen}", rows, unit="rows", lines=10, enabled=ctx.is_main) as bar:
        return export_logits(layout.model(gen), data, layout.store(gen), p, device, ctx, on_rows=bar.update)
