"""Genotypes of the ProxylessNAS space: one op name per searched layer, round-tripping through JSON.

JSON form: ``{"layers": ["mbconv_k5_e3", "skip", ...]}`` with 21 entries at full depth.
Validation errors name the layer (1-based), the bad value and the valid choices.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_spaces.errors import GenotypeError
from search_spaces.proxyless.backbone import FULL_LAYERS_PER_STAGE, searched_layer_count, skip_allowed
from search_spaces.proxyless.ops import MBCONV_OPS, SEARCH_OPS, SHORT_NAMES, SKIP


@dataclass(frozen=True)
class Genotype:
    """The op of every searched layer, in network order."""

    layers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @property
    def skip_count(self) -> int:
        return sum(op == SKIP for op in self.layers)

    def describe(self) -> str:
        """Return one line in the notation of the ProxylessNAS figures, e.g. 'MB3 5x5 | skip | ...'."""
        return " | ".join(SHORT_NAMES[op] for op in self.layers)


def allowed_ops(index: int, layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> tuple[str, ...]:
    """Return the op choices of searched layer ``index`` (0-based), in search order."""
    return SEARCH_OPS if skip_allowed(index, layers_per_stage) else MBCONV_OPS


def choice_counts(layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> list[int]:
    """Return the number of op choices of each searched layer: 7 where skip is allowed, 6 elsewhere."""
    return [len(allowed_ops(i, layers_per_stage)) for i in range(searched_layer_count(layers_per_stage))]


def validate_genotype(genotype: Genotype, layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> Genotype:
    """Return the genotype unchanged; raise GenotypeError naming the first bad layer."""
    expected = searched_layer_count(layers_per_stage)
    if len(genotype.layers) != expected:
        raise GenotypeError(
            f"expected {expected} layers (layers_per_stage={layers_per_stage}), got {len(genotype.layers)}"
        )
    for index, op in enumerate(genotype.layers):
        _check_layer_op(index, op, layers_per_stage)
    return genotype


def _check_layer_op(index: int, op: Any, layers_per_stage: int) -> None:
    where = f"layer {index + 1}"
    if op not in SEARCH_OPS:
        raise GenotypeError(f"{where}: unknown op {op!r}; valid ops: {', '.join(SEARCH_OPS)}")
    if op == SKIP and not skip_allowed(index, layers_per_stage):
        raise GenotypeError(
            f"{where}: 'skip' is not allowed because this layer changes the channel count or the stride; "
            f"choose one of {', '.join(MBCONV_OPS)}"
        )


def genotype_from_dict(data: Any, layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> Genotype:
    """Build a validated genotype from its JSON object."""
    if not isinstance(data, dict) or "layers" not in data:
        raise GenotypeError(f"a genotype is an object with the key 'layers', got {data!r:.80}")
    layers = data["layers"]
    if not isinstance(layers, list | tuple):
        raise GenotypeError(f"'layers' must be a list of op names, got {type(layers).__name__}")
    return validate_genotype(Genotype(tuple(layers)), layers_per_stage)


def genotype_from_json(text: str, layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> Genotype:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise GenotypeError(f"genotype is not valid JSON: {error}") from None
    return genotype_from_dict(data, layers_per_stage)


def load_genotype(path: str | Path, layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> Genotype:
    return genotype_from_json(Path(path).read_text(), layers_per_stage)


def genotype_from_choices(choices: list[int]) -> Genotype:
    """Build a genotype from one op index per layer, indices into ``SEARCH_OPS``."""
    return Genotype(tuple(SEARCH_OPS[index] for index in choices))
