"""UNAS search in the ProxylessNAS space with a latency objective.

The loop follows the cell search in ``workers.search``: architecture steps through a gradient
estimator, weight steps through the same relaxed sample, warm-up, cosine schedules and an
exact-resume checkpoint per epoch. Added here:

- The objective is L(z) + lambda_lat * max(0, latency_ms(z) - target_ms), with lambda_lat
  ramped linearly from 0 after warm-up to ``latency_weight`` at the last step.
- latency_ms(z) of a discrete sample is timed on this worker's device ("measured") or read
  from the surrogate ("surrogate"). A relaxed sample always uses the surrogate, so the
  estimators' relaxed terms carry the latency gradient.
- By default one architecture is sampled per minibatch from softened logits (eps 0.08), and
  skip ops are dropped with p = 0.1 while the supernet trains.

`run_proxyless_search` runs in a plain process (RunContext) or as a Ray Train worker
(`proxyless_search_worker`).
"""

import json
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from search_spaces.errors import UnasError
from search_spaces.proxyless import (
    FULL_LAYERS_PER_STAGE,
    GENOTYPES,
    ArchitectureDistribution,
    Genotype,
    ProxylessConfig,
    SearchNetwork,
    genotype_from_choices,
    random_genotype,
    searched_layer_count,
)
from workers.config import DataConfig
from workers.context import (
    RayTrainContext,
    RunContext,
    capture_rng_state,
    configure_worker_logging,
    load_checkpoint,
    restore_rng_state,
)
from workers.data import describe_dataset, load_search_data
from workers.estimators import create_estimator, estimator_names
from workers.latency import (
    LatencySettings,
    LatencySurrogate,
    measure_genotype_latency_ms,
    surrogate_with_source,
)
from workers.training import (
    all_reduce_gradients,
    all_reduce_mean,
    broadcast_parameters,
    check_finite,
    cosine_value,
    seed_everything,
    set_lr,
    shard_loader,
)

logger = logging.getLogger(__name__)

