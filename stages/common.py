"""params.yaml access for the stages, recording which sections each stage reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

from pipeline.core.errors import ParamsError
from pipeline.params import (
    DataParams,
    ExportParams,
    InspectParams,
    LaunchParams,
    TrainParams,
    parse_chain,
    parse_section,
)

SECTIONS = ("data", "train", "gen0", "students", "export", "launch", "inspect", "train_controls")
# Sections renamed since a released version: old name -> (new name, why).
RENAMED = {
    "controls": (
        "train_controls",
        "'controls' is also the controls/ output folder, and DVC cannot tell the param from the dependency",
    )
}


def load_yaml(text: str) -> Any:
    """Parse YAML 1.2 as DVC does (ruamel.yaml): `2e-3` is a float, `yes`/`on` are strings, no tags."""
    return YAML(typ="safe", pure=True).load(text)


class ParamsFile:
    """The parsed params.yaml; `get` records each (dotted) key a stage reads in `used`."""

    def __init__(self, raw: dict[str, Any], path: str = "params.yaml") -> None:
        self.raw = raw
        self.path = path
        self.used: set[str] = set()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ParamsFile:
        p = Path(path)
        if not p.exists():
            raise ParamsError(
                f"{p}: params file not found. Run bancache from the project root, or pass --root PROJECT "
                "or --params FILE"
            )
        try:
            raw = load_yaml(p.read_text()) or {}
        except YAMLError as e:
            raise ParamsError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ParamsError(f"{p}: expected a mapping of sections ({', '.join(SECTIONS)})")
        return cls(raw, str(p))

    def get(self, key: str) -> Any:
        self.used.add(key)
        node: Any = self.raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def validate(self) -> None:
        """Check the whole file (every section, the chain's teachers) before any stage does work."""
        for old, (new, why) in RENAMED.items():
            if old in self.raw:
                raise ParamsError(f"{self.path}: section '{old}' was renamed to '{new}' ({why}); rename it")
        unknown = sorted(set(self.raw) - set(SECTIONS))
        if unknown:
            raise ParamsError(f"{self.path}: unknown section '{unknown[0]}'. Allowed sections: {', '.join(SECTIONS)}")
        parse_section(DataParams, "data", self.raw.get("data"))
        parse_section(TrainParams, "train", self.raw.get("train"))
        parse_section(ExportParams, "export", self.raw.get("export"))
        parse_section(LaunchParams, "launch", self.raw.get("launch"))
        parse_chain(self.raw.get("gen0"), self.raw.get("students"))
        controls = self.raw.get("train_controls", False)
        if not isinstance(controls, bool):
            raise ParamsError(
                f"train_controls = {controls!r}: expected true or false (train a label-only control per student)"
            )
        parse_section(InspectParams, "inspect", self.raw.get("inspect"))

    def check_paths(self) -> None:
        """Check that the paths params name exist (`validate`): data.root for an image dataset."""
        data = parse_section(DataParams, "data", self.raw.get("data"))
        if data.dataset != "mnist1d" and not data.download and not Path(data.root).exists():
            raise ParamsError(
                f"data.root = {data.root!r}: no such folder (dataset {data.dataset!r}). Point it at the folder "
                f"holding the data" + (", or set data.download: true" if data.dataset.startswith("cifar") else "")
            )
