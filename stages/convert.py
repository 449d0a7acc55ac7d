"""`bancache convert` (no DVC stage): a logit store exported to one HDF5 or npz file; reads no params."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.convert import convert_store
from pipeline.cache.store import LogitStore
from pipeline.core.errors import ParamsError
from pipeline.core.paths import ProjectPaths

CONVERT_SUFFIXES = {"h5": (".h5", ".hdf5"), "npz": (".npz",)}


def run(layout: ProjectPaths, gen: int, fmt: str, out: str | Path, verify: bool = True) -> Path:
    """Export cache/gen-K to `out` as HDF5 (`h5`) or numpy (`npz`), checked against its marker as it is
    copied unless `verify` is False; `out` without an extension gets `.h5` / `.npz`, one with another
    extension is refused."""
    target = Path(out)
    if target.suffix == "":
        target = target.with_name(f"{target.name}.{fmt}")
    elif target.suffix.lower() not in CONVERT_SUFFIXES[fmt]:
        raise ParamsError(
            f"--out {out}: the extension {target.suffix!r} does not match --format {fmt}; "
            f"use {target.with_suffix('.' + fmt)} or --format {'npz' if fmt == 'h5' else 'h5'}"
        )
    return convert_store(LogitStore.open(layout.store(gen), verify=verify), target, fmt)
