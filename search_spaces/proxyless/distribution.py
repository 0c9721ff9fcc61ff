"""The architecture distribution of the ProxylessNAS space: one categorical per searched layer.

Layer l has 7 choices (``SEARCH_OPS``) where skip is allowed and 6 (``MBCONV_OPS``) elsewhere,
with zero-initialised logits. A sample is a list of (B, choices) tensors in layer order,
one-hot (discrete) or Gumbel-softmax (relaxed); B is the batch size for per-example sampling
and 1 for per-minibatch sampling. The supernet takes a sample as its architecture weights.
"""

import random

import torch
from torch import nn

from search_spaces.categorical import CategoricalArchitecture, Sample
from search_spaces.proxyless.backbone import FULL_LAYERS_PER_STAGE, searched_layer_count
from search_spaces.proxyless.genotype import Genotype, allowed_ops, choice_counts, genotype_from_choices
from search_spaces.proxyless.ops import SKIP


class ArchitectureDistribution(CategoricalArchitecture):
    """Architecture logits (phi) of the searched layers, with skip counting and genotype derivation."""

    def __init__(self, layers_per_stage: int = FULL_LAYERS_PER_STAGE, softening_eps: float = 0.0):
        super().__init__(choice_counts(layers_per_stage), softening_eps)
        self.layers_per_stage = layers_per_stage

    def expected_skips(self) -> float:
        """Expected number of skipped layers under the (softened) distribution."""
        total = 0.0
        for index, logits in enumerate(self.normalized_logits()):
            ops = allowed_ops(index, self.layers_per_stage)
            if SKIP in ops:
                total += float(torch.softmax(logits.detach(), -1)[ops.index(SKIP)])
        return total

    def genotype(self) -> Genotype:
        """Return the genotype of the per-layer argmax of the logits."""
        return genotype_from_choices([int(phi.argmax()) for phi in self.arch_logits])

    def genotype_of(self, sample: Sample, index: int = 0) -> Genotype:
        """Return the genotype of example ``index`` of a sample, taking the argmax of relaxed vectors."""
        return genotype_from_choices([int(s[index].argmax()) for s in sample])


def genotype_to_sample(genotype: Genotype, layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> Sample:
    """Return the one-hot sample of a genotype, (1, choices) per layer, to run it through the supernet."""
    sample = []
    for index, op in enumerate(genotype.layers):
        ops = allowed_ops(index, layers_per_stage)
        sample.append(nn.functional.one_hot(torch.tensor([ops.index(op)]), len(ops)).float())
    return sample


def random_genotype(seed: int, layers_per_stage: int = FULL_LAYERS_PER_STAGE,
                    skip_prob: float | None = None) -> Genotype:
    """A network drawn layer by layer from a seeded generator.

    With skip_prob None every allowed op is equally likely (the uniform distribution). With a
    value, layers that may skip do so with that probability and otherwise pick an MBConv op
    uniformly. Spreading skip_prob over [0, 1) gives networks of clearly different depths.
    """
    rng = random.Random(seed)
    layers = []
    for index in range(searched_layer_count(layers_per_stage)):
        ops = allowed_ops(index, layers_per_stage)
        if skip_prob is not None and SKIP in ops:
            op = SKIP if rng.random() < skip_prob else rng.choice([name for name in ops if name != SKIP])
        else:
            op = rng.choice(ops)
        layers.append(op)
    return Genotype(tuple(layers))