GENOTYPE_FILE = "genotype.json"
SURROGATE_FILE = "latency_surrogate.json"
# The epoch metric that names where the surrogate came from: workers.latency.SURROGATE_CACHED or SURROGATE_FITTED.
SURROGATE_SOURCE_METRIC = "latency_surrogate"
DISCRETE_LATENCY_SOURCES = ("measured", "surrogate")
# Random networks whose surrogate latencies set the target when latency_target_ms is None.
TARGET_REFERENCE_NETWORKS = 1000
# Measured latencies kept per search, the least recently used dropped first. Checkpoints carry them.
MEASURED_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class ProxylessSearchConfig:
    """The supernet, the latency objective, the estimator and the schedule of one search.

    The defaults are the full-size setting: width 1, 21 searched layers, stem stride 2, 20
    warm-up and 15 search epochs. Smaller width_mult and layers_per_stage, and stem_stride 1
    for 8x8 digits, give CPU-sized runs. Latencies are in ms, and latency_weight is the
    weight per ms above the target.
    """

    # Network shape. The data set sets the input channels and the number of classes.
    width_mult: float = 1.0
    layers_per_stage: int = 4
    stem_stride: int = 2
    skip_drop_prob: float = 0.1

    # Estimator and sampling.
    estimator: str = "rebar"
    estimator_options: dict = field(default_factory=dict)
    tau: float = 0.4
    per_example: bool = False
    softening_eps: float = 0.08

    # Objective: cross-entropy terms as in the cell search, plus the latency penalty.
    gap_term: bool = True
    gap_weight: float = 0.5
    latency_weight: float = 0.1
    latency_target_ms: float | None = None
    latency_target_genotype: str | None = None  # a named genotype whose surrogate latency is the target
    latency_target_quantile: float = 0.25  # of random networks' latencies, when neither is set
    discrete_latency: str = "measured"

    # Latency timing and the surrogate, as in workers.latency.LatencySettings.
    latency_input_size: int | None = None  # None: the data set's image size
    latency_batch_size: int = 8
    latency_repeats: int = 10
    latency_warmup_runs: int = 3
    latency_fit_networks: int = 200
    latency_holdout_networks: int = 50
    latency_ridge_alpha: float = 1.0
    latency_clock: str = "wall"
    latency_chunk_size: int = 100
    latency_cache_dir: str | None = None  # a folder of surrogate JSON files per device; None: no cache

    # Schedule: 20 warm-up epochs, then 15 search epochs.
    epochs: int = 35
    warmup_epochs: int = 20
    batch_size: int = 192  # global, over all workers
    weight_lr: float = 6e-4
    weight_lr_min: float = 1e-4
    weight_decay: float = 9e-4  # 3e-4 at batch 64, scaled linearly with the batch
    arch_lr: float = 2e-3
    arch_lr_min: float = 3e-4
    arch_weight_decay: float = 1e-6
    grad_clip: float = 5.0
    seed: int = 0
    loader_workers: int = 0

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise UnasError("invalid proxyless search config: " + "; ".join(problems))

    def network_config(self, data: DataConfig) -> ProxylessConfig:
        # NOTE: ImageNet's class count is taken as 1000 here, not from the class folders under data.root.
        info = describe_dataset(data.name)
        return ProxylessConfig(num_classes=info.num_classes, in_chs=info.in_chs, width_mult=self.width_mult,
                               layers_per_stage=self.layers_per_stage, stem_stride=self.stem_stride, dropout=0.0)

    def latency_settings(self, data: DataConfig) -> LatencySettings:
        input_size = self.latency_input_size or describe_dataset(data.name).image_size
        return LatencySettings(input_size=input_size, batch_size=self.latency_batch_size,
                               repeats=self.latency_repeats, warmup_runs=self.latency_warmup_runs,
                               fit_networks=self.latency_fit_networks,
                               holdout_networks=self.latency_holdout_networks,
                               ridge_alpha=self.latency_ridge_alpha, clock=self.latency_clock,
                               chunk_size=self.latency_chunk_size, seed=self.seed)


def _config_problems(config: ProxylessSearchConfig) -> list[str]:
    problems = []
    if config.estimator not in estimator_names():
        problems.append(f"search.estimator: {config.estimator!r} is not known; valid: {', '.join(estimator_names())}")
    if not 0 <= config.skip_drop_prob < 1:
        problems.append(f"search.skip_drop_prob: {config.skip_drop_prob} must be in [0, 1)")
    if not 0 <= config.warmup_epochs < config.epochs:
        problems.append(f"search.warmup_epochs: {config.warmup_epochs} must be in [0, epochs={config.epochs}), "
                        "or the logits are never trained")
    return problems + _latency_problems(config) + _target_problems(config)


def _latency_problems(config: ProxylessSearchConfig) -> list[str]:
    problems = []
    if config.discrete_latency not in DISCRETE_LATENCY_SOURCES:
        problems.append(f"search.discrete_latency: {config.discrete_latency!r} is not valid; "
                        f"valid: {', '.join(DISCRETE_LATENCY_SOURCES)}")
    if config.discrete_latency == "measured" and config.per_example:
        problems.append("search.discrete_latency: 'measured' times one network per sampled architecture, and "
                        "per_example: true samples one per example; use 'surrogate' or per_example: false")
    if config.latency_weight < 0:
        problems.append(f"search.latency_weight: {config.latency_weight} must be non-negative")
    return problems


