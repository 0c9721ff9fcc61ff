"""Published networks of the ProxylessNAS space by name, one op per searched layer (layers 1..21).

- PROXYLESS_GPU: the GPU model of ProxylessNAS (Cai, Zhu and Han, ICLR 2019), 7.120M params.
- UNAS: the network UNAS found in this space with a GPU latency objective (Vahdat et al.,
  CVPR 2020), 5.966M params.

The layer choices follow the genotype lists published with the UNAS code (NVlabs/unas,
proxylessnas/genotypes.py), which number the same 21 layers. Both networks reproduce their
published parameter counts to 0.01% with the eval network of this package at 1000 classes.
"""

from search_spaces.proxyless.genotype import Genotype, genotype_from_dict
from search_spaces.registry import Registry

GENOTYPES: Registry[Genotype] = Registry("genotype")

_OPS_BY_SHORT_NAME = {
    "skip": "skip",
    "k3e3": "mbconv_k3_e3",
    "k3e6": "mbconv_k3_e6",
    "k5e3": "mbconv_k5_e3",
    "k5e6": "mbconv_k5_e6",
    "k7e3": "mbconv_k7_e3",
    "k7e6": "mbconv_k7_e6",
}


def _register(name: str, stages: str) -> None:
    """Register a network written as 'k5e3 skip skip skip | k7e3 ...': stages split by '|'."""
    layers = [_OPS_BY_SHORT_NAME[op] for op in stages.replace("|", " ").split()]
    GENOTYPES.register(name, genotype_from_dict({"layers": layers}))


_register(
    "PROXYLESS_GPU",
    "k5e3 skip skip skip | k7e3 skip skip k3e3 | k7e6 skip skip k5e3 | k5e6 skip k3e3 k5e3 | k7e6 k7e6 k7e6 k5e6 | k7e6",
)
_register(
    "UNAS",
    "k5e3 k3e3 skip skip | k7e3 skip skip skip | k7e3 k3e3 k3e3 k3e3 | k5e3 k3e3 k3e3 k3e3 | k7e6 k7e3 k7e3 k7e3 | k7e6",
)


def get_genotype(name: str) -> Genotype:
    return GENOTYPES.get(name)
