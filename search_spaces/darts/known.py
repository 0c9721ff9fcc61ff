"""Published genotypes by name, in (op, input) pairs per node (nodes 2..5)."""

from search_spaces.darts.genotype import Genotype, genotype_from_dict
from search_spaces.registry import Registry

GENOTYPES: Registry[Genotype] = Registry("genotype")

_OPS_BY_SHORT_NAME = {
    "skip": "skip_connect",
    "sep3": "sep_conv_3x3",
    "max": "max_pool_3x3",
    "dil3": "dil_conv_3x3",
    "sep5": "sep_conv_5x5",
    "avg": "avg_pool_3x3",
    "sep7": "sep_conv_7x7",
    "dil5": "dil_conv_5x5",
}


def _register(name: str, normal: str, reduce: str) -> None:
    GENOTYPES.register(name, genotype_from_dict({"normal": _parse_short(normal), "reduce": _parse_short(reduce)}))


def _parse_short(cell: str) -> list[list[list]]:
    """Reads 'sep5 0, skip 0; ...': nodes separated by ';', edges by ','."""
    nodes = []
    for node in cell.split(";"):
        edges = []
        for edge in node.split(","):
            op, source = edge.split()
            edges.append([_OPS_BY_SHORT_NAME[op], int(source)])
        nodes.append(edges)
    return nodes


_register(
    "UNAS_CIFAR10",
    "sep5 0, skip 0; skip 0, dil3 1; sep3 0, dil3 1; sep3 1, dil3 0",
    "sep3 0, sep5 0; skip 1, sep3 0; avg 1, skip 0; sep5 3, avg 1",
)
_register(
    "UNAS_CIFAR100",
    "sep3 0, dil3 0; dil3 1, sep3 0; skip 0, sep3 1; sep5 1, sep3 0",
    "sep7 0, sep3 0; sep3 1, sep5 0; sep7 1, dil3 0; dil3 0, sep3 3",
)
_register(
    "UNAS_IMAGENET",
    "sep3 0, skip 0; sep3 0, skip 1; sep3 1, sep5 0; sep3 0, dil3 1",
    "sep5 0, sep3 1; sep5 0, sep3 1; sep5 1, dil3 0; dil3 3, sep3 1",
)
_register(
    "DARTS_V2",
    "sep3 0, sep3 1; sep3 0, sep3 1; sep3 1, skip 0; skip 0, dil3 2",
    "max 0, max 1; skip 2, max 1; max 0, skip 2; skip 2, max 1",
)
_register(
    "DARTS_V1",
    "sep3 1, sep3 0; skip 0, sep3 1; skip 0, sep3 1; sep3 0, skip 2",
    "max 0, max 1; skip 2, max 0; max 0, skip 2; skip 2, avg 0",
)
_register(
    "PDARTS",
    "skip 0, dil3 1; skip 0, sep3 1; sep3 1, sep3 3; sep3 0, dil5 4",
    "avg 0, sep5 1; sep3 0, dil5 2; max 0, dil3 1; dil3 1, dil5 3",
)


def get_genotype(name: str) -> Genotype:
    return GENOTYPES.get(name)
