"""Export a logit store for other tools: every array to one HDF5 (`h5`) or numpy (`npz`) file, written
chunk by chunk so memory holds one block."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np

from pipeline.cache.store import LogitStore
from pipeline.core.errors import ParamsError
from pipeline.core.files import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("h5", "npz")


def convert_store(store: LogitStore, out: str | os.PathLike[str], fmt: str) -> Path:
    """Write every split of `store` to an HDF5 (`h5`) or numpy (`npz`) file, chunk by chunk, atomically.

    Both hold every array of the store under its zarr name and dtype (`train` and `test` (N, V, C) for a
    dense store, V the split's views: `test` has 1; sparse stores add `<split>_idx`, `<split>_mass`,
    multi-view splits `<split>_aug`) and the store's attributes as a JSON string (`attributes`: an HDF5
    file attribute, or a 0-d string array in the npz).
    """
    if fmt not in FORMATS:
        raise ParamsError(f"--format {fmt!r}: allowed values are {', '.join(FORMATS)}")
    target = Path(out)
    if target.is_dir():
        raise ParamsError(f"--out {target}: is a directory; give a file path such as {target}/gen.{fmt}")
    attrs = json.dumps(store.attrs, sort_keys=True)
    with atomic_path(target) as tmp:
        (_write_h5 if fmt == "h5" else _write_npz)(store, tmp, attrs)
    log.info("converted %s to %s", store.path, target)
    return target


def _array_names(store: LogitStore) -> list[str]:
    """Every array in the store's group, listed or not in its attributes."""
    return sorted(store.group.array_keys())


def _write_h5(store: LogitStore, path: Path, attrs: str) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["attributes"] = attrs
        for name in _array_names(store):
            arr = store.array(name)
            chunks = (min(arr.chunks[0], arr.shape[0]), *arr.shape[1:]) if arr.shape[0] else None
            ds = f.create_dataset(name, shape=arr.shape, dtype=np.dtype(arr.dtype), chunks=chunks)
            for start, block in store.blocks(name):
                ds[start : start + len(block)] = block


def _write_npz(store: LogitStore, path: Path, attrs: str) -> None:
    # np.savez needs whole arrays; an .npz is a zip of .npy files, so each member is written header first,
    # then its rows chunk by chunk.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in _array_names(store):
            arr = store.array(name)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(arr.dtype)),
                    "fortran_order": False,
                    "shape": tuple(arr.shape),
                }
                np.lib.format.write_array_header_1_0(f, header)
                for _, block in store.blocks(name):
                    f.write(np.ascontiguousarray(block).tobytes())
        with zf.open("attributes.npy", "w") as f:
            np.lib.format.write_array(f, np.array(attrs))
