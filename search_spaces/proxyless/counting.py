"""Parameter and multiply-add counts of networks in the ProxylessNAS space.

Multiply-adds count the multiply-accumulates of convolutions and linear layers only. The
PROXYLESS_GPU network comes to 465.3M this way at 224x224. Counts come from forward hooks on
a single-image forward, which costs no memory or compute for a network built on the meta device.
"""

import torch
from torch import nn

from search_spaces.counting import OpCounter, conv_macs, count_forward_ops, linear_macs
from search_spaces.proxyless.backbone import ProxylessConfig
from search_spaces.proxyless.genotype import Genotype
from search_spaces.proxyless.networks import EvalNetwork
from search_spaces.proxyless.ops import SKIP

IMAGENET_INPUT_SIZE = 224


def count_params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _conv_linear_counter(name: str, module: nn.Module) -> OpCounter | None:
    if isinstance(module, nn.Conv2d):
        return conv_macs
    if isinstance(module, nn.Linear):
        return linear_macs
    return None


def count_madds_m(model: nn.Module, input_size: int, in_chs: int = 3) -> float:
    """Count the conv and linear multiply-adds of one forward of a single image, in millions.

    The model runs in eval mode under no_grad, and every module gets its training flag back.
    """
    return count_forward_ops(model, (in_chs, input_size, input_size), _conv_linear_counter) / 1e6


def build_shape_only(genotype: Genotype, config: ProxylessConfig) -> EvalNetwork:
    """Build an eval network on the meta device, for shapes and counts without weights or compute."""
    with torch.device("meta"):
        return EvalNetwork(genotype, config)


def describe_network(genotype: Genotype, config: ProxylessConfig = ProxylessConfig(),
                     input_size: int = IMAGENET_INPUT_SIZE) -> dict[str, float | int | list[str]]:
    """Return the size of a genotype's eval network.

    Keys: params_m, madds_m (conv+linear at input_size x input_size), layers (the op of each
    searched layer) and active_layers (the searched layers that are not skipped).
    """
    model = build_shape_only(genotype, config)
    return {
        "params_m": count_params_m(model),
        "madds_m": count_madds_m(model, input_size, config.in_chs),
        "layers": list(genotype.layers),
        "active_layers": sum(op != SKIP for op in genotype.layers),
    }
