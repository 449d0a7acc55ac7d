"""CIFAR architectures of the Born-Again Networks paper and its baselines, plus torchvision models by name.

Every builder takes `(input_shape=(C, H, W), num_classes)` like the rest of `pipeline.models.registry`. Names:

- `resnet{d}`, d = 6n + 2 (resnet20/56/110): He et al. 2016, "Deep Residual Learning", CIFAR section 4.2.
  Three stages of basic blocks with 16/32/64 channels, post-activation, **option A** shortcuts (identity,
  stride-2 subsampling and zero-padded channels: parameter-free), which gives the published 0.27M / 0.85M /
  1.7M parameters.
- `preresnet{d}`, d = 6n + 2: He et al. 2016b, "Identity Mappings in Deep Residual Networks": basic blocks
  BN-ReLU-conv, a final BN-ReLU before pooling, and **option B** shortcuts (1x1 convolution on the
  pre-activated input where the shape changes, as in the authors' resnet-1k-layers code).
- `wrn{d}_{k}` and `wrn{d}_{k}_drop{p}`, d = 6n + 4: Zagoruyko & Komodakis 2016, "Wide Residual Networks":
  pre-activation blocks with widths 16k/32k/64k, dropout `p` between the two convolutions (default
  `WRN_DROPOUT` = 0.0; the WRN paper used 0.3 on CIFAR, e.g. `wrn28_10_drop0.3`), 1x1 conv shortcuts.
- `densenet_bc{d}_{k}`, d = 6n + 4: Huang et al. 2017, "Densely Connected Convolutional Networks",
  DenseNet-BC: 3 dense blocks of n bottleneck layers (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k),
  transitions compressing by `DENSENET_COMPRESSION` = 0.5, a 2k-channel stem.
- `densenet{d}_{k}`: the BAN paper's DenseNet-d-k (112-33, 90-60, 80-80, 80-120). Their depths are not all
  6n + 4, so n = (d - 4) // 6 layers per block (BC, compression 0.5). The paper does not give its layout,
  and this one does not reproduce its Table 1 sizes (6.3M / 16.1M / 22.4M / 50.4M): it gives 6.89M /
  15.05M / 20.95M / 47.05M for 10 classes. No equal-blocks layer count matches all four.
- `tv_{name}`: any torchvision classification model (`torchvision.models.list_models`), built with
  `weights=None` and `num_classes` (ImageNet stems: they expect 3 channels and downsample 32x32 inputs hard).

Parametric names are parsed by `resolve`; `pipeline.models.registry` registers the common ones (`COMMON`) in
`ARCHS`. All forward passes use `flatten`, never `view`, so channels_last inputs and models work.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Builder = Callable[[tuple[int, ...], int], nn.Module]  # (input_shape, num_classes) -> module

WRN_DROPOUT = 0.0  # dropout between the two convs of a WRN block unless the name says `_drop{p}`
DENSENET_COMPRESSION = 0.5  # theta of DenseNet-BC transitions
DENSENET_BOTTLENECK = 4  # bottleneck width in multiples of the growth rate


def _channels(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{name} expects inputs of shape (channels, height, width), got {input_shape}")
    return int(input_shape[0])


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Option A: identity, subsampled by `stride`, with zero channels appended (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """Post-activation block: conv-BN-ReLU-conv-BN, added to the shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = ShortcutA(cin, cout, stride) if (cin != cout or stride > 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv-BN-ReLU-(dropout)-conv (He et al. 2016b; WRN adds the dropout).

    Where the shape changes the shortcut is a 1x1 convolution of the pre-activated input.
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3(cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.project = cin != cout or stride > 1
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if self.project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(act)))))
        return out + (self.shortcut(act) if self.project else x)


