"""The DARTS cell search space as UNAS uses it (7 ops, 4 nodes, two (input, op) edges per node)."""

from search_spaces.darts.distribution import (
    ArchitectureDistribution,
    genotype_from_choices,
    overlap_penalty,
    random_genotype,
)
from search_spaces.darts.genotype import (
    CELL_TYPES,
    NUM_NODES,
    Edge,
    Genotype,
    genotype_from_dict,
    genotype_from_json,
    load_genotype,
)
from search_spaces.darts.known import GENOTYPES, get_genotype
from search_spaces.darts.networks import EvalNetwork, NetworkConfig, SearchNetwork, reduction_indices
from search_spaces.darts.ops import IMAGENET_SEARCH_OPS, OPS, SEARCH_OPS

__all__ = [
    "CELL_TYPES", "GENOTYPES", "IMAGENET_SEARCH_OPS", "NUM_NODES", "OPS", "SEARCH_OPS",
    "ArchitectureDistribution", "Edge", "EvalNetwork", "Genotype", "NetworkConfig", "SearchNetwork",
    "genotype_from_choices", "genotype_from_dict", "genotype_from_json", "get_genotype", "load_genotype",
    "overlap_penalty", "random_genotype", "reduction_indices",
]
