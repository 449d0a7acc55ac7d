"""The machine a result was made on: CPU kind, torch's CPU kernels, library versions, threads, CUDA device.

Results are bit-identical only between runs on the same CPU kind, kernels, versions and thread count
(README, "Quick start"), so every checkpoint and metrics file records this: `machine()` is the one place
that says what it is.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

KEY = "machine"  # the key of the record in checkpoint meta and in metrics files


def cpu_model() -> str:
    """/proc/cpuinfo's "model name" (Linux), else platform.processor(), else platform.machine()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """This process's machine: `cpu` (model name), `cpu_capability` (the ATen kernels torch dispatches to,
    e.g. AVX512, AVX2, DEFAULT), `threads` (torch's intra-op threads now), `torch`, `numpy`, `zarr` and
    `python` versions, `cuda` (the first CUDA device's name, or None)."""
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only loading refuses
        "numpy": np.__version__,
        "zarr": _version("zarr"),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def with_machine(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` plus the machine record, as a metrics file holds it: a one-item list under "machine".
    DVC's tables (`dvc metrics show`, `dvc exp show`) show every number and string of a metrics file but
    skip lists, so the record stays out of them (a plain dict would add 7 columns, about 130 characters)."""
    return {**metrics, KEY: [machine()]}
