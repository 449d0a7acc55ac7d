"""Running a stage under torchrun: `launch.nproc_per_node > 1` makes `bancache train` / `export-logits`
re-launch themselves as torchrun workers, so `dvc repro` runs the distributed command unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.core.distributed import DistContext, context_from_env, init
from pipeline.params import LaunchParams, parse_section
from stages.common import ParamsFile


def launch_params(params: ParamsFile) -> LaunchParams:
    return parse_section(LaunchParams, "launch", params.get("launch"))


def torchrun_command(p: LaunchParams, argv: list[str]) -> list[str]:
    """The torchrun command line that runs `bancache <argv>` on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={p.nproc_per_node}"]
    if p.nnodes > 1:
        cmd += [f"--nnodes={p.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={p.rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "stages.cli", *argv]


def relaunch_if_needed(params: ParamsFile, argv: list[str]) -> int | None:
    """Exit status of the torchrun workers if this process must hand over to them, else None."""
    p = launch_params(params)
    if (p.nproc_per_node == 1 and p.nnodes == 1) or "WORLD_SIZE" in os.environ:
        return None
    return subprocess.call(torchrun_command(p, argv))


def worker_context(params: ParamsFile) -> DistContext:
    """This process's rank (rank 0 of 1 outside torchrun), with the process group joined."""
    ctx = context_from_env(os.environ)
    init(ctx, launch_params(params).backend)
    return ctx
