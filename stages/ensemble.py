"""Stage `ensemble`: accuracy of every generation and of Ens*k from the cached test logits (params:
students, for the list of generations)."""

from __future__ import annotations

from typing import Any

from pipeline.chain.generation import evaluate_project
from pipeline.core.paths import ProjectPaths
from pipeline.params import student_keys
from stages.common import ParamsFile


def run(params: ParamsFile, layout: ProjectPaths, verify: bool = True) -> dict[str, Any]:
    return evaluate_project(layout, [0, *student_keys(params.get("students"))], verify=verify)
