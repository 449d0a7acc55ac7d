"""Stage `teachers@K` (generation K >= 1): params students.K. Writes members/gen-K.json, the marker hashes
of the stores generation K learns from (`pipeline.chain.generation.teacher_record`): train@K depends on
this file, since DVC cannot turn a list of teachers into a list of dependencies (see dvc.yaml)."""

from __future__ import annotations

from typing import Any

from pipeline.chain.generation import teacher_record
from pipeline.core.errors import ParamsError
from pipeline.core.files import write_json
from pipeline.core.paths import ProjectPaths
from pipeline.params import parse_generation, section_of
from stages.common import ParamsFile


def run(params: ParamsFile, layout: ProjectPaths, gen: int) -> dict[str, Any]:
    raw = params.get(section_of(gen))
    if gen == 0 or raw is None:
        raise ParamsError(f"--gen {gen}: params.yaml has no section students.'{gen}'; only students have teachers")
    record = teacher_record(layout, gen, parse_generation(gen, raw))
    write_json(layout.members(gen), record)
    return record
