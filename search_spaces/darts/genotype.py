"""Genotypes of the DARTS cell space: immutable values that round-trip through JSON.

A cell has NUM_NODES intermediate nodes, numbered as states 2..5 after the two cell inputs
(state 0 = c(k-2), state 1 = c(k-1)). Each node has two edges, each an (op, input) pair,
and the cell output concatenates all nodes.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_spaces.darts.ops import OPS, SHORT_NAMES
from search_spaces.errors import GenotypeError

NUM_NODES = 4
EDGES_PER_NODE = 2
CELL_TYPES = ("normal", "reduce")


@dataclass(frozen=True)
class Edge:
    op: str
    input: int


Node = tuple[Edge, Edge]


@dataclass(frozen=True)
class Genotype:
    normal: tuple[Node, ...]
    reduce: tuple[Node, ...]

    def cell(self, cell_type: str) -> tuple[Node, ...]:
        return self.normal if cell_type == "normal" else self.reduce

    def to_dict(self) -> dict[str, Any]:
        return {cell_type: [[[edge.op, edge.input] for edge in node] for node in self.cell(cell_type)]
                for cell_type in CELL_TYPES}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def describe(self) -> str:
        """One line per cell in the short notation of the paper's tables."""
        lines = []
        for cell_type in CELL_TYPES:
            nodes = " | ".join(
                ",".join(f"({SHORT_NAMES.get(e.op, e.op)},{e.input})" for e in node) for node in self.cell(cell_type)
            )
            lines.append(f"{cell_type}: {nodes}")
        return "\n".join(lines)


def genotype_from_dict(data: Any, allowed_ops: tuple[str, ...] | None = None) -> Genotype:
    """Builds a validated genotype; every problem is named by cell, node and edge."""
    if not isinstance(data, dict):
        raise GenotypeError(f"a genotype is an object with keys 'normal' and 'reduce', got {type(data).__name__}")
    missing = [cell_type for cell_type in CELL_TYPES if cell_type not in data]
    if missing:
        raise GenotypeError(f"genotype is missing the cell(s) {missing}; expected keys 'normal' and 'reduce'")
    cells = {cell_type: _parse_cell(cell_type, data[cell_type], allowed_ops) for cell_type in CELL_TYPES}
    return Genotype(**cells)


def genotype_from_json(text: str, allowed_ops: tuple[str, ...] | None = None) -> Genotype:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise GenotypeError(f"genotype is not valid JSON: {error}") from None
    return genotype_from_dict(data, allowed_ops)


def load_genotype(path: str | Path, allowed_ops: tuple[str, ...] | None = None) -> Genotype:
    return genotype_from_json(Path(path).read_text(), allowed_ops)


def _parse_cell(cell_type: str, nodes: Any, allowed_ops: tuple[str, ...] | None) -> tuple[Node, ...]:
    if not isinstance(nodes, list | tuple) or len(nodes) != NUM_NODES:
        count = len(nodes) if isinstance(nodes, list | tuple) else type(nodes).__name__
        raise GenotypeError(f"{cell_type} cell: expected {NUM_NODES} nodes, got {count}")
    return tuple(_parse_node(cell_type, index, node, allowed_ops) for index, node in enumerate(nodes))


def _parse_node(cell_type: str, index: int, node: Any, allowed_ops: tuple[str, ...] | None) -> Node:
    state = index + 2
    where = f"{cell_type} cell node {state}"
    if not isinstance(node, list | tuple) or len(node) != EDGES_PER_NODE:
        raise GenotypeError(f"{where}: expected {EDGES_PER_NODE} edges as [op, input] pairs, got {node!r}")
    edges = tuple(_parse_edge(f"{where} edge {e}", state, edge, allowed_ops) for e, edge in enumerate(node))
    return edges  # type: ignore[return-value]


def _parse_edge(where: str, state: int, edge: Any, allowed_ops: tuple[str, ...] | None) -> Edge:
    if not isinstance(edge, list | tuple) or len(edge) != 2:
        raise GenotypeError(f"{where}: expected an [op, input] pair, got {edge!r}")
    op, source = edge
    valid_ops = tuple(allowed_ops) if allowed_ops is not None else tuple(OPS.names())
    if op not in valid_ops:
        raise GenotypeError(f"{where}: unknown op {op!r}; valid ops: {', '.join(valid_ops)}")
    if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < state:
        raise GenotypeError(f"{where}: input {source!r} is out of range; node {state} takes inputs 0..{state - 1}")
    return Edge(op, source)
