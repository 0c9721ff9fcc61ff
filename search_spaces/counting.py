"""Operation counts of a network from forward hooks on one single-image forward.

Both search spaces count multiply-adds this way. The forward runs in eval mode under no_grad,
so a network built on the meta device is counted without allocating weights or computing values.
"""

from collections.abc import Callable

import torch
from torch import nn

# The ops of one module's forward, from the module, its first input and its output.
OpCounter = Callable[[nn.Module, torch.Tensor, torch.Tensor], int]
# Picks the counter of a module from its qualified name. None leaves the module out of the count.
CounterChoice = Callable[[str, nn.Module], OpCounter | None]


def conv_macs(module: nn.Conv2d, inputs: torch.Tensor, output: torch.Tensor) -> int:
    # Each output element of a grouped conv reads only in_channels / groups input channels.
    kernel_elements = module.kernel_size[0] * module.kernel_size[1]
    return output.numel() * (module.in_channels // module.groups) * kernel_elements


def linear_macs(module: nn.Linear, inputs: torch.Tensor, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def count_forward_ops(model: nn.Module, input_shape: tuple[int, ...], choose_counter: CounterChoice) -> int:
    """Run one zero image of input_shape (channels, height, width) through the model and sum the hooked counts.

    The model runs in eval mode under no_grad, and afterwards every module gets back its own
    training flag.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32

    totals = [0]
    handles = []
    for name, module in model.named_modules():
        counter = choose_counter(name, module)
        if counter is not None:
            handles.append(module.register_forward_hook(_adding_hook(counter, totals)))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return totals[0]


def _adding_hook(counter: OpCounter, totals: list[int]) -> Callable:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        totals[0] += counter(module, inputs[0], output)

    return hook