class CifarResNet(nn.Module):
    """3x3 stem, three stages of `blocks` blocks (strides 1, 2, 2), global average pooling, linear head."""

    def __init__(
        self, cin: int, num_classes: int, widths: tuple[int, int, int], blocks: int, pre_act: bool, dropout: float = 0.0
    ) -> None:
        super().__init__()
        stem = 16
        self.stem = nn.Sequential(_conv3(cin, stem), *(() if pre_act else (nn.BatchNorm2d(stem), nn.ReLU())))
        layers: list[nn.Module] = []
        c = stem
        for stage, width in enumerate(widths):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                block = PreActBlock(c, width, stride, dropout) if pre_act else BasicBlock(c, width, stride)
                layers.append(block)
                c = width
        self.stages = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()) if pre_act else nn.Identity()
        self.head = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.stages(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    """DenseNet-BC bottleneck layer: BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k), output appended to input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        mid = DENSENET_BOTTLENECK * growth
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            _conv3(mid, growth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class CifarDenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs: 3 dense blocks of `layers` bottleneck layers, compressing transitions."""

    def __init__(self, cin: int, num_classes: int, layers: int, growth: int) -> None:
        super().__init__()
        c = 2 * growth
        parts: list[nn.Module] = [_conv3(cin, c)]
        for block in range(3):
            for _ in range(layers):
                parts.append(DenseLayer(c, growth))
                c += growth
            if block < 2:
                out = int(c * DENSENET_COMPRESSION)
                parts += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.AvgPool2d(2)]
                c = out
        parts += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*parts)
        self.head = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _init(model: nn.Module) -> None:
    """He (fan_out) init for convolutions, unit BN scales, zero biases: the usual CIFAR recipe."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def resnet(input_shape: tuple[int, ...], num_classes: int, depth: int, pre_act: bool = False) -> nn.Module:
    """CIFAR ResNet-`depth` (post-activation, option A) or PreResNet-`depth` (pre-activation, option B)."""
    name = f"{'pre' if pre_act else ''}resnet{depth}"
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"{name}: depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    return CifarResNet(_channels(name, input_shape), num_classes, (16, 32, 64), (depth - 2) // 6, pre_act)


def wide_resnet(
    input_shape: tuple[int, ...], num_classes: int, depth: int, widen: int, dropout: float = WRN_DROPOUT
) -> nn.Module:
    """WRN-`depth`-`widen`: (depth - 4) / 6 pre-activation blocks per stage, widths 16k, 32k, 64k."""
    name = f"wrn{depth}_{widen}"
    if depth < 10 or (depth - 4) % 6 or widen < 1:
        raise ValueError(f"{name}: depth must be 6n + 4 (10, 16, 22, 28, 40, ...) and width >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    widths = (16 * widen, 32 * widen, 64 * widen)
    return CifarResNet(_channels(name, input_shape), num_classes, widths, (depth - 4) // 6, True, dropout)


def densenet_bc(
    input_shape: tuple[int, ...], num_classes: int, depth: int, growth: int, strict: bool = True
) -> nn.Module:
    """DenseNet-BC-`depth` with growth rate `growth`: (depth - 4) / 6 bottleneck layers per block.

    With `strict=False` (the BAN paper's names, e.g. DenseNet-90-60) the layer count is rounded down.
    """
    name = f"densenet{'_bc' if strict else ''}{depth}_{growth}"
    if depth < 10 or growth < 1 or (strict and (depth - 4) % 6):
        raise ValueError(f"{name}: depth must be 6n + 4 (40, 100, 190, 250, ...) and growth >= 1")
    return CifarDenseNet(_channels(name, input_shape), num_classes, (depth - 4) // 6, growth)


def torchvision_model(input_shape: tuple[int, ...], num_classes: int, name: str) -> nn.Module:
    """torchvision's `name` with random weights (weights=None) and a `num_classes`-way head."""
    import torchvision.models as tvm

    if _channels(f"tv_{name}", input_shape) != 3:
        raise ValueError(f"tv_{name}: torchvision models take 3-channel images, got {input_shape}")
    return tvm.get_model(name, weights=None, num_classes=num_classes)


def _parse_resnet(m: re.Match[str]) -> Builder:
    return functools.partial(resnet, depth=int(m[2]), pre_act=bool(m[1]))


def _parse_wrn(m: re.Match[str]) -> Builder:
    dropout = float(m[3]) if m[3] else WRN_DROPOUT
    return functools.partial(wide_resnet, depth=int(m[1]), widen=int(m[2]), dropout=dropout)


def _parse_densenet(m: re.Match[str]) -> Builder:
    return functools.partial(densenet_bc, depth=int(m[2]), growth=int(m[3]), strict=bool(m[1]))


def _parse_tv(m: re.Match[str]) -> Builder | None:
    import torchvision.models as tvm

    if m[1] not in tvm.list_models(module=tvm):
        return None
    return functools.partial(torchvision_model, name=m[1])


_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Builder | None]]] = [
    (re.compile(r"(pre)?resnet(\d+)"), _parse_resnet),
    (re.compile(r"wrn(\d+)_(\d+)(?:_drop(0(?:\.\d+)?|\.\d+))?"), _parse_wrn),
    (re.compile(r"densenet(_bc)?(\d+)_(\d+)"), _parse_densenet),
    (re.compile(r"tv_(\w+)"), _parse_tv),
]


def resolve(arch: str) -> Builder | None:
    """The builder for the parametric name `arch`; None if this module does not parse it.

    Depths are checked when the builder is called: `resolve("resnet21")` returns a builder whose call raises
    a `ValueError` that explains the 6n + 2 rule.
    """
    for regex, parse in _PATTERNS:
        m = regex.fullmatch(arch)
        if m:
            return parse(m)
    return None


COMMON = (
    "resnet20",
    "resnet56",
    "resnet110",
    "preresnet20",
    "preresnet56",
    "preresnet110",
    "wrn28_10",
    "wrn28_10_drop0.3",
    "wrn28_2",
    "wrn28_1",
    "wrn28_5",
    "wrn16_4",
    "wrn16_8",
    "wrn40_4",
    "densenet_bc100_12",
    "densenet_bc250_24",
    "densenet_bc190_40",
    "densenet112_33",
    "densenet90_60",
    "densenet80_80",
    "densenet80_120",
    "tv_resnet18",
    "tv_resnet50",
    "tv_mobilenet_v3_small",
)


def common_builders() -> dict[str, Builder]:
    """Builders of the COMMON names, for the registry of `pipeline.models.registry`."""
    found: dict[str, Builder] = {}
    for name in COMMON:
        if name.startswith("tv_"):  # no torchvision.models import until one is built
            found[name] = functools.partial(torchvision_model, name=name[3:])
        else:
            builder = resolve(name)
            assert builder is not None, name
            found[name] = builder
    return found
