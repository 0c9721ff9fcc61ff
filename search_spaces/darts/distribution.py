"""The architecture distribution of the DARTS space: independent categoricals per edge.

For each cell type, node n and edge e there is an input categorical (n + 2 choices) and an
op categorical (K choices), both with zero-initialised logits. A sample is a flat list of
(B, choices) tensors in a fixed order, one-hot (discrete) or Gumbel-softmax (relaxed); B is
the batch size for per-example sampling and 1 for per-minibatch sampling.
"""

import random

import torch

from search_spaces.categorical import CategoricalArchitecture, Sample
from search_spaces.darts.genotype import CELL_TYPES, EDGES_PER_NODE, NUM_NODES, Edge, Genotype



def categorical_layout() -> list[tuple[str, int, int, str]]:
    """(cell type, node, edge, 'input'|'op') of each categorical, in sample order."""
    return [(cell_type, node, edge, kind)
            for cell_type in CELL_TYPES
            for node in range(NUM_NODES)
            for edge in range(EDGES_PER_NODE)
            for kind in ("input", "op")]


class ArchitectureDistribution(CategoricalArchitecture):
    """Architecture logits (phi) of both cells, with supernet weights and genotype derivation."""

    def __init__(self, op_names: tuple[str, ...], softening_eps: float = 0.0):
        layout = categorical_layout()
        super().__init__([node + 2 if kind == "input" else len(op_names) for _, node, _, kind in layout],
                         softening_eps)
        self.op_names = tuple(op_names)
        self.layout = layout

    def to_weights(self, sample: Sample) -> dict[str, list[torch.Tensor]]:
        """Supernet weights W[n] = sum_e onehot_in[n,e] (outer) onehot_op[n,e], (B, n + 2, K)."""
        weights: dict[str, list[torch.Tensor]] = {cell_type: [] for cell_type in CELL_TYPES}
        for i in range(0, len(sample), 2):
            cell_type, node, edge, _ = self.layout[i]
            outer = sample[i].unsqueeze(2) * sample[i + 1].unsqueeze(1)
            if edge == 0:
                weights[cell_type].append(outer)
            else:
                weights[cell_type][node] = weights[cell_type][node] + outer
        return weights

    def genotype(self) -> Genotype:
        """Derives the genotype: the per-edge argmax of input and op logits."""
        return genotype_from_choices(self.op_names, [int(phi.argmax()) for phi in self.arch_logits])

    def genotype_of(self, sample: Sample, index: int = 0) -> Genotype:
        """Returns the genotype of one example of a one-hot sample."""
        return genotype_from_choices(self.op_names, [int(s[index].argmax()) for s in sample])


def overlap_penalty(sample: Sample) -> torch.Tensor:
    """(B,) sum over nodes of <W[n,0], W[n,1]>: 1 for each node whose edges pick the same pair."""
    total = 0.0
    for i in range(0, len(sample), 2 * EDGES_PER_NODE):
        in0, op0, in1, op1 = sample[i:i + 4]
        total = total + (in0 * in1).sum(-1) * (op0 * op1).sum(-1)
    return total


def genotype_from_choices(op_names: tuple[str, ...], choices: list[int]) -> Genotype:
    """Builds a genotype from one index per categorical, in sample order."""
    cells: dict[str, list[list[Edge]]] = {cell_type: [[] for _ in range(NUM_NODES)] for cell_type in CELL_TYPES}
    layout = categorical_layout()
    for i in range(0, len(layout), 2):
        cell_type, node, _, _ = layout[i]
        cells[cell_type][node].append(Edge(op_names[choices[i + 1]], choices[i]))
    return Genotype(**{cell_type: tuple(tuple(node) for node in nodes) for cell_type, nodes in cells.items()})


def random_genotype(seed: int, op_names: tuple[str, ...]) -> Genotype:
    """Draws a cell pair uniformly (the distribution with zero logits)."""
    rng = random.Random(seed)
    choices = [rng.randrange(node + 2 if kind == "input" else len(op_names)) for _, node, _, kind in categorical_layout()]
    return genotype_from_choices(op_names, choices)
