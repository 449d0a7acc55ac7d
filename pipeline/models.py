"""Model registry: architectures chosen by name in params.

Every builder takes the input shape (without the batch axis) and the class count, so a checkpoint's
recorded (arch, input_shape, num_classes) is enough to rebuild the module before loading its weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

Builder = Callable[[tuple[int, ...], int], nn.Module]
ARCHS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        ARCHS[name] = fn
        return fn

    return deco


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](tuple(input_shape), num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Two hidden layers of `hidden` units (the MNIST-1D paper's MLP baseline)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class CNN1d(nn.Module):
    """Three 1-D conv layers (stride 2) and a linear head: the MNIST-1D paper's small CNN."""

    def __init__(self, in_channels: int, length: int, num_classes: int, width: int = 25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, length)).numel()
        self.head = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register("cnn1d")
def cnn1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 2:
        raise ValueError(f"cnn1d expects inputs of shape (channels, length), got {input_shape}")
    return CNN1d(input_shape[0], input_shape[1], num_classes)