def _target_problems(config: ProxylessSearchConfig) -> list[str]:
    problems = []
    if config.latency_target_ms is not None and config.latency_target_ms <= 0:
        problems.append(f"search.latency_target_ms: {config.latency_target_ms} must be positive, or null to "
                        "derive the target from latency_target_genotype or latency_target_quantile")
    if config.latency_target_ms is not None and config.latency_target_genotype is not None:
        problems.append("search.latency_target_ms, search.latency_target_genotype: set at most one of them")
    if config.latency_target_genotype is not None:
        if config.latency_target_genotype not in GENOTYPES:
            problems.append(f"search.latency_target_genotype: {config.latency_target_genotype!r} is not a known "
                            f"genotype; valid: {', '.join(GENOTYPES.names())}")
        elif config.layers_per_stage != FULL_LAYERS_PER_STAGE:
            problems.append(f"search.latency_target_genotype: named genotypes have 21 layers, but layers_per_stage "
                            f"{config.layers_per_stage} gives {searched_layer_count(config.layers_per_stage)}; "
                            f"use layers_per_stage: {FULL_LAYERS_PER_STAGE} or latency_target_ms")
    if not 0 < config.latency_target_quantile < 1:
        problems.append(f"search.latency_target_quantile: {config.latency_target_quantile} must be in (0, 1)")
    return problems


# ---------------------------------------------------------------------------------------------
# Latency of samples


def is_one_hot(sample: list[torch.Tensor]) -> bool:
    return all(bool(((s == 0) | (s == 1)).all()) and bool((s.sum(-1) == 1).all()) for s in sample)


