"""The device a run uses: 'auto', 'cpu' or 'cuda', and this rank's GPU under torchrun."""

from __future__ import annotations

import torch

from pipeline.core.distributed import SINGLE_PROCESS, DistContext
from pipeline.core.errors import ParamsError


def resolve_device(name: str, ctx: DistContext = SINGLE_PROCESS) -> torch.device:
    """'auto' -> cuda when available, else cpu; under torchrun (`ctx.enabled`) CUDA is this rank's
    GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    device = torch.device(name)
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device
