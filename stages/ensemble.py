"""Stage `ensemble`: accuracy of every generation and of Ens*k from the cached test logits (params:
students, for the list of generations)."""

from __future__ import annotations

from typing import Any

from pipeline.core.files import write_json
from pipeline.core.paths import ProjectPaths
from pipeline.data.prepared import load_prepared
from pipeline.params import student_keys
from pipeline.results.ensemble import evaluate_chain
from stages.common import ParamsFile


def run(params: ParamsFile, layout: ProjectPaths, verify: bool = True) -> dict[str, Any]:
    gens = [0, *student_keys(params.get("students"))]
    data = load_prepared(layout.dataset, verify=verify)
    metrics = evaluate_chain({g: layout.store(g) for g in gens}, data, verify=verify)
    # metrics only, for `dvc metrics show` (members: lists, which it does not tabulate; the report names them)
    write_json(layout.ensemble_metrics, {k: metrics[k] for k in ("accuracy", "members")})
    return metrics
