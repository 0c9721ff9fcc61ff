"""The ProxylessNAS search space: a MobileNetV2 backbone with 21 searched MBConv-or-skip layers."""

from search_spaces.proxyless.backbone import (
    FULL_LAYERS_PER_STAGE,
    LayerSpec,
    ProxylessConfig,
    layer_specs,
    searched_layer_count,
    skip_allowed,
)
from search_spaces.proxyless.counting import count_madds_m, count_params_m, describe_network
from search_spaces.proxyless.distribution import (
    ArchitectureDistribution,
    genotype_to_sample,
    random_genotype,
)
from search_spaces.proxyless.genotype import (
    Genotype,
    allowed_ops,
    choice_counts,
    genotype_from_choices,
    genotype_from_dict,
    genotype_from_json,
    load_genotype,
    validate_genotype,
)
from search_spaces.proxyless.known import GENOTYPES, get_genotype
from search_spaces.proxyless.networks import EvalNetwork, MixedLayer, SearchNetwork
from search_spaces.proxyless.ops import MBCONV_OPS, OPS, SEARCH_OPS, SKIP

__all__ = [
    "FULL_LAYERS_PER_STAGE", "GENOTYPES", "MBCONV_OPS", "OPS", "SEARCH_OPS", "SKIP",
    "ArchitectureDistribution", "EvalNetwork", "Genotype", "LayerSpec", "MixedLayer", "ProxylessConfig",
    "SearchNetwork", "allowed_ops", "choice_counts", "count_madds_m", "count_params_m", "describe_network",
    "genotype_from_choices", "genotype_from_dict", "genotype_from_json", "genotype_to_sample", "get_genotype",
    "layer_specs", "load_genotype", "random_genotype", "searched_layer_count", "skip_allowed", "validate_genotype",
]
