"""CIFAR architectures: published parameter counts, forward shapes, channels_last, name parsing."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from pipeline.models import cifar as cifar_models
from pipeline.models.cifar import COMMON, DenseLayer, resolve
from pipeline.models.registry import ARCHS

SHAPE = (3, 32, 32)


@functools.cache  # WRN-28-10 is built once, not per assertion
def n_params(arch: str, num_classes: int) -> int:
    builder = resolve(arch)
    assert builder is not None, arch
    return sum(p.numel() for p in builder(SHAPE, num_classes).parameters())


@pytest.mark.parametrize(
    ("arch", "num_classes", "published"),
    [
        ("resnet20", 10, 0.27e6),  # He et al. 2016, Table 6
        ("resnet56", 10, 0.85e6),
        ("resnet110", 10, 1.7e6),
        ("preresnet110", 10, 1.7e6),  # He et al. 2016b, Table 3
        ("wrn28_10", 10, 36.48e6),  # Zagoruyko & Komodakis 2016 (36.5M)
        ("wrn28_10", 100, 36.5e6),
        ("wrn28_2", 10, 1.47e6),  # BAN Table 1: 1.48M
        ("wrn28_5", 10, 9.16e6),  # BAN Table 1
        ("densenet_bc100_12", 10, 0.77e6),  # Huang et al. 2017 (0.8M rounded)
        ("densenet_bc250_24", 10, 15.3e6),
        ("densenet_bc190_40", 10, 25.6e6),
    ],
)
def test_param_counts_match_published(arch: str, num_classes: int, published: float) -> None:
    n = n_params(arch, num_classes)
    assert abs(n - published) / published < 0.02, f"{arch}: {n} params, published {published:.0f}"


def test_exact_counts_pin_the_shortcut_choices() -> None:
    # ResNet-20 with parameter-free option A shortcuts: 269,722 (the often quoted 0.27M).
    assert n_params("resnet20", 10) == 269_722
    # PreResNet-20 has the same BN count (no stem BN, one final BN(64), BN(cin) in the stage-opening
    # blocks) plus option B's two 1x1 projections, 16->32 and 32->64.
    assert n_params("preresnet20", 10) == 269_722 + 16 * 32 + 32 * 64
    assert n_params("wrn28_10", 10) == 36_479_194  # the reference WRN-28-10 implementation's count


@pytest.mark.parametrize("arch", ["resnet20", "preresnet20", "wrn16_2_drop0.3", "densenet_bc40_12", "densenet40_6"])
def test_forward_shape(arch: str) -> None:
    torch.manual_seed(0)
    model = resolve(arch)(SHAPE, 7)  # type: ignore[misc]
    out = model(torch.randn(2, *SHAPE))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", ["resnet20", "preresnet20", "wrn16_2", "densenet_bc40_12"])
def test_channels_last_forward_matches_contiguous(arch: str) -> None:
    torch.manual_seed(0)
    model = resolve(arch)(SHAPE, 10).eval()  # type: ignore[misc]
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_common_names_are_registered_at_import() -> None:
    missing = [name for name in COMMON if name not in ARCHS]
    assert not missing
    assert {"resnet20", "wrn28_10", "densenet_bc100_12", "densenet90_60", "tv_resnet18"} <= set(ARCHS)


def test_resolve_parses_parametric_names() -> None:
    model = resolve("wrn22_3")(SHAPE, 10)  # type: ignore[misc]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 3 * 3 * 2  # stem + 3 stages x (22 - 4) / 6 blocks x 2 convs
    assert max(c.out_channels for c in convs) == 64 * 3
    assert resolve("resnet32") is not None and resolve("densenet_bc40_12") is not None
    for unknown in ("resnet", "wrn28", "vgg16", "tv_no_such_model", "wrn28_10_drop"):
        assert resolve(unknown) is None, unknown


def test_wrn_dropout_from_name_and_default() -> None:
    drops = [m.p for m in resolve("wrn16_1_drop0.3")(SHAPE, 10).modules() if isinstance(m, nn.Dropout)]  # type: ignore[misc]
    assert drops == [0.3] * 6
    assert cifar_models.WRN_DROPOUT == 0.0
    assert not any(isinstance(m, nn.Dropout) for m in resolve("wrn16_1")(SHAPE, 10).modules())  # type: ignore[misc]


def test_ban_densenet_depths_round_down() -> None:
    # The BAN paper's DenseNet-90-60: (90 - 4) / 6 = 14.3 gives 14 bottleneck layers per block, and
    # DenseNet-80-k: 12.7 gives 12 (rounded down, not to nearest).
    for arch, layers in (("densenet90_60", 14), ("densenet80_12", 12)):
        model = resolve(arch)(SHAPE, 100)  # type: ignore[misc]
        assert sum(isinstance(m, DenseLayer) for m in model.modules()) == 3 * layers, arch
    with pytest.raises(ValueError, match="6n \\+ 4"):
        resolve("densenet_bc90_60")(SHAPE, 100)  # type: ignore[misc]


@pytest.mark.parametrize("bad", ["resnet21", "preresnet4", "wrn27_2", "densenet_bc101_12"])
def test_invalid_depth_raises_with_rule(bad: str) -> None:
    builder = resolve(bad)
    assert builder is not None
    with pytest.raises(ValueError, match="6n"):
        builder(SHAPE, 10)


def test_wrong_input_rank_raises() -> None:
    with pytest.raises(ValueError, match="channels, height, width"):
        resolve("resnet20")((1, 40), 10)  # type: ignore[misc]


def test_torchvision_models_by_name() -> None:
    model = resolve("tv_mobilenet_v3_small")(SHAPE, 13)  # type: ignore[misc]
    assert model(torch.randn(2, *SHAPE)).shape == (2, 13)
    assert n_params("tv_resnet18", 1000) == 11_689_512  # torchvision's documented resnet18 size
    with pytest.raises(ValueError, match="3-channel"):
        resolve("tv_resnet18")((1, 32, 32), 10)  # type: ignore[misc]


def test_small_cpu_cnns_have_the_documented_layers_and_counts() -> None:
    """cnn3 (32-64-128) and cnn4 (24-48-96-192): conv weights, BN scale and shift, then the linear layer."""

    def count(widths: tuple[int, ...]) -> int:
        convs = sum(cin * cout * 9 + 2 * cout for cin, cout in zip((3, *widths[:-1]), widths, strict=True))
        return convs + widths[-1] * 10 + 10

    for arch, widths in (("cnn3", (32, 64, 128)), ("cnn4", (24, 48, 96, 192))):
        model = ARCHS[arch]((3, 32, 32), 10)
        assert sum(p.numel() for p in model.parameters()) == count(widths)
        convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert tuple(convs) == widths
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
