"""Job planning into stages and tasks: pure functions of the spec, tested without Ray.

Each task has a stable key. The key tags its MLflow run and names its checkpoint folder, so a
resubmitted job finds the work it already did.
"""

from dataclasses import dataclass
from typing import Any

from orchestrator.spec import JobSpec

STAGE_SEARCH = "search"
STAGE_EVALUATE = "evaluate"

GROUP_FOUND = "found"
GROUP_NAMED = "named"
GROUP_RANDOM = "random"


@dataclass(frozen=True)
class SearchTask:
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"search-{self.method}-seed{self.seed}"


@dataclass(frozen=True)
class EvalTask:
    """One genotype trained from scratch: a found, a named or a random cell (or network, in the proxyless space)."""

    group: str
    label: str  # the method for found cells, the genotype name, or random-NN
    genotype: Any  # a genotype of the job's space (JobSpec.genotype_space)
    train_seed: int
    source_key: str | None = None  # the search task that found the cell

    @property
    def key(self) -> str:
        source = f"-{self.source_key}" if self.source_key else ""
        return f"eval-{self.group}-{self.label}{source}-seed{self.train_seed}"


def plan_searches(spec: JobSpec) -> list[SearchTask]:
    if spec.search is None:
        return []
    return [SearchTask(method, seed) for method in spec.search.methods for seed in spec.search.seeds]


def random_cell_seed(spec: JobSpec, index: int) -> int:
    return spec.evaluate.random_seed * 1000 + index


def plan_evaluations(spec: JobSpec, found: dict[SearchTask, Any]) -> list[EvalTask]:
    """Evaluation tasks for found genotypes (in search order), named genotypes and random genotypes of the job's space."""
    evaluate = spec.evaluate
    if evaluate is None:
        return []
    space = spec.genotype_space()
    cells: list[tuple[str, str, Any, str | None]] = []
    if evaluate.found:
        cells += [(GROUP_FOUND, task.method, genotype, task.key) for task, genotype in found.items()]
    cells += [(GROUP_NAMED, name, space.named_genotype(name), None) for name in evaluate.named]
    for index in range(evaluate.random_cells):
        genotype = space.random_genotype(random_cell_seed(spec, index))
        cells.append((GROUP_RANDOM, f"random-{index:02d}", genotype, None))
    return [EvalTask(group, label, genotype, seed, source) for group, label, genotype, source in cells
            for seed in evaluate.seeds]
