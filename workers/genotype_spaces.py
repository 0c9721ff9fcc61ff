"""The genotypes of each search space and the evaluation networks built from them, behind one interface.

A job uses its `GenotypeSpace` (from `JobSpec.genotype_space`) to parse genotype JSON, look up
named genotypes, draw random ones, build and count the evaluation network, name the run's
params and draw the genotype. The driver, the planner and the evaluation trials share it, so
no other module branches on the space.

Every evaluation network follows the DARTS network's training interface, which the evaluation
loop uses: forward returns (logits, auxiliary logits or None), and set_drop_path_prob sets the
drop-path probability.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from search_spaces import darts, proxyless
from search_spaces.darts.counting import count_madds_m, count_params_m
from search_spaces.darts.drawing import draw_genotype
from search_spaces.registry import Registry
from workers.config import DataConfig, EvalRecipe, SearchConfig
from workers.data import describe_dataset
from workers.evaluate import build_eval_network
from workers.search import search_ops

# The named genotypes of each space, to point a name of the other space at the right one.
_NAMED_BY_SPACE: dict[str, Registry] = {"darts": darts.GENOTYPES, "proxyless": proxyless.GENOTYPES}
# Recipe fields that only the DARTS network uses, beside drop_path and auxiliary_weight.
DARTS_SHAPE_FIELDS = ("chs", "layers")


class GenotypeSpace(Protocol):
    """The operations a job needs from the search space whose genotypes it evaluates."""

    name: str
    can_draw: bool

    def parse_genotype(self, text: str) -> Any: ...

    def named_problem(self, name: str) -> str | None: ...

    def named_genotype(self, name: str) -> Any: ...

    def random_genotype(self, seed: int) -> Any: ...

    def recipe_problems(self, fields_set: set[str], recipe: dict[str, Any]) -> list[str]: ...

    def build_network(self, genotype: Any, recipe: EvalRecipe, data: DataConfig) -> nn.Module: ...

    def network_sizes(self, genotype: Any, recipe: EvalRecipe, data: DataConfig) -> dict[str, float]: ...

    def run_params(self, recipe: EvalRecipe) -> dict[str, Any]: ...

    def draw_genotype(self, genotype: Any, path: str | Path) -> None: ...


def _unknown_name_problem(name: str, space: str) -> str:
    """Return the reason a name is missing from a space's registry, naming the space that has it."""
    valid = ", ".join(_NAMED_BY_SPACE[space].names())
    for other, registry in _NAMED_BY_SPACE.items():
        if other != space and name in registry:
            return (f"is a genotype of the {other} space, but this job evaluates the {space} space "
                    f"(search.space); valid: {valid}")
    return f"is not a known genotype; valid: {valid}"


@dataclass(frozen=True)
class DartsSpace:
    """Cell pairs of the DARTS space. Random cells draw their ops from the op list the search would use."""

    dataset: str = "digits"
    search_ops: tuple[str, ...] | None = None  # None: the space's default op list for the data set

    name = "darts"
    can_draw = True

    def parse_genotype(self, text: str) -> darts.Genotype:
        return darts.genotype_from_json(text)

    def named_problem(self, name: str) -> str | None:
        return None if name in darts.GENOTYPES else _unknown_name_problem(name, self.name)

    def named_genotype(self, name: str) -> darts.Genotype:
        return darts.get_genotype(name)

    def random_genotype(self, seed: int) -> darts.Genotype:
        return darts.random_genotype(seed, search_ops(SearchConfig(ops=self.search_ops), self.dataset))

    def recipe_problems(self, fields_set: set[str], recipe: dict[str, Any]) -> list[str]:
        return []

    def build_network(self, genotype: darts.Genotype, recipe: EvalRecipe, data: DataConfig) -> nn.Module:
        return build_eval_network(genotype, recipe, data)

    def network_sizes(self, genotype: darts.Genotype, recipe: EvalRecipe, data: DataConfig) -> dict[str, float]:
        """Return params_m (auxiliary head excluded), madds_m (conv+linear) and madds_paper_m."""
        network = build_eval_network(genotype, recipe, data)
        image_size = describe_dataset(data.name, data.root).image_size
        return {
            "params_m": count_params_m(network),
            "madds_m": count_madds_m(network, image_size, "conv_linear"),
            "madds_paper_m": count_madds_m(network, image_size, "paper"),
        }

    def run_params(self, recipe: EvalRecipe) -> dict[str, Any]:
        return vars(recipe)

    def draw_genotype(self, genotype: darts.Genotype, path: str | Path) -> None:
        draw_genotype(genotype, path)


