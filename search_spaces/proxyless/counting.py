"""Parameter and multiply-add counts of networks in the ProxylessNAS space.

Multiply-adds count the multiply-accumulates of convolutions and linear layers only. The
PROXYLESS_GPU network comes to 465.3M this way at 224x224. Counts come from forward hooks on
a single-image forward, which costs no memory or compute for a network built on the meta device.
"""

import torch
from torch import nn

from search_spaces.proxyless.backbone import ProxylessConfig
from search_spaces.proxyless.genotype import Genotype
from search_spaces.proxyless.networks import EvalNetwork
from search_spaces.proxyless.ops import SKIP

IMAGENET_INPUT_SIZE = 224


def count_params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        # Each output element of a grouped conv reads in_channels / groups input channels.
        kernel_elements = module.kernel_size[0] * module.kernel_size[1]
        return output.numel() * (module.in_channels // module.groups) * kernel_elements
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_madds_m(model: nn.Module, input_size: int, in_chs: int = 3) -> float:
    """Count the conv and linear multiply-adds of one forward of a single image, in millions.

    The model runs in eval mode under no_grad, and every module gets its training flag back.
    """
    totals = [0]

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        totals[0] += _macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    modes = {module: module.training for module in model.modules()}
    parameter = next(model.parameters())
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chs, input_size, input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return totals[0] / 1e6


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
