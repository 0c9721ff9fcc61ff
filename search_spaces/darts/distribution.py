"""The architecture distribution of the DARTS space: independent categoricals per edge.

For each cell type, node n and edge e there is an input categorical (n + 2 choices) and an
op categorical (K choices), both with zero-initialised logits. A sample is a flat list of
(B, choices) tensors in a fixed order, one-hot (discrete) or Gumbel-softmax (relaxed); B is
the batch size for per-example sampling and 1 for per-minibatch sampling.
"""

import random

import torch
from torch import nn

from search_spaces.darts.genotype import CELL_TYPES, EDGES_PER_NODE, NUM_NODES, Edge, Genotype

Sample = list[torch.Tensor]


def categorical_layout() -> list[tuple[str, int, int, str]]:
    """(cell type, node, edge, 'input'|'op') of each categorical, in sample order."""
    return [(cell_type, node, edge, kind)
            for cell_type in CELL_TYPES
            for node in range(NUM_NODES)
            for edge in range(EDGES_PER_NODE)
            for kind in ("input", "op")]


class ArchitectureDistribution(nn.Module):
    """Architecture logits (phi) with sampling, log-probability, entropy and genotype derivation."""

    def __init__(self, op_names: tuple[str, ...], softening_eps: float = 0.0):
        super().__init__()
        self.op_names = tuple(op_names)
        self.softening_eps = softening_eps
        self.layout = categorical_layout()
        self.arch_logits = nn.ParameterList(
            nn.Parameter(torch.zeros(node + 2 if kind == "input" else len(self.op_names)))
            for _, node, _, kind in self.layout
        )

    def normalized_logits(self) -> list[torch.Tensor]:
        """Log-probabilities, softened to log(softmax(phi) + eps) when eps > 0."""
        if self.softening_eps > 0:
            return [torch.log(torch.softmax(phi, -1) + self.softening_eps) for phi in self.arch_logits]
        return [torch.log_softmax(phi, -1) for phi in self.arch_logits]

    def sample_discrete(self, batch_size: int, generator: torch.Generator | None = None) -> Sample:
        sample = []
        for logits in self.normalized_logits():
            # Drawn on the CPU so that a CPU generator serves any device.
            probs = torch.softmax(logits.detach().cpu(), -1).expand(batch_size, -1)
            index = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            sample.append(nn.functional.one_hot(index, logits.numel()).to(logits))
        return sample

    def sample_relaxed(self, batch_size: int, tau: float, generator: torch.Generator | None = None) -> Sample:
        """Gumbel-softmax samples at temperature tau, differentiable in the logits."""
        sample = []
        for logits in self.normalized_logits():
            uniform = torch.rand(batch_size, logits.numel(), generator=generator).clamp_(1e-10, 1 - 1e-7)
            gumbel = -torch.log(-torch.log(uniform)).to(logits.device)
            sample.append(torch.softmax((logits + gumbel) / tau, -1))
        return sample

    def log_prob(self, sample: Sample) -> torch.Tensor:
        """(B,) log q(z) of one-hot samples."""
        return sum((s * torch.log_softmax(logits, -1)).sum(-1) for s, logits in zip(sample, self.normalized_logits()))

    def entropy(self) -> torch.Tensor:
        total = 0.0
        for logits in self.normalized_logits():
            log_probs = torch.log_softmax(logits, -1)
            total = total - (log_probs.exp() * log_probs).sum()
        return total

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