class ProxylessTrainingNetwork(proxyless.EvalNetwork):
    """The proxyless evaluation network with the training interface of the DARTS one.

    It has no auxiliary head and no drop path, so forward returns (logits, None) and the
    drop-path probability is ignored. Its state dict matches the plain EvalNetwork's.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None

    def set_drop_path_prob(self, drop_prob: float) -> None:
        pass


@dataclass(frozen=True)
class ProxylessSpace:
    """Networks of the ProxylessNAS space, shaped by the search section's network fields.

    The data set sets the input channels and the number of classes. Named networks were
    published for the full-size backbone (width_mult 1, layers_per_stage 4), so they are
    allowed only there; any stem_stride keeps their params.
    """

    width_mult: float = 1.0
    layers_per_stage: int = proxyless.FULL_LAYERS_PER_STAGE
    stem_stride: int = 2

    name = "proxyless"
    can_draw = False

    def __post_init__(self) -> None:
        # Raises ValueError or TypeError for a bad shape before any network is built.
        proxyless.ProxylessConfig(width_mult=self.width_mult, layers_per_stage=self.layers_per_stage,
                                  stem_stride=self.stem_stride)

    def network_config(self, data: DataConfig) -> proxyless.ProxylessConfig:
        info = describe_dataset(data.name, data.root)
        return proxyless.ProxylessConfig(num_classes=info.num_classes, in_chs=info.in_chs,
                                         width_mult=self.width_mult, layers_per_stage=self.layers_per_stage,
                                         stem_stride=self.stem_stride)

    def parse_genotype(self, text: str) -> proxyless.Genotype:
        return proxyless.genotype_from_json(text, layers_per_stage=self.layers_per_stage)

    def named_problem(self, name: str) -> str | None:
        if name not in proxyless.GENOTYPES:
            return _unknown_name_problem(name, self.name)
        full = proxyless.FULL_LAYERS_PER_STAGE
        if self.layers_per_stage == full and self.width_mult == 1.0:
            return None
        return (f"is defined for the full-size backbone (search.width_mult 1.0, search.layers_per_stage {full}, "
                f"{proxyless.searched_layer_count(full)} searched layers), but this job has width_mult "
                f"{self.width_mult} and layers_per_stage {self.layers_per_stage}; set both to the full size "
                f"or remove the name")

    def named_genotype(self, name: str) -> proxyless.Genotype:
        return proxyless.get_genotype(name)

    def random_genotype(self, seed: int) -> proxyless.Genotype:
        return proxyless.random_genotype(seed, self.layers_per_stage)

    def recipe_problems(self, fields_set: set[str], recipe: dict[str, Any]) -> list[str]:
        """Reject recipe fields the proxyless network cannot use, naming each one and its fix.

        ``fields_set`` names the fields the spec sets, and ``recipe`` contains every field's value.
        """
        problems = [f"evaluate.recipe.{name}: {recipe[name]!r} is not used in the proxyless space, where "
                    f"search.width_mult, search.layers_per_stage and search.stem_stride set the network; "
                    f"remove it" for name in DARTS_SHAPE_FIELDS if name in fields_set]
        if recipe["drop_path"] > 0:
            problems.append(f"evaluate.recipe.drop_path: {recipe['drop_path']!r} is not allowed: proxyless "
                            f"networks have no drop path; set it to 0 or remove it")
        if recipe["auxiliary_weight"] > 0:
            problems.append(f"evaluate.recipe.auxiliary_weight: {recipe['auxiliary_weight']!r} is not allowed: "
                            f"proxyless networks have no auxiliary head; set it to 0 or remove it")
        return problems

    def build_network(self, genotype: proxyless.Genotype, recipe: EvalRecipe, data: DataConfig) -> nn.Module:
        return ProxylessTrainingNetwork(genotype, self.network_config(data))

    def network_sizes(self, genotype: proxyless.Genotype, recipe: EvalRecipe, data: DataConfig) -> dict[str, float]:
        """Return params_m and madds_m (conv+linear at the data set's image size), counted on the meta device."""
        image_size = describe_dataset(data.name, data.root).image_size
        description = proxyless.describe_network(genotype, self.network_config(data), image_size)
        return {"params_m": description["params_m"], "madds_m": description["madds_m"]}

    def run_params(self, recipe: EvalRecipe) -> dict[str, Any]:
        """Return the recipe without the DARTS shape fields, plus the network fields that replace them."""
        params = {key: value for key, value in vars(recipe).items() if key not in DARTS_SHAPE_FIELDS}
        return {**params, "width_mult": self.width_mult, "layers_per_stage": self.layers_per_stage,
                "stem_stride": self.stem_stride}

    def draw_genotype(self, genotype: proxyless.Genotype, path: str | Path) -> None:
        raise NotImplementedError("the proxyless space has no genotype drawing; check can_draw first")
