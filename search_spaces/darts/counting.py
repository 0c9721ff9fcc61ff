"""Parameter and multiply-add counts of DARTS-space networks, and the ImageNet channel choice.

Two multiply-add conventions are supported:

- ``"conv_linear"``: multiply-accumulates of convolutions and linear layers only.
- ``"paper"``: the conv+linear count plus these extra ops. Each ReLU output element counts
  one, each BatchNorm output element two, each input element of a pooling layer one (the
  global average pool included) and each output element of a conv with a bias one. The
  reference multiply-add figures of the UNAS ImageNet networks use this convention, and so
  does the ImageNet channel choice.

Each detail of the "paper" convention matters. Any one of these changes moves at least one
of the six ImageNet networks built from ``GENOTYPES`` off its reference figure at 0.1M
precision: leaving out the global pool, the stem ReLUs or the second BatchNorm op, or
counting pool outputs instead of inputs.

Counts come from forward hooks on a single-image forward in eval mode, so drop path is off,
and every module under ``auxiliary_head`` is left out.
"""

import torch
from torch import nn

from search_spaces.counting import OpCounter, conv_macs, count_forward_ops, linear_macs
from search_spaces.darts.genotype import Genotype
from search_spaces.darts.networks import EvalNetwork, NetworkConfig

MADDS_CONVENTIONS = ("conv_linear", "paper")
DATASETS = ("cifar10", "cifar100", "imagenet")

AUXILIARY_PREFIX = "auxiliary_head"

CIFAR_CHANNELS = 36
CIFAR_LAYERS = 20
CIFAR_INPUT_SIZE = 32
IMAGENET_LAYERS = 14
IMAGENET_INPUT_SIZE = 224
IMAGENET_MIN_CHANNELS = 30
IMAGENET_MAX_CHANNELS = 70  # exclusive
IMAGENET_MADDS_BUDGET_M = 600.0

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

def _is_auxiliary(name: str) -> bool:
    return name == AUXILIARY_PREFIX or name.startswith(AUXILIARY_PREFIX + ".")


def count_params_m(model: nn.Module) -> float:
    """Count the parameters of a model in millions, leaving out the auxiliary head."""
    total = sum(p.numel() for name, p in model.named_parameters() if not _is_auxiliary(name))
    return total / 1e6


def _conv_paper_ops(module: nn.Conv2d, inputs: torch.Tensor, output: torch.Tensor) -> int:
    bias_ops = output.numel() if module.bias is not None else 0
    return conv_macs(module, inputs, output) + bias_ops


def _relu_ops(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    return output.numel()


def _batch_norm_ops(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    # One subtract-and-scale for the normalisation and one multiply-add for the affine step.
    return 2 * output.numel()


def _pool_ops(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    return inputs.numel()


def _counter_for(module: nn.Module, convention: str) -> OpCounter | None:
    if isinstance(module, nn.Conv2d):
        return _conv_paper_ops if convention == "paper" else conv_macs
    if isinstance(module, nn.Linear):
        return linear_macs
    if convention != "paper":
        return None
    if isinstance(module, nn.ReLU):
        return _relu_ops
    if isinstance(module, nn.BatchNorm2d):
        return _batch_norm_ops
    if isinstance(module, _POOLS):
        return _pool_ops
    return None


def _input_shape(model: nn.Module, input_size: int | tuple[int, ...]) -> tuple[int, int, int]:
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if len(input_size) == 3:
        return tuple(input_size)
    if len(input_size) != 2:
        raise ValueError(
            f"invalid input_size {input_size!r}; pass a side, (height, width) or (channels, height, width)"
        )
    # Networks of this space carry their input channel count in their config.
    in_chs = getattr(getattr(model, "config", None), "in_chs", 3)
    return (in_chs, *input_size)


def count_madds_m(model: nn.Module, input_size: int | tuple[int, ...], convention: str) -> float:
    """Count the multiply-adds of one forward of a single image in millions.

    input_size is the image side, (height, width) or (channels, height, width). Without
    channels the count uses the model's config.in_chs, or 3 when the model has no config.
    The model runs in eval mode under no_grad, and afterwards every module gets back its
    own training flag.
    """
    if convention not in MADDS_CONVENTIONS:
        raise ValueError(f"unknown multiply-add convention {convention!r}; valid: {', '.join(MADDS_CONVENTIONS)}")
    shape = _input_shape(model, input_size)

    def choose_counter(name: str, module: nn.Module) -> OpCounter | None:
        return None if _is_auxiliary(name) else _counter_for(module, convention)

    return count_forward_ops(model, shape, choose_counter) / 1e6


def _imagenet_config(chs: int, num_classes: int) -> NetworkConfig:
    return NetworkConfig(chs=chs, layers=IMAGENET_LAYERS, num_classes=num_classes, stem="imagenet")


def _build_shape_only(genotype: Genotype, config: NetworkConfig) -> EvalNetwork:
    # Counting needs shapes only. On the meta device the network allocates no weights and its
    # forward computes no values, which keeps a 224x224 count cheap.
    with torch.device("meta"):
        return EvalNetwork(genotype, config)


def select_imagenet_channels(genotype: Genotype, num_classes: int = 1000,
                             budget_m: float = IMAGENET_MADDS_BUDGET_M) -> int:
    """Return the largest even C in [30, 70) whose ImageNet eval net stays under budget_m.

    The budget is in millions of multiply-adds, counted with the "paper" convention at
    224x224 input. Raises ValueError when even C = 30 does not fit under it.
    """
    # Multiply-adds grow with C, so a binary search over the even candidates suffices.
    candidates = list(range(IMAGENET_MIN_CHANNELS, IMAGENET_MAX_CHANNELS, 2))
    low, high = 0, len(candidates) - 1
    best = None
    while low <= high:
        middle = (low + high) // 2
        chs = candidates[middle]
        model = _build_shape_only(genotype, _imagenet_config(chs, num_classes))
        if count_madds_m(model, IMAGENET_INPUT_SIZE, "paper") < budget_m:
            best = chs
            low = middle + 1
        else:
            high = middle - 1
    if best is None:
        raise ValueError(
            f"no even channel count in [{IMAGENET_MIN_CHANNELS}, {IMAGENET_MAX_CHANNELS}) keeps the ImageNet "
            f"network under {budget_m}M multiply-adds; raise budget_m"
        )
    return best


def describe_network(genotype: Genotype, dataset: str) -> dict[str, float | int]:
    """Return the size of the evaluation network of a genotype on a dataset.

    Keys: params_m, madds_m (conv+linear), madds_paper_m, channels, layers.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    num_classes = _NUM_CLASSES[dataset]
    if dataset == "imagenet":
        chs = select_imagenet_channels(genotype, num_classes)
        config = _imagenet_config(chs, num_classes)
        input_size = IMAGENET_INPUT_SIZE
    else:
        config = NetworkConfig(chs=CIFAR_CHANNELS, layers=CIFAR_LAYERS, num_classes=num_classes)
        input_size = CIFAR_INPUT_SIZE
    model = _build_shape_only(genotype, config)
    return {
        "params_m": count_params_m(model),
        "madds_m": count_madds_m(model, input_size, "conv_linear"),
        "madds_paper_m": count_madds_m(model, input_size, "paper"),
        "channels": config.chs,
        "layers": config.layers,
    }
