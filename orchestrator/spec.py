"""The job spec: a YAML file validated into typed configs in one place.

`load_spec` reports every problem at once, each naming the field, the value and what is
allowed, before the driver takes any resource.
"""

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from search_spaces.darts import OPS, Genotype
from search_spaces.darts.counting import CIFAR_CHANNELS, select_imagenet_channels
from search_spaces.errors import UnasError
from workers.config import DataConfig, EvalRecipe, SearchConfig
from workers.data import DATASETS
from workers.estimators import estimator_names
from workers.evaluate import paper_recipe
from workers.genotype_spaces import DARTS_SHAPE_FIELDS, DartsSpace, GenotypeSpace, ProxylessSpace
from workers.proxyless_search import ProxylessSearchConfig

SEARCH_SPACES = ("darts", "proxyless")


class SpecError(UnasError):
    """A job spec with one or more problems; `problems` lists each as its own line."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]

    def __reduce__(self):
        return (type(self), (self.message, self.problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Section):
    name: str = "digits"
    root: str | None = None
    download: bool = False
    test_fraction: float = Field(0.2, gt=0, lt=1)
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    crop_size: int = Field(224, gt=0)  # ImageNet only, like the two below
    resize_size: int = Field(256, gt=0)
    color_jitter: float = Field(0.4, ge=0)


class ResourcesSpec(_Section):
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)


class SearchSpec(_Section):
    # Settings of one space only (the ProxylessNAS latency fields) pass the shape check and are
    # checked against that space's config afterwards.
    model_config = ConfigDict(extra="allow", frozen=True)

    space: str = "darts"
    methods: list[str] = Field(default_factory=lambda: ["rebar"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    chs: int = Field(16, gt=0)
    layers: int = Field(8, ge=3)
    epochs: int = Field(100, gt=0)
    warmup_epochs: int = Field(15, ge=0)
    batch_size: int = Field(64, gt=0)
    tau: float = Field(0.4, gt=0)
    per_example: bool = True
    softening_eps: float = Field(0.0, ge=0)
    gap_term: bool = True
    gap_weight: float = Field(0.5, ge=0)
    overlap_term: bool = True
    overlap_weight: float = Field(0.2, ge=0)
    weight_lr: float = Field(6e-4, gt=0)
    weight_lr_min: float = Field(1e-4, ge=0)
    weight_decay: float = Field(3e-4, ge=0)
    arch_lr: float = Field(2e-3, gt=0)
    arch_lr_min: float = Field(3e-4, ge=0)
    arch_weight_decay: float = Field(1e-6, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    # Learning rates are tuned for this global batch and scale by batch_size / reference_batch_size.
    reference_batch_size: int = Field(64, gt=0)
    ops: list[str] | None = None
    workers: int = Field(1, ge=1)
    worker_resources: ResourcesSpec = ResourcesSpec()
    max_failures: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _check_warmup(self) -> "SearchSpec":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}), "
                             "or the logits are never trained")
        return self


class RecipeSpec(_Section):
    # "auto": 36 on CIFAR-sized data; on ImageNet the largest even C in [30, 70) whose
    # multiply-adds (paper convention) stay under 600M, chosen per genotype.
    chs: Annotated[int, Field(gt=0)] | Literal["auto"] = 36
    layers: int = Field(20, ge=3)
    epochs: int = Field(600, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.05, gt=0)
    lr_min: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(3e-4, ge=0)
    warmup_epochs: int = Field(30, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    drop_path: float = Field(0.2, ge=0, lt=1)
    auxiliary_weight: float = Field(0.4, ge=0)
    cutout: int = Field(16, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    reference_batch_size: int = Field(0, ge=0)  # lr is tuned for this global batch; 0: use lr as given
    loader_workers: int = Field(-1, ge=-1)  # -1: sized from the trial's CPUs

    @model_validator(mode="after")
    def _check_warmup(self) -> "RecipeSpec":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        return self


class EvaluateSpec(_Section):
    found: bool = True
    named: list[str] = Field(default_factory=list)
    random_cells: int = Field(0, ge=0)
    random_seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    recipe: RecipeSpec = RecipeSpec()
    trial_resources: ResourcesSpec = ResourcesSpec()
    # Above 1, each trial runs a Ray Train worker group of this size (DDP) that splits the
    # trial's resources evenly: 8 for a trial of 8 GPUs.
    workers: int = Field(1, ge=1)
    max_concurrent: int = Field(4, ge=1)


class RaySpec(_Section):
    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)
    num_gpus: int | None = Field(None, ge=0)


class TrackingSpec(_Section):
    uri: str | None = None
    experiment: str | None = None


def _proxyless_recipe_defaults() -> dict[str, Any]:
    """Return the published proxyless recipe's fields that a proxyless job's recipe falls back to."""
    recipe = dataclasses.asdict(paper_recipe("imagenet", "proxyless"))
    # The seed comes from evaluate.seeds, and the shape fields do not apply. loader_workers keeps
    # RecipeSpec's -1, which sizes the loaders from the trial's CPUs.
    return {name: value for name, value in recipe.items() if name not in {"seed", "loader_workers", *DARTS_SHAPE_FIELDS}}


class JobSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    expected_gpus: int = Field(0, ge=0)
    seed: int = 0
    data: DataSpec = DataSpec()
    search: SearchSpec | None = None
    evaluate: EvaluateSpec | None = None
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()

    @model_validator(mode="before")
    @classmethod
    def _fill_proxyless_recipe(cls, data: Any) -> Any:
        """In a proxyless job, fill the recipe fields the spec leaves out from the published proxyless recipe.

        Filled before validation, so the job id, the checks and the logged params all see the
        values that train. A cell job keeps RecipeSpec's defaults, the published CIFAR recipe.
        """
        if not isinstance(data, dict):
            return data
        search, evaluate = data.get("search"), data.get("evaluate")
        if not (isinstance(search, dict) and search.get("space") == "proxyless" and isinstance(evaluate, dict)):
            return data
        recipe = evaluate.get("recipe", {})
        if not isinstance(recipe, dict):
            return data
        return {**data, "evaluate": {**evaluate, "recipe": {**_proxyless_recipe_defaults(), **recipe}}}

    def job_id(self) -> str:
        """Stable for the same spec content: resubmitting it resumes the same job."""
        content = self.model_dump(exclude={"ray", "tracking", "description"})
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]

    def data_config(self) -> DataConfig:
        return DataConfig(**self.data.model_dump(), split_seed=self.seed)

    def search_config(self, method: str, seed: int) -> SearchConfig | ProxylessSearchConfig:
        if self.search.space == "proxyless":
            return self._proxyless_search_config(method, seed)
        fields = self.search.model_dump(exclude={"space", "methods", "seeds", "workers", "worker_resources",
                                                 "max_failures", "ops"})
        ops = tuple(self.search.ops) if self.search.ops else None
        return SearchConfig(**fields, estimator=method, seed=seed, ops=ops)

    def _proxyless_search_config(self, method: str, seed: int) -> ProxylessSearchConfig:
        """Only the fields the spec sets: the space's own defaults differ from the cell search's."""
        names = {item.name for item in dataclasses.fields(ProxylessSearchConfig)}
        given = self.search.model_dump(exclude_unset=True)
        fields = {key: value for key, value in given.items() if key in names}
        return ProxylessSearchConfig(**fields, estimator=method, seed=seed)

    def genotype_space(self) -> GenotypeSpace:
        """Return the space whose genotypes this job searches and evaluates (DARTS for a job without search).

        Raises ValueError or TypeError when the proxyless network fields are invalid.
        """
        if self.search is not None and self.search.space == "proxyless":
            return ProxylessSpace(**self._proxyless_network_fields())
        ops = tuple(self.search.ops) if self.search is not None and self.search.ops else None
        return DartsSpace(self.data.name, ops)

    def _proxyless_network_fields(self) -> dict[str, Any]:
        """Return width_mult, layers_per_stage and stem_stride as the search sets them or as its config defaults them."""
        defaults = {item.name: item.default for item in dataclasses.fields(ProxylessSearchConfig)}
        search_fields = self.search.model_extra or {}
        return {name: search_fields.get(name, defaults[name])
                for name in ("width_mult", "layers_per_stage", "stem_stride")}

    def eval_recipe(self, seed: int, genotype: Genotype) -> EvalRecipe:
        """The recipe of one trial; channels "auto" resolve per genotype and data set."""
        fields = self.evaluate.recipe.model_dump()
        if fields["chs"] == "auto":
            fields["chs"] = select_imagenet_channels(genotype) if self.data.name == "imagenet" else CIFAR_CHANNELS
        return EvalRecipe(**fields, seed=seed)


def _format_location(location: tuple) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def _pydantic_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        field = _format_location(item["loc"])
        value = item.get("input")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown field; remove it or check its spelling")
        elif item["type"] == "missing":
            problems.append(f"{field}: required field is missing")
        else:
            problems.append(f"{field}: {value!r} is not allowed: {message}")
    return problems


def _semantic_problems(spec: JobSpec) -> list[str]:
    """Checks that need the registries: names of spaces, estimators, genotypes, ops, data sets."""
    problems = []
    if spec.data.name not in DATASETS:
        problems.append(f"data.name: {spec.data.name!r} is not a known data set; valid: {', '.join(DATASETS)}")
    if spec.search is None and spec.evaluate is None:
        problems.append("search, evaluate: the job has nothing to do; add a search or an evaluate section")
    if spec.search is not None:
        problems += _search_problems(spec.search)
    if spec.evaluate is not None:
        problems += _evaluate_problems(spec)
    return problems


def _search_problems(search: SearchSpec) -> list[str]:
    problems = _extra_field_problems(search)
    if search.space not in SEARCH_SPACES:
        problems.append(f"search.space: {search.space!r} is not a known search space; valid: {', '.join(SEARCH_SPACES)}")
    for i, method in enumerate(search.methods):
        if method not in estimator_names():
            problems.append(f"search.methods.{i}: {method!r} is not a known estimator; "
                            f"valid: {', '.join(estimator_names())}")
    for i, op in enumerate(search.ops or []):
        if op not in OPS:
            problems.append(f"search.ops.{i}: {op!r} is not a known op; valid: {', '.join(OPS.names())}")
    if search.batch_size % search.workers:
        problems.append(f"search.batch_size: {search.batch_size} does not split evenly over {search.workers} "
                        f"workers; use a multiple of search.workers")
    if len(set(search.seeds)) != len(search.seeds):
        problems.append(f"search.seeds: {search.seeds} repeats a seed; list each seed once")
    return problems


def _raw_extra_field_problems(data: dict) -> list[str]:
    """Unknown search fields of a spec that failed its shape check (they pass that check)."""
    search = data.get("search")
    if not isinstance(search, dict):
        return []
    known = set(SearchSpec.model_fields)
    if search.get("space") == "proxyless":
        known |= {item.name for item in dataclasses.fields(ProxylessSearchConfig)}
    return [f"search.{name}: unknown field; remove it or check its spelling" for name in search if name not in known]


def _extra_field_problems(search: SearchSpec) -> list[str]:
    """Fields beyond the cell search's are allowed only where the space's config has them."""
    extra = sorted(search.model_extra or {})
    if search.space != "proxyless":
        return [f"search.{name}: unknown field; remove it or check its spelling" for name in extra]
    known = {item.name for item in dataclasses.fields(ProxylessSearchConfig)}
    problems = [f"search.{name}: unknown field of the proxyless space; remove it or check its spelling"
                for name in extra if name not in known]
    if not problems:
        problems += _proxyless_config_problems(search)
    return problems


def _proxyless_config_problems(search: SearchSpec) -> list[str]:
    spec = JobSpec.model_construct(search=search)
    try:
        spec._proxyless_search_config(search.methods[0], 0)
    except (UnasError, TypeError, ValueError) as error:
        return [str(error)]
    try:
        spec.genotype_space()
    except (TypeError, ValueError) as error:
        return [f"search: invalid network shape ({error}); fix width_mult, layers_per_stage or stem_stride"]
    return []


def _genotype_space_or_none(spec: JobSpec) -> GenotypeSpace | None:
    """Return the job's genotype space, or None when its network fields are invalid (a search problem)."""
    try:
        return spec.genotype_space()
    except (TypeError, ValueError):
        return None


