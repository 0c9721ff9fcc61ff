"""Job planning into stages and tasks: pure functions of the spec, tested without Ray.

Each task has a stable key. The key tags its MLflow run and names its checkpoint folder, so a
resubmitted job finds the work it already did.
"""

from dataclasses import dataclass

from search_spaces.darts import Genotype, get_genotype, random_genotype
from orchestrator.spec import JobSpec
from workers.search import search_ops
from workers.config import SearchConfig

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
    """One cell trained from scratch: a found cell, a named genotype or a random cell."""

    group: str
    label: str  # the method for found cells, the genotype name, or random-NN
    genotype: Genotype
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


def plan_evaluations(spec: JobSpec, found: dict[SearchTask, Genotype]) -> list[EvalTask]:
    """Evaluation tasks for found cells (in search order), named genotypes and random cells."""
    evaluate = spec.evaluate
    if evaluate is None:
        return []
    cells: list[tuple[str, str, Genotype, str | None]] = []
    if evaluate.found:
        cells += [(GROUP_FOUND, task.method, genotype, task.key) for task, genotype in found.items()]
    cells += [(GROUP_NAMED, name, get_genotype(name), None) for name in evaluate.named]
    ops = _random_cell_ops(spec)
    for index in range(evaluate.random_cells):
        genotype = random_genotype(random_cell_seed(spec, index), ops)
        cells.append((GROUP_RANDOM, f"random-{index:02d}", genotype, None))
    return [EvalTask(group, label, genotype, seed, source) for group, label, genotype, source in cells
            for seed in evaluate.seeds]


def _random_cell_ops(spec: JobSpec) -> tuple[str, ...]:
    """Random cells come from the same op list the search would use."""
    ops = tuple(spec.search.ops) if spec.search is not None and spec.search.ops else None
    return search_ops(SearchConfig(ops=ops), spec.data.name)
