"""Operations of the DARTS cell space, registered by name.

Every factory takes (channels, stride, affine): the search network builds its BatchNorms
with affine=False, the evaluation network with affine=True.
"""

from collections.abc import Callable

import torch
from torch import nn

from search_spaces.registry import Registry

OpFactory = Callable[[int, int, bool], nn.Module]

OPS: Registry[OpFactory] = Registry("operation")

# The search order: genotype files and architecture logits index ops by position here.
SEARCH_OPS: tuple[str, ...] = (
    "skip_connect",
    "sep_conv_3x3",
    "max_pool_3x3",
    "dil_conv_3x3",
    "sep_conv_5x5",
    "avg_pool_3x3",
    "sep_conv_7x7",
)
IMAGENET_SEARCH_OPS: tuple[str, ...] = SEARCH_OPS[:5]


class ReLUConvBN(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int, affine: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_chs, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU, depthwise dilated conv, pointwise conv, BatchNorm."""

    def __init__(self, chs: int, kernel_size: int, stride: int, padding: int, dilation: int, affine: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(chs, chs, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=chs, bias=False),
            nn.Conv2d(chs, chs, 1, bias=False),
            nn.BatchNorm2d(chs, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two DilConv blocks without dilation; only the first one strides."""

    def __init__(self, chs: int, kernel_size: int, stride: int, padding: int, affine: bool):
        super().__init__(
            DilConv(chs, kernel_size, stride, padding, 1, affine),
            DilConv(chs, kernel_size, 1, padding, 1, affine),
        )


class FactorizedReduce(nn.Module):
    """Halves the resolution with two stride-2 1x1 convs, the second one shifted by one pixel."""

    def __init__(self, in_chs: int, out_chs: int, affine: bool):
        super().__init__()
        if out_chs % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {out_chs}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(in_chs, out_chs // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(in_chs, out_chs // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = x[:, :, 1:, 1:]
        # Odd sizes: pad the shifted view back so both halves have the same output size.
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            shifted = nn.functional.pad(shifted, (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _register_sep_conv(name: str, kernel_size: int) -> None:
    OPS.register(name, lambda chs, stride, affine: SepConv(chs, kernel_size, stride, kernel_size // 2, affine))


def _register_dil_conv(name: str, kernel_size: int) -> None:
    padding = kernel_size - 1  # dilation 2 keeps the size at stride 1
    OPS.register(name, lambda chs, stride, affine: DilConv(chs, kernel_size, stride, padding, 2, affine))


def _create_skip_connect(chs: int, stride: int, affine: bool) -> nn.Module:
    return Identity() if stride == 1 else FactorizedReduce(chs, chs, affine)


def _create_max_pool(chs: int, stride: int, affine: bool) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1)


def _create_avg_pool(chs: int, stride: int, affine: bool) -> nn.Module:
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


OPS.register("skip_connect", _create_skip_connect)
_register_sep_conv("sep_conv_3x3", 3)
OPS.register("max_pool_3x3", _create_max_pool)
_register_dil_conv("dil_conv_3x3", 3)
_register_sep_conv("sep_conv_5x5", 5)
OPS.register("avg_pool_3x3", _create_avg_pool)
_register_sep_conv("sep_conv_7x7", 7)
# Outside the search space; PDARTS's published cells use it.
_register_dil_conv("dil_conv_5x5", 5)

# Short names used in tables and drawings.
SHORT_NAMES: dict[str, str] = {
    "skip_connect": "skip",
    "sep_conv_3x3": "sep3",
    "max_pool_3x3": "max",
    "dil_conv_3x3": "dil3",
    "sep_conv_5x5": "sep5",
    "avg_pool_3x3": "avg",
    "sep_conv_7x7": "sep7",
    "dil_conv_5x5": "dil5",
}


def create_op(name: str, chs: int, stride: int, affine: bool) -> nn.Module:
    return OPS.get(name)(chs, stride, affine)


def is_parameter_free_identity(name: str, stride: int) -> bool:
    """Returns whether drop path leaves this edge alone (identity edges are never dropped)."""
    return name == "skip_connect" and stride == 1
