"""The search network (supernet) and the evaluation networks of the DARTS cell space.

Both stack L cells with reductions at L//3 and 2L//3, where the channel count doubles. The
supernet mixes every op on every edge and is driven by architecture weights; the evaluation
network is built from a genotype alone.
"""

from dataclasses import dataclass

import torch
from torch import nn

from search_spaces.darts.cells import EvalCell, SearchCell
from search_spaces.darts.genotype import NUM_NODES, Genotype
from search_spaces.darts.ops import SEARCH_OPS

STEMS = ("cifar", "imagenet")


def reduction_indices(layers: int) -> tuple[int, int]:
    return layers // 3, 2 * layers // 3


def create_stem(kind: str, in_chs: int, chs: int, stem_multiplier: int) -> nn.Module:
    if kind == "cifar":
        out_chs = stem_multiplier * chs
        return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs))
    if kind == "imagenet":
        return ImageNetStem(in_chs, chs)
    raise ValueError(f"unknown stem {kind!r}; valid stems: {', '.join(STEMS)}")


class ImageNetStem(nn.Module):
    """Three stride-2 3x3 convs (/8); returns the outputs after two and after three of them."""

    def __init__(self, in_chs: int, chs: int):
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_chs, chs // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(chs // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(chs // 2, chs, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(chs),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(chs, chs, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(chs),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


def _run_stem(stem: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = stem(x)
    return out if isinstance(out, tuple) else (out, out)


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of a network in this space; the same fields for the supernet and evaluation nets."""

    chs: int
    layers: int
    num_classes: int
    in_chs: int = 3
    stem: str = "cifar"
    stem_multiplier: int = 3


def _cell_channels(config: NetworkConfig):
    """Yields (prev_prev_chs, prev_chs, chs, reduction, reduction_prev) for each cell."""
    if config.stem == "cifar":
        prev_prev_chs = prev_chs = config.stem_multiplier * config.chs
        reduction_prev = False
    else:
        # The ImageNet stem's last conv strides, so the first cell receives a reduced c(k-2).
        prev_prev_chs = prev_chs = config.chs
        reduction_prev = True
    chs = config.chs
    reductions = reduction_indices(config.layers)
    for index in range(config.layers):
        reduction = index in reductions
        if reduction:
            chs *= 2
        yield prev_prev_chs, prev_chs, chs, reduction, reduction_prev
        prev_prev_chs, prev_chs, reduction_prev = prev_chs, NUM_NODES * chs, reduction


class SearchNetwork(nn.Module):
    """The weight-sharing supernet; BatchNorm without affine parameters, as in the search."""

    def __init__(self, config: NetworkConfig, op_names: tuple[str, ...] = SEARCH_OPS):
        super().__init__()
        self.config = config
        self.op_names = tuple(op_names)
        self.stem = create_stem(config.stem, config.in_chs, config.chs, config.stem_multiplier)
        self.cells = nn.ModuleList(
            SearchCell(self.op_names, *channels) for channels in _cell_channels(config)
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        last_chs = list(_cell_channels(config))[-1][2]
        self.classifier = nn.Linear(NUM_NODES * last_chs, config.num_classes)

    def forward(self, x: torch.Tensor, weights: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """weights['normal'|'reduce'][n]: (B or 1, n + 2, K) architecture weights of node n."""
        s0, s1 = _run_stem(self.stem, x)
        for cell in self.cells:
            cell_weights = weights["reduce" if cell.reduction else "normal"]
            s0, s1 = s1, cell(s0, s1, cell_weights)
        return self.classifier(self.global_pool(s1).flatten(1))


class AuxiliaryHead(nn.Module):
    """Extra classifier after cell 2L//3, used in training only.

    It pools to 2x2 adaptively so it also fits small inputs; it is excluded from param counts.
    """

    def __init__(self, chs: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
            nn.Conv2d(chs, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """A network of discrete cells from a genotype, with auxiliary head and drop path."""

    def __init__(self, genotype: Genotype, config: NetworkConfig, auxiliary: bool = False):
        super().__init__()
        self.genotype = genotype
        self.config = config
        self.stem = create_stem(config.stem, config.in_chs, config.chs, config.stem_multiplier)
        self.cells = nn.ModuleList()
        self.auxiliary_head = None
        aux_index = reduction_indices(config.layers)[1]
        for index, (prev_prev, prev, chs, reduction, reduction_prev) in enumerate(_cell_channels(config)):
            nodes = genotype.reduce if reduction else genotype.normal
            self.cells.append(EvalCell(nodes, prev_prev, prev, chs, reduction, reduction_prev))
            if auxiliary and index == aux_index:
                self.auxiliary_head = AuxiliaryHead(NUM_NODES * chs, config.num_classes)
        self.aux_index = aux_index
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(NUM_NODES * chs, config.num_classes)

    def set_drop_path_prob(self, drop_prob: float) -> None:
        for cell in self.cells:
            cell.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the logits and, in training mode with an auxiliary head, the auxiliary logits."""
        aux_logits = None
        s0, s1 = _run_stem(self.stem, x)
        for index, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if index == self.aux_index and self.auxiliary_head is not None and self.training:
                aux_logits = self.auxiliary_head(s1)
        return self.classifier(self.global_pool(s1).flatten(1)), aux_logits
