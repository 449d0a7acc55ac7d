"""Evaluation: logits of a model in eval mode and accuracy.

`predict_logits` serves export and the test metrics (numpy in, numpy out); `device_accuracy` serves
validation during training on device-resident inputs, counting correct rows on the device and reading the
count once, so an epoch's validation does not wait on the host after every batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits (N, C) of `model` in eval mode, in row order, float32."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(device)
        out.append(model(xb).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label (divided by samples, not batches)."""
    return float((logits.argmax(axis=-1) == y).mean()) if len(y) else float("nan")


def predict_accuracy(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int, device: torch.device
) -> tuple[np.ndarray, float]:
    """Logits of `model` on rows `x` (`predict_logits`) and their accuracy against `y`: "predict the test
    set, then accuracy", written once for training, the controls and the sweep."""
    logits = predict_logits(model, x, batch_size, device)
    return logits, accuracy(logits, y)


@torch.no_grad()
def device_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """`accuracy(predict_logits(model, x, batch_size, ...), y)` for inputs already on the model's device:
    the same batches and argmax (first maximum on ties), the correct count summed on the device and read
    once at the end."""
    model.eval()
    if len(y) == 0:
        return float("nan")
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size]).float()
        correct += (logits.argmax(dim=-1) == y[start : start + batch_size]).sum()
    return int(correct.item()) / len(y)
