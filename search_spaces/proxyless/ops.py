"""Operations of the ProxylessNAS space: MobileNetV2 inverted-residual blocks (MBConv) and skip.

Each searched layer chooses one of the seven ops in ``SEARCH_OPS``, and ``skip`` (the
identity) is allowed only where the layer keeps its input shape. Every factory takes
(in_chs, out_chs, stride).
"""

from collections.abc import Callable

import torch
from torch import nn

from search_spaces.registry import Registry

OpFactory = Callable[[int, int, int], nn.Module]

OPS: Registry[OpFactory] = Registry("operation")

SKIP = "skip"

# The search order: architecture logits index ops by position here. Skip comes last, so a
# layer that may not skip uses the first six entries with the same indices.
MBCONV_OPS: tuple[str, ...] = (
    "mbconv_k3_e3",
    "mbconv_k3_e6",
    "mbconv_k5_e3",
    "mbconv_k5_e6",
    "mbconv_k7_e3",
    "mbconv_k7_e6",
)
SEARCH_OPS: tuple[str, ...] = (*MBCONV_OPS, SKIP)

# Labels in the style of the ProxylessNAS figures: "MB6 5x5" is expansion 6, kernel 5.
SHORT_NAMES: dict[str, str] = {SKIP: "skip"}


def conv_bn(in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int, activation: bool) -> nn.Sequential:
    """Build a bias-free conv with 'same' padding, then BatchNorm and, when ``activation`` is set, ReLU6."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_chs),
    ]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, linear 1x1 project; residual when shapes match.

    Expansion 1 has no expand conv, as in MobileNetV2's first block.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, expansion: int, stride: int):
        super().__init__()
        mid_chs = in_chs * expansion
        self.expand = conv_bn(in_chs, mid_chs, 1, 1, 1, activation=True) if expansion != 1 else nn.Identity()
        self.depthwise = conv_bn(mid_chs, mid_chs, kernel_size, stride, mid_chs, activation=True)
        self.project = conv_bn(mid_chs, out_chs, 1, 1, 1, activation=False)
        self.has_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.has_residual else out


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _register_mbconv(kernel_size: int, expansion: int) -> None:
    name = f"mbconv_k{kernel_size}_e{expansion}"

    def create(in_chs: int, out_chs: int, stride: int) -> nn.Module:
        return MBConv(in_chs, out_chs, kernel_size, expansion, stride)

    OPS.register(name, create)
    SHORT_NAMES[name] = f"MB{expansion} {kernel_size}x{kernel_size}"


def _create_skip(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    if in_chs != out_chs or stride != 1:
        raise ValueError(f"skip needs an unchanged shape, got {in_chs}->{out_chs} channels at stride {stride}")
    return Identity()


for _kernel_size in (3, 5, 7):
    for _expansion in (3, 6):
        _register_mbconv(_kernel_size, _expansion)
OPS.register(SKIP, _create_skip)


def create_op(name: str, in_chs: int, out_chs: int, stride: int) -> nn.Module:
    return OPS.get(name)(in_chs, out_chs, stride)