class SampleLatency:
    """Latency in ms of architecture samples: measured or surrogate for one-hot, surrogate for relaxed.

    ``surrogate_source`` is SURROGATE_CACHED or SURROGATE_FITTED, or None for a checkpoint
    written before searches recorded it.
    """

    def __init__(self, surrogate: LatencySurrogate, target_ms: float, network_config: ProxylessConfig,
                 settings: LatencySettings, device: torch.device, measured: bool,
                 surrogate_source: str | None = None):
        self.surrogate = surrogate
        self.surrogate_source = surrogate_source
        self.target_ms = target_ms
        self.network_config = network_config
        self.settings = settings
        self.device = device
        self.measured = measured
        self.measured_ms: OrderedDict[str, float] = OrderedDict()

    def __call__(self, sample: list[torch.Tensor]) -> torch.Tensor:
        """Return the (B,) latency, differentiable in a relaxed sample and constant for a measured one-hot one."""
        if self.measured and is_one_hot(sample):
            values = [self.genotype_ms(genotype_from_choices([int(s[i].argmax()) for s in sample]))
                      for i in range(sample[0].shape[0])]
            return torch.tensor(values, device=sample[0].device, dtype=sample[0].dtype)
        return self.surrogate.predict_ms(sample)

    def genotype_ms(self, genotype: Genotype) -> float:
        """Return the timed latency of a genotype, timing it only when the cache lacks it."""
        key = ",".join(genotype.layers)
        if key in self.measured_ms:
            self.measured_ms.move_to_end(key)
            return self.measured_ms[key]
        latency_ms = measure_genotype_latency_ms(genotype, self.network_config, self.settings, self.device)
        self.measured_ms[key] = latency_ms
        if len(self.measured_ms) > MEASURED_CACHE_SIZE:
            self.measured_ms.popitem(last=False)
        return latency_ms

    def state_dict(self) -> dict[str, Any]:
        return {"surrogate": self.surrogate.to_dict(), "surrogate_source": self.surrogate_source,
                "target_ms": self.target_ms, "measured_ms": list(self.measured_ms.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.surrogate = LatencySurrogate.from_dict(state["surrogate"])
        self.surrogate_source = state.get("surrogate_source")
        self.target_ms = float(state["target_ms"])
        self.measured_ms = OrderedDict(state["measured_ms"])


def derive_target_ms(surrogate: LatencySurrogate, config: ProxylessSearchConfig) -> float:
    """Return the latency target in ms.

    In order of precedence: latency_target_ms, the surrogate latency of the named
    latency_target_genotype, or the latency_target_quantile of the surrogate latency of
    uniformly random networks.
    """
    if config.latency_target_ms is not None:
        return config.latency_target_ms
    if config.latency_target_genotype is not None:
        return surrogate.predict_genotype_ms(GENOTYPES.get(config.latency_target_genotype))
    rng = random.Random(config.seed)
    latencies = [surrogate.predict_genotype_ms(random_genotype(rng.randrange(2**31), config.layers_per_stage))
                 for _ in range(TARGET_REFERENCE_NETWORKS)]
    return float(torch.tensor(latencies).quantile(config.latency_target_quantile))


def latency_weight_at(config: ProxylessSearchConfig, epoch: int, batch_index: int, batches: int) -> float:
    """Return lambda_lat: 0 in warm-up, then linear from the first search step to latency_weight at the last."""
    search_epochs = config.epochs - config.warmup_epochs
    if epoch < config.warmup_epochs or search_epochs <= 0:
        return 0.0
    progress = (epoch - config.warmup_epochs + (batch_index + 1) / max(batches, 1)) / search_epochs
    return config.latency_weight * min(1.0, progress)


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class ProxylessSearchState:
    """Everything a checkpoint holds.

    Restoring it continues the search exactly, except that in "measured" mode networks timed
    after the restore get fresh, slightly different latencies.
    """

    network: SearchNetwork
    distribution: ArchitectureDistribution
    weight_optimizer: torch.optim.Optimizer
    arch_optimizer: torch.optim.Optimizer
    estimator: Any
    generator: torch.Generator
    latency: SampleLatency | None = None
    epoch: int = 0
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "distribution": self.distribution.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "estimator": self.estimator.state_dict(),
            "latency": self.latency.state_dict() if self.latency is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "rng": capture_rng_state(self.generator),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.distribution.load_state_dict(state["distribution"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        self.estimator.load_state_dict(state["estimator"])
        if self.latency is not None:
            self.latency.load_state_dict(state["latency"])
        self.epoch = state["epoch"]
        self.step = state["step"]
        restore_rng_state(state["rng"], self.generator)


def build_search_state(config: ProxylessSearchConfig, data: DataConfig, device: torch.device,
                       rank: int) -> ProxylessSearchState:
    seed_everything(config.seed)  # identical initial weights on every rank
    network = SearchNetwork(config.network_config(data), config.skip_drop_prob).to(device)
    distribution = ArchitectureDistribution(config.layers_per_stage, config.softening_eps).to(device)
    weight_optimizer = torch.optim.Adam(network.parameters(), lr=config.weight_lr, weight_decay=config.weight_decay)
    arch_optimizer = torch.optim.Adam(distribution.parameters(), lr=config.arch_lr,
                                      weight_decay=config.arch_weight_decay)
    estimator = create_estimator(config.estimator, **_estimator_options(config))
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    seed_everything(config.seed * 1000 + rank)
    return ProxylessSearchState(network, distribution, weight_optimizer, arch_optimizer, estimator, generator)


def _estimator_options(config: ProxylessSearchConfig) -> dict[str, Any]:
    options = dict(config.estimator_options)
    if config.estimator != "reinforce":
        options.setdefault("tau", config.tau)
    return options


def attach_latency(state: ProxylessSearchState, config: ProxylessSearchConfig, data: DataConfig,
                   context: RunContext) -> None:
    """Fit or load the surrogate on rank 0, share it with every rank and set the latency target."""
    network_config = config.network_config(data)
    settings = config.latency_settings(data)
    surrogate, source = None, None
    if context.rank == 0:
        surrogate, source = surrogate_with_source(network_config, settings, context.device, config.latency_cache_dir)
    surrogate, source = _broadcast_surrogate(surrogate, source)
    target_ms = derive_target_ms(surrogate, config)
    state.latency = SampleLatency(surrogate, target_ms, network_config, settings, context.device,
                                  measured=config.discrete_latency == "measured", surrogate_source=source)
    if context.rank == 0:
        logger.info("latency target %.3f ms on %s (%s surrogate, held-out error %.1f%%)", target_ms,
                    surrogate.device_key, source, 100 * surrogate.fit.get("holdout_relative_error", float("nan")))


def _latency_from_checkpoint(latency_state: dict[str, Any], config: ProxylessSearchConfig, data: DataConfig,
                             device: torch.device) -> SampleLatency:
    surrogate = LatencySurrogate.from_dict(latency_state["surrogate"])
    latency = SampleLatency(surrogate, float(latency_state["target_ms"]), config.network_config(data),
                            config.latency_settings(data), device, measured=config.discrete_latency == "measured")
    latency.load_state_dict(latency_state)
    return latency


def _broadcast_surrogate(surrogate: LatencySurrogate | None, source: str | None) -> tuple[LatencySurrogate, str]:
    # Every rank optimises the same objective, so all use rank 0's surrogate.
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        payload = [surrogate.to_dict() if surrogate is not None else None, source]
        torch.distributed.broadcast_object_list(payload, src=0)
        return LatencySurrogate.from_dict(payload[0]), payload[1]
    assert surrogate is not None and source is not None
    return surrogate, source


# ---------------------------------------------------------------------------------------------
# Steps


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def architecture_step(state: ProxylessSearchState, config: ProxylessSearchConfig, train_batch, val_batch,
                      latency_weight: float) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Update the logits once through the estimator and return the weights' sample and the objective's terms."""
    (x_t, y_t), (x_v, y_v) = train_batch, val_batch
    latency = state.latency
    terms: dict[str, float] = {}

    def objective(sample: list[torch.Tensor]) -> torch.Tensor:
        ce_train = _per_example_loss(state.network(x_t, sample), y_t)
        val_logits = state.network(x_v, sample)
        ce_val = _per_example_loss(val_logits, y_v)
        loss = ce_train + config.gap_weight * (ce_val - ce_train).abs() if config.gap_term else ce_val
        # Per-minibatch sampling draws one architecture, so its loss is the batch mean.
        loss = loss if config.per_example else loss.mean().view(1)
        penalty = torch.relu(latency(sample) - latency.target_ms)
        with torch.no_grad():
            terms.update(train_ce=ce_train.mean().item(), val_ce=ce_val.mean().item(),
                         gap=(ce_val - ce_train).abs().mean().item(),
                         val_acc=(val_logits.argmax(1) == y_v).float().mean().item())
        return loss + latency_weight * penalty

    num_samples = x_t.shape[0] if config.per_example else 1
    result = state.estimator.estimate(state.distribution.normalized_logits(), objective, num_samples, state.generator)
    check_finite(result.surrogate, "architecture objective", state.step)
    state.arch_optimizer.zero_grad(set_to_none=True)
    arch_params = list(state.distribution.parameters())
    result.surrogate.backward(inputs=arch_params)
    if hasattr(state.estimator, "step_control_variate"):
        state.estimator.step_control_variate()
    all_reduce_gradients(arch_params, _world_size())
    state.arch_optimizer.step()
    check_finite(torch.cat([p.detach().reshape(-1) for p in arch_params]), "architecture logits", state.step)
    terms["objective"] = float(result.loss.mean())
    terms.update(sample_latency_terms(state, result.discrete_sample, result.weight_sample))
    return [s.detach() for s in result.weight_sample], terms


def sample_latency_terms(state: ProxylessSearchState, discrete: list[torch.Tensor],
                         relaxed: list[torch.Tensor]) -> dict[str, float]:
    """Return the mean latency of a step's discrete sample, by the objective's source and by the
    surrogate, and the surrogate latency of its relaxed sample."""
    latency = state.latency
    with torch.no_grad():
        sampled_ms = latency(discrete)
        return {
            "latency_ms": sampled_ms.mean().item(),
            "surrogate_latency_ms": latency.surrogate.predict_ms(discrete).mean().item(),
            "relaxed_latency_ms": latency.surrogate.predict_ms(relaxed).mean().item(),
            "latency_penalty_ms": torch.relu(sampled_ms - latency.target_ms).mean().item(),
        }


def weight_step(state: ProxylessSearchState, config: ProxylessSearchConfig, train_batch,
                sample: list[torch.Tensor]) -> tuple[float, float]:
    """Take one Adam step on the supernet weights through a fixed (detached) architecture sample."""
    x_t, y_t = train_batch
    logits = state.network(x_t, sample)
    loss = F.cross_entropy(logits, y_t)
    check_finite(loss, "weight loss (train cross-entropy)", state.step)
    state.weight_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = list(state.network.parameters())
    all_reduce_gradients([p for p in params if p.requires_grad], _world_size())
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    state.weight_optimizer.step()
    return loss.item(), (logits.argmax(1) == y_t).float().mean().item()


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _draw_validation_batch(val_set, count: int, generator: torch.Generator, device: torch.device):
    # Drawn with replacement so that each train example has a validation partner.
    indices = torch.randint(len(val_set), (count,), generator=generator).tolist()
    images, labels = default_collate([val_set[i] for i in indices])
    return images.to(device), labels.to(device)


def _warmup_sample(state: ProxylessSearchState, config: ProxylessSearchConfig,
                   batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Draw a relaxed sample from the frozen distribution and take its argmax as the discrete one."""
    with torch.no_grad():
        relaxed = state.distribution.sample_relaxed(batch_size if config.per_example else 1, config.tau,
                                                    state.generator)
    discrete = [F.one_hot(s.argmax(-1), s.shape[-1]).to(s) for s in relaxed]
    return relaxed, discrete


# ---------------------------------------------------------------------------------------------
# Epochs


def run_search_epoch(state: ProxylessSearchState, config: ProxylessSearchConfig, train_set, val_set,
                     context: RunContext) -> dict[str, float]:
    device = context.device
    warmup = state.epoch < config.warmup_epochs
    loader = shard_loader(train_set, config.batch_size, config.seed, state.epoch, context.rank,
                          context.world_size, shuffle=True, drop_last=True, loader_workers=config.loader_workers)
    batches = len(loader)
    state.network.train()
    sums: dict[str, float] = {}
    for batch_index, (images, labels) in enumerate(loader):
        train_batch = (images.to(device), labels.to(device))
        latency_weight = latency_weight_at(config, state.epoch, batch_index, batches)

        if warmup:
            sample, discrete = _warmup_sample(state, config, images.shape[0])
            terms = sample_latency_terms(state, discrete, sample)
        else:
            val_batch = _draw_validation_batch(val_set, images.shape[0], state.generator, device)
            sample, terms = architecture_step(state, config, train_batch, val_batch, latency_weight)

        terms["train_loss"], terms["train_acc"] = weight_step(state, config, train_batch, sample)
        terms["latency_weight"] = latency_weight
        state.step += 1
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value
    return all_reduce_mean({key: value / max(batches, 1) for key, value in sums.items()}, context.world_size)


def _epoch_metrics(state: ProxylessSearchState, config: ProxylessSearchConfig, means: dict[str, float],
                   seconds: float) -> dict[str, Any]:
    genotype = state.distribution.genotype()
    latency = state.latency
    metrics = {
        "epoch": state.epoch,
        **means,
        "latency_target_ms": latency.target_ms,
        "genotype_latency_ms": latency.genotype_ms(genotype) if latency.measured else
        latency.surrogate.predict_genotype_ms(genotype),
        "genotype_surrogate_latency_ms": latency.surrogate.predict_genotype_ms(genotype),
        "surrogate_holdout_error": latency.surrogate.fit.get("holdout_relative_error", float("nan")),
        "entropy": state.distribution.entropy().item(),
        "expected_skips": state.distribution.expected_skips(),
        "skip_count": genotype.skip_count,
        "weight_lr": state.weight_optimizer.param_groups[0]["lr"],
        "arch_lr": state.arch_optimizer.param_groups[0]["lr"],
        "warmup": int(state.epoch <= config.warmup_epochs),
        "epoch_time_s": seconds,
        "genotype": genotype.to_json(),
    }
    if latency.surrogate_source is not None:
        metrics[SURROGATE_SOURCE_METRIC] = latency.surrogate_source
    return metrics


def set_learning_rates(state: ProxylessSearchState, config: ProxylessSearchConfig) -> None:
    """Set the learning rates: constant during warm-up, then a cosine over the remaining epochs."""
    search_epoch = max(0, state.epoch - config.warmup_epochs)
    search_epochs = config.epochs - config.warmup_epochs
    set_lr(state.weight_optimizer, cosine_value(config.weight_lr, config.weight_lr_min, search_epoch, search_epochs))
    set_lr(state.arch_optimizer, cosine_value(config.arch_lr, config.arch_lr_min, search_epoch, search_epochs))


def check_search_fits(config: ProxylessSearchConfig, train_size: int, world_size: int) -> None:
    if config.batch_size % world_size:
        raise UnasError(f"search.batch_size: {config.batch_size} does not split over {world_size} workers; "
                        f"use a multiple of {world_size}")
    if config.batch_size > train_size:
        raise UnasError(f"search.batch_size: {config.batch_size} is larger than the {train_size} search training "
                        f"examples; lower the batch size")


def run_proxyless_search(config: ProxylessSearchConfig, data: DataConfig, context: RunContext) -> Genotype:
    """Run (or resume) a latency-aware search and return the genotype of the final logits."""
    train_set, val_set = load_search_data(data)
    check_search_fits(config, len(train_set), context.world_size)
    state = build_search_state(config, data, context.device, context.rank)
    resumed = None
    with context.latest_checkpoint() as folder:
        if folder is not None:
            resumed = load_checkpoint(folder)
    if resumed is None:
        attach_latency(state, config, data, context)
    else:
        # The checkpoint carries the surrogate and target, so a resumed search keeps its objective.
        state.latency = _latency_from_checkpoint(resumed["latency"], config, data, context.device)
        state.load_state_dict(resumed)
        logger.info("resumed the proxyless search at epoch %d (step %d)", state.epoch, state.step)
    broadcast_parameters(state.network)
    broadcast_parameters(state.distribution)

    surrogate_json = json.dumps(state.latency.surrogate.to_dict(), indent=1)
    while state.epoch < config.epochs:
        set_learning_rates(state, config)
        started = time.perf_counter()
        means = run_search_epoch(state, config, train_set, val_set, context)
        state.epoch += 1
        metrics = _epoch_metrics(state, config, means, time.perf_counter() - started)
        if context.rank == 0:
            logger.info("proxyless search epoch %d/%d: train_loss %.3f latency %.3f ms (target %.3f) entropy %.2f",
                        state.epoch, config.epochs, means.get("train_loss", float("nan")),
                        means.get("latency_ms", float("nan")), state.latency.target_ms, metrics["entropy"])
        context.report_with_checkpoint(metrics, state.state_dict,
                                       {GENOTYPE_FILE: metrics["genotype"], SURROGATE_FILE: surrogate_json})
    return state.distribution.genotype()


def proxyless_search_worker(config: dict[str, Any]) -> None:
    """Run a search as a Ray Train worker; config contains 'search' (ProxylessSearchConfig) and 'data' (DataConfig)."""
    import torch.distributed as dist

    configure_worker_logging()
    context = RayTrainContext()
    genotype = run_proxyless_search(config["search"], config["data"], context)
    if context.rank == 0:
        logger.info("proxyless search finished with genotype\n%s", genotype.describe())
    if dist.is_initialized():
        dist.barrier()