def _evaluate_problems(spec: JobSpec) -> list[str]:
    evaluate = spec.evaluate
    problems = []
    space = _genotype_space_or_none(spec)
    if space is not None:
        for i, name in enumerate(evaluate.named):
            problem = space.named_problem(name)
            if problem is not None:
                problems.append(f"evaluate.named.{i}: {name!r} {problem}")
        problems += space.recipe_problems(evaluate.recipe.model_fields_set, evaluate.recipe.model_dump())
    if evaluate.found and spec.search is None:
        problems.append("evaluate.found: true needs a search section to find cells; set it to false or add search")
    if not (evaluate.found and spec.search) and not evaluate.named and not evaluate.random_cells:
        problems.append("evaluate: nothing to evaluate; set found, named or random_cells")
    return problems


def _size_problems(spec: JobSpec) -> list[str]:
    """Batch sizes the digits data cannot fill (sizes of other data sets are checked when loaded)."""
    if spec.data.name != "digits":
        return []
    total = 1797
    pool = total - round(total * spec.data.test_fraction)
    problems = []
    if spec.search is not None:
        search_train = pool - round(pool * spec.data.validation_fraction)
        if spec.search.batch_size > search_train:
            problems.append(f"search.batch_size: {spec.search.batch_size} is larger than the {search_train} search "
                            f"training examples of digits; lower it")
    if spec.evaluate is not None and spec.evaluate.recipe.batch_size > pool:
        problems.append(f"evaluate.recipe.batch_size: {spec.evaluate.recipe.batch_size} is larger than the {pool} "
                        f"training examples of digits; lower it")
    return problems


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Validates a spec mapping; raises SpecError listing every problem."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a mapping of fields, got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as error:
        problems = _pydantic_problems(error) + _raw_extra_field_problems(data)
        raise SpecError(f"{source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems), problems) from None
    problems = _semantic_problems(spec) + _size_problems(spec)
    if problems:
        raise SpecError(f"{source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems), problems)
    return spec


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist; give the path of a YAML job spec")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(data, str(path))

