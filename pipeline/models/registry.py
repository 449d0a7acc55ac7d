"""Model registry: architectures chosen by name in params.

Every builder takes the input shape (without the batch axis) and the class count, so a checkpoint's
recorded (arch, input_shape, num_classes) is enough to rebuild the module before loading its weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.models.cifar import Builder, common_builders, resolve

ARCHS: dict[str, Builder] = common_builders()  # the CIFAR and torchvision names; this module adds its own


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        ARCHS[name] = fn
        return fn

    return deco


def lookup(arch: str) -> Builder | None:
    """The builder registered under `arch`, or parsed from a parametric name (wrn22_8, tv_vgg11, ...)."""
    return ARCHS.get(arch) or resolve(arch)


def torchvision_alias(arch: str) -> str | None:
    """`tv_{arch}` when `arch` is a torchvision model's own name (resnet18, vgg11): what a user who wrote
    `arch: resnet18` meant, since bancache's own `resnet{d}` are the paper's CIFAR ResNets (depth 6n + 2)."""
    if arch.startswith("tv_"):
        return None
    return f"tv_{arch}" if resolve(f"tv_{arch}") is not None else None


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    builder = lookup(arch)
    if builder is None:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    net = builder(tuple(input_shape), num_classes)
    return ImageInput(net, input_shape[0]) if len(input_shape) == 3 else net


class ImageInput(nn.Module):
    """Maps uint8 images (B, C, H, W) to normalised float input, with the dataset's channel mean and std
    kept as buffers: a checkpoint carries its own preprocessing, so export and evaluation cannot differ
    from training. Float inputs pass through unchanged."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def set_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """mean and std of pixel values scaled to [0, 1]."""
        self.mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
        self.std.copy_(torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.mean) / self.std
        return self.net(x)


def conv_stack(input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...]) -> nn.Module:
    """conv-BN-ReLU-maxpool blocks of the given widths, global average pool, linear."""
    layers: list[nn.Module] = []
    cin = input_shape[0]
    for cout in widths:
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


@register("cnn3")
def cnn3(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """A small 3-layer CNN for images (conv-BN-ReLU-maxpool x3, widths 32-64-128)."""
    return conv_stack(input_shape, num_classes, (width, 2 * width, 4 * width))


@register("cnn4")
def cnn4(input_shape: tuple[int, ...], num_classes: int, width: int = 24) -> nn.Module:
    """A 4-layer CNN (widths 24-48-96-192, 221k parameters): more capacity than cnn3, and faster on a CPU,
    because its first, full-resolution layer is narrower. The CPU CIFAR config's network."""
    return conv_stack(input_shape, num_classes, (width, 2 * width, 4 * width, 8 * width))


@register("cnn4s")
def cnn4s(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """cnn4 at half width (12-24-48-96, 56k parameters, about a quarter of cnn4's multiply-adds): the small
    student of the CPU CIFAR compression experiment (README Results)."""
    return conv_stack(input_shape, num_classes, (12, 24, 48, 96))


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
