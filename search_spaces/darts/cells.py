"""Cells of the DARTS space: the weight-sharing search cell and the discrete evaluation cell."""

import torch
from torch import nn

from search_spaces.darts.genotype import NUM_NODES, Node
from search_spaces.darts.ops import FactorizedReduce, ReLUConvBN, create_op, is_parameter_free_identity


def create_preprocess(in_chs: int, out_chs: int, reduction_prev: bool, affine: bool) -> nn.Module:
    if reduction_prev:
        return FactorizedReduce(in_chs, out_chs, affine)
    return ReLUConvBN(in_chs, out_chs, 1, 1, 0, affine)


class MixedEdge(nn.Module):
    """All candidate ops on one (input state -> node) edge, mixed by per-example weights."""

    def __init__(self, op_names: tuple[str, ...], chs: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleList(create_op(name, chs, stride, affine=False) for name in op_names)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        # weights: (B or 1, K). Ops whose weight is zero for the whole batch are skipped, which
        # makes discrete forwards cost one op per edge instead of K.
        active = (weights != 0).any(dim=0).tolist()
        out = None
        for k, op in enumerate(self.ops):
            if not active[k]:
                continue
            term = weights[:, k].view(-1, 1, 1, 1) * op(x)
            out = term if out is None else out + term
        return out


class SearchCell(nn.Module):
    """A cell whose every node mixes every op on every earlier state (14 mixed edges)."""

    def __init__(self, op_names: tuple[str, ...], prev_prev_chs: int, prev_chs: int, chs: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = create_preprocess(prev_prev_chs, chs, reduction_prev, affine=False)
        self.preprocess1 = ReLUConvBN(prev_chs, chs, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        for node in range(NUM_NODES):
            for source in range(node + 2):
                stride = 2 if reduction and source < 2 else 1
                self.edges.append(MixedEdge(op_names, chs, stride))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """weights[n]: (B or 1, n + 2, K), the weight of each (input, op) pair at node n."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        edge_index = 0
        for node in range(NUM_NODES):
            node_value = None
            for source, state in enumerate(states):
                term = self.edges[edge_index](state, weights[node][:, source])
                edge_index += 1
                if term is not None:
                    node_value = term if node_value is None else node_value + term
            if node_value is None:
                raise ValueError(f"node {node + 2} received all-zero architecture weights")
            states.append(node_value)
        return torch.cat(states[2:], dim=1)


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zeroes whole examples with probability drop_prob and rescales the rest."""
    keep_prob = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep_prob)
    return x * mask / keep_prob


class EvalCell(nn.Module):
    """A discrete cell built from a genotype alone."""

    def __init__(self, nodes: tuple[Node, ...], prev_prev_chs: int, prev_chs: int, chs: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = create_preprocess(prev_prev_chs, chs, reduction_prev, affine=True)
        self.preprocess1 = ReLUConvBN(prev_chs, chs, 1, 1, 0, affine=True)
        self.sources = [edge.input for node in nodes for edge in node]
        self.droppable = []
        self.ops = nn.ModuleList()
        for node in nodes:
            for edge in node:
                stride = 2 if reduction and edge.input < 2 else 1
                self.ops.append(create_op(edge.op, chs, stride, affine=True))
                self.droppable.append(not is_parameter_free_identity(edge.op, stride))
        self.drop_prob = 0.0

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(NUM_NODES):
            node_value = 0
            for e in (2 * node, 2 * node + 1):
                h = self.ops[e](states[self.sources[e]])
                if self.training and self.drop_prob > 0 and self.droppable[e]:
                    h = drop_path(h, self.drop_prob)
                node_value = node_value + h
            states.append(node_value)
        return torch.cat(states[2:], dim=1)
