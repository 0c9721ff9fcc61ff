"""The UNAS search loop: architecture steps through a gradient estimator, weight steps through
the same relaxed sample, with warm-up, cosine schedules and an exact-resume checkpoint per epoch.

One search step (`search_step`) does less work than the procedure it reproduces and gives the
same gradients in the same memory layout (bench/search_step.py and tests/workers/test_search.py
compare the two):

- The estimator's forwards on the discrete sample run without an autograd graph, because their
  loss is only used as a stop-gradient value. MixedEdge skips ops with an all-zero weight, so
  these forwards compute only the ops some example picked.
- The weight gradient comes from the train-batch forward on the relaxed sample that the
  architecture step already ran, so there is no separate weight forward. That sample has the
  value the weights train on, and the weight gradient does not depend on how the sample
  depends on the architecture logits.
- The backward pass of the architecture objective stops at the architecture logits, so it
  computes no weight gradients that would then be thrown away.
- On the CPU the supernet runs in the channels-last memory format, which is faster there. Its
  convolutions round differently from NCHW ones in float32.

`run_search` runs in a plain process (RunContext) or as a Ray Train worker (`search_worker`).
"""

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from search_spaces.darts import (
    IMAGENET_SEARCH_OPS,
    SEARCH_OPS,
    ArchitectureDistribution,
    Genotype,
    NetworkConfig,
    SearchNetwork,
    overlap_penalty,
)
from search_spaces.errors import UnasError
from workers.config import DataConfig, SearchConfig
from workers.context import (
    RayTrainContext,
    RunContext,
    capture_rng_state,
    configure_worker_logging,
    load_checkpoint,
    restore_rng_state,
)
from workers.data import describe_dataset, load_search_data
from workers.estimators import EstimateResult, create_estimator
from workers.training import (
    all_reduce_gradients,
    all_reduce_mean,
    broadcast_parameters,
    check_finite,
    cosine_value,
    fill_missing_gradients,
    seed_everything,
    set_lr,
    shard_loader,
)

logger = logging.getLogger(__name__)

GENOTYPE_FILE = "genotype.json"

# Per-step terms of the search objective, reported as epoch means, with the words errors use.
OBJECTIVE_TERMS = {
    "train_ce": "train cross-entropy",
    "val_ce": "validation cross-entropy",
    "gap": "generalization gap |val_ce - train_ce|",
    "overlap": "overlap penalty",
    "val_acc": "validation accuracy",
}

# Estimators whose EstimateResult.weight_sample is the discrete sample rather than the relaxed
# one: their forward on the discrete train batch must keep its graph for the weight update.
DISCRETE_WEIGHT_SAMPLE_ESTIMATORS = frozenset({"reinforce"})

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SearchState:
    """Everything a checkpoint holds; restoring it continues the search exactly."""

    network: SearchNetwork
    distribution: ArchitectureDistribution
    weight_optimizer: torch.optim.Optimizer
    arch_optimizer: torch.optim.Optimizer
    estimator: Any
    generator: torch.Generator
    epoch: int = 0
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "distribution": self.distribution.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "estimator": self.estimator.state_dict(),
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
        self.epoch = state["epoch"]
        self.step = state["step"]
        restore_rng_state(state["rng"], self.generator)


def search_ops(config: SearchConfig, dataset: str) -> tuple[str, ...]:
    if config.ops is not None:
        return tuple(config.ops)
    return IMAGENET_SEARCH_OPS if dataset == "imagenet" else SEARCH_OPS


def supernet_memory_format(device: torch.device) -> torch.memory_format:
    """Return the memory format of the supernet's weights and input batches on a device.

    On the CPU that is channels-last. The literal search step of bench/search_step.py took 5.5 s
    in it and 12.9 s in NCHW (torch 2.14, one thread, 8 cells, C = 16, 32x32 inputs).
    """
    # NOTE: CUDA keeps the default layout because channels-last has not been timed there.
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def learning_rate_scale(config: SearchConfig) -> float:
    """Return batch_size / reference_batch_size, the linear-scaling factor on every learning rate."""
    return config.batch_size / config.reference_batch_size


def create_search_state(config: SearchConfig, network_config: NetworkConfig, op_names: tuple[str, ...],
                        device: torch.device, rank: int) -> SearchState:
    """Build the supernet, the architecture distribution, both optimizers and the estimator."""
    seed_everything(config.seed)  # identical initial weights on every rank
    network = SearchNetwork(network_config, op_names).to(device=device,
                                                         memory_format=supernet_memory_format(device))
    distribution = ArchitectureDistribution(network.op_names, config.softening_eps).to(device)
    scale = learning_rate_scale(config)
    weight_optimizer = torch.optim.Adam(network.parameters(), lr=scale * config.weight_lr,
                                        weight_decay=config.weight_decay)
    arch_optimizer = torch.optim.Adam(distribution.parameters(), lr=scale * config.arch_lr,
                                      weight_decay=config.arch_weight_decay)
    estimator = create_estimator(config.estimator, **_estimator_options(config))
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    seed_everything(config.seed * 1000 + rank)
    return SearchState(network, distribution, weight_optimizer, arch_optimizer, estimator, generator)


def build_search_state(config: SearchConfig, data: DataConfig, device: torch.device, rank: int) -> SearchState:
    info = describe_dataset(data.name)
    network_config = NetworkConfig(config.chs, config.layers, info.num_classes, in_chs=info.in_chs)
    return create_search_state(config, network_config, search_ops(config, data.name), device, rank)


def _estimator_options(config: SearchConfig) -> dict[str, Any]:
    options = dict(config.estimator_options)
    if config.estimator != "reinforce":
        options.setdefault("tau", config.tau)
    return options


@dataclass
class _TrainForward:
    """A train-batch forward with an autograd graph in the weights, kept for the weight update."""

    sample: list[torch.Tensor]  # detached values of the architecture sample it ran on
    logits: torch.Tensor


@dataclass
class _SearchObjective:
    """The per-example search objective L(z), called by the estimator as its loss function.

    L(z) = CE_train + gap_weight * |CE_val - CE_train| + overlap_weight * overlap(z), or CE_val
    without the gap term. A sample that requires grad is relaxed: both forwards keep their graph.
    A discrete sample's forwards run without one, unless its train forward is the weight
    update's (``keep_discrete_train_graph``).
    """

    state: SearchState
    config: SearchConfig
    train_batch: Batch
    val_batch: Batch
    keep_discrete_train_graph: bool
    terms: dict[str, dict[str, float]] = field(default_factory=dict)
    train_forwards: list[_TrainForward] = field(default_factory=list)

    def __call__(self, sample: list[torch.Tensor]) -> torch.Tensor:
        (x_t, y_t), (x_v, y_v) = self.train_batch, self.val_batch
        relaxed = any(s.requires_grad for s in sample)
        keep_train_graph = relaxed or self.keep_discrete_train_graph
        weights = self.state.distribution.to_weights(sample)
        with torch.set_grad_enabled(keep_train_graph):
            train_logits = self.state.network(x_t, weights)
        with torch.set_grad_enabled(relaxed):
            val_logits = self.state.network(x_v, weights)
            ce_train = F.cross_entropy(train_logits, y_t, reduction="none")
            ce_val = F.cross_entropy(val_logits, y_v, reduction="none")
            gap = (ce_val - ce_train).abs()
            overlap = overlap_penalty(sample)
            loss = (ce_train + self.config.gap_weight * gap) if self.config.gap_term else ce_val
            if self.config.overlap_term:
                loss = loss + self.config.overlap_weight * overlap
        self._record_terms("relaxed" if relaxed else "discrete", ce_train, ce_val, gap, overlap,
                           val_logits, y_v)
        if keep_train_graph:
            self.train_forwards.append(_TrainForward([s.detach() for s in sample], train_logits))
        # Per-minibatch sampling draws one architecture: its loss is the batch mean.
        return loss if self.config.per_example else loss.mean().view(1)

    def _record_terms(self, kind: str, ce_train: torch.Tensor, ce_val: torch.Tensor, gap: torch.Tensor,
                      overlap: torch.Tensor, val_logits: torch.Tensor, y_v: torch.Tensor) -> None:
        with torch.no_grad():
            accuracy = (val_logits.argmax(1) == y_v).float().mean()
            values = torch.stack([ce_train.mean(), ce_val.mean(), gap.mean(), overlap.float().mean(), accuracy])
        terms = dict(zip(OBJECTIVE_TERMS, values.tolist()))
        for name, value in terms.items():
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"non-finite {OBJECTIVE_TERMS[name]} ({name} = {value}) on the {kind} architecture sample "
                    f"at step {self.state.step}. The last good checkpoint is kept, so the search can resume from it "
                    f"once the input data or the learning rates are fixed.")
        self.terms[kind] = terms

    def reported_terms(self) -> dict[str, float]:
        """Return the discrete sample's terms, or the relaxed one's when no discrete sample was evaluated."""
        return dict(self.terms.get("discrete") or self.terms["relaxed"])

    def weight_forward(self, result: EstimateResult) -> _TrainForward | None:
        """Return the recorded train forward on the estimator's weight sample, or None if none matches."""
        for forward in reversed(self.train_forwards):
            if _same_sample(forward.sample, result.weight_sample):
                return forward
        return None


def _same_sample(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    # rebar and relax evaluate s - s~ + stopgrad(s~), whose value may differ from s by rounding.
    return len(first) == len(second) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(first, second))


def search_step(state: SearchState, config: SearchConfig, train_batch: Batch, val_batch: Batch) -> dict[str, float]:
    """Update the architecture logits with the estimator, then the weights on the same relaxed sample.

    Return the objective terms of the step, plus the weight update's train loss and accuracy.
    """
    objective = _SearchObjective(state, config, train_batch, val_batch,
                                 keep_discrete_train_graph=config.estimator in DISCRETE_WEIGHT_SAMPLE_ESTIMATORS)
    num_samples = train_batch[0].shape[0] if config.per_example else 1
    result = state.estimator.estimate(state.distribution.normalized_logits(), objective, num_samples,
                                      state.generator)
    check_finite(result.surrogate, "architecture objective (estimator surrogate)", state.step)

    forward = objective.weight_forward(result)
    if forward is None:
        logger.debug("no recorded train forward on the weight sample; running a separate one")
        forward = _TrainForward(result.weight_sample, _forward_train(state, train_batch, result.weight_sample))
    weight_loss = F.cross_entropy(forward.logits, train_batch[1])
    check_finite(weight_loss, "weight loss (train cross-entropy on the weight sample)", state.step)

    # Both backward passes run before either optimizer changes a tensor that the graph saved.
    arch_params = list(state.distribution.parameters())
    state.arch_optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(result.surrogate, inputs=arch_params, retain_graph=True)
    weight_params = list(state.network.parameters())
    state.weight_optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(weight_loss, inputs=weight_params)

    _step_architecture(state, arch_params)
    _step_weights(state, config, weight_params)
    terms = objective.reported_terms()
    terms["objective"] = float(result.loss.mean())
    terms["train_loss"] = weight_loss.item()
    terms["train_acc"] = _accuracy(forward.logits, train_batch[1])
    return terms


def warmup_step(state: SearchState, config: SearchConfig, train_batch: Batch) -> dict[str, float]:
    """Update the weights only, on a relaxed sample of the frozen architecture distribution."""
    num_samples = train_batch[0].shape[0] if config.per_example else 1
    with torch.no_grad():
        sample = state.distribution.sample_relaxed(num_samples, config.tau, state.generator)
    logits = _forward_train(state, train_batch, sample)
    loss = F.cross_entropy(logits, train_batch[1])
    check_finite(loss, "weight loss (train cross-entropy on the weight sample)", state.step)
    weight_params = list(state.network.parameters())
    state.weight_optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=weight_params)
    _step_weights(state, config, weight_params)
    return {"train_loss": loss.item(), "train_acc": _accuracy(logits, train_batch[1])}


def _forward_train(state: SearchState, train_batch: Batch, sample: list[torch.Tensor]) -> torch.Tensor:
    weights = state.distribution.to_weights([s.detach() for s in sample])
    return state.network(train_batch[0], weights)


def _step_architecture(state: SearchState, arch_params: list[torch.nn.Parameter]) -> None:
    if hasattr(state.estimator, "step_control_variate"):
        state.estimator.step_control_variate()
    all_reduce_gradients(arch_params, _world_size())
    state.arch_optimizer.step()
    check_finite(torch.cat([p.detach().reshape(-1) for p in arch_params]), "architecture logits", state.step)


def _step_weights(state: SearchState, config: SearchConfig, weight_params: list[torch.nn.Parameter]) -> None:
    fill_missing_gradients(weight_params)
    all_reduce_gradients(weight_params, _world_size())
    torch.nn.utils.clip_grad_norm_(weight_params, config.grad_clip)
    state.weight_optimizer.step()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.detach().argmax(1) == labels).float().mean().item()


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Batch:
    return images.to(device, memory_format=supernet_memory_format(device)), labels.to(device)


def _draw_validation_batch(val_set, count: int, generator: torch.Generator, device: torch.device) -> Batch:
    # Drawn with replacement so that each train example has a validation partner.
    indices = torch.randint(len(val_set), (count,), generator=generator).tolist()
    images, labels = default_collate([val_set[i] for i in indices])
    return _to_device(images, labels, device)


def run_search_epoch(state: SearchState, config: SearchConfig, train_set, val_set, context: RunContext) -> dict[str, float]:
    device = context.device
    warmup = state.epoch < config.warmup_epochs
    loader = shard_loader(train_set, config.batch_size, config.seed, state.epoch, context.rank,
                          context.world_size, shuffle=True, drop_last=True, loader_workers=config.loader_workers)
    state.network.train()
    sums: dict[str, float] = {}
    batches = 0
    for images, labels in loader:
        train_batch = _to_device(images, labels, device)
        if warmup:
            terms = warmup_step(state, config, train_batch)
        else:
            val_batch = _draw_validation_batch(val_set, images.shape[0], state.generator, device)
            terms = search_step(state, config, train_batch, val_batch)
        state.step += 1
        batches += 1
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value
    return all_reduce_mean({key: value / max(batches, 1) for key, value in sums.items()}, context.world_size)


def _epoch_metrics(state: SearchState, config: SearchConfig, means: dict[str, float], seconds: float) -> dict[str, Any]:
    genotype = state.distribution.genotype()
    skips = {cell: sum(edge.op == "skip_connect" for node in genotype.cell(cell) for edge in node)
             for cell in ("normal", "reduce")}
    # Before the first architecture step the genotype is the argmax of uniform logits: no signal.
    if skips["normal"] > 2 and state.epoch > config.warmup_epochs:
        logger.warning("epoch %d: the normal cell has %d skip connections", state.epoch, skips["normal"])
    return {
        "epoch": state.epoch,
        **means,
        "entropy": state.distribution.entropy().item(),
        "skip_count_normal": skips["normal"],
        "skip_count_reduce": skips["reduce"],
        "weight_lr": state.weight_optimizer.param_groups[0]["lr"],
        "arch_lr": state.arch_optimizer.param_groups[0]["lr"],
        "warmup": int(state.epoch <= config.warmup_epochs),
        "epoch_time_s": seconds,
        "genotype": genotype.to_json(),
    }


def set_learning_rates(state: SearchState, config: SearchConfig) -> None:
    """Set the epoch's learning rates: constant in warm-up, then a cosine, both times the batch scale.

    The cosine spans the epochs after warm-up only.
    """
    search_epoch = max(0, state.epoch - config.warmup_epochs)
    search_epochs = config.epochs - config.warmup_epochs
    scale = learning_rate_scale(config)
    set_lr(state.weight_optimizer,
           scale * cosine_value(config.weight_lr, config.weight_lr_min, search_epoch, search_epochs))
    set_lr(state.arch_optimizer,
           scale * cosine_value(config.arch_lr, config.arch_lr_min, search_epoch, search_epochs))


def check_search_fits(config: SearchConfig, train_size: int, world_size: int) -> None:
    if config.reference_batch_size <= 0:
        raise UnasError(f"search.reference_batch_size: {config.reference_batch_size} is not positive. Set it to "
                        f"the global batch that the configured learning rates are meant for (64 in UNAS).")
    if config.batch_size % world_size:
        raise UnasError(f"search.batch_size: {config.batch_size} does not split over {world_size} workers; "
                        f"use a multiple of {world_size}")
    if config.batch_size > train_size:
        raise UnasError(f"search.batch_size: {config.batch_size} is larger than the {train_size} search training "
                        f"examples; lower the batch size")


def run_search(config: SearchConfig, data: DataConfig, context: RunContext) -> Genotype:
    """Runs (or resumes) a search and returns the genotype of the final logits."""
    train_set, val_set = load_search_data(data)
    check_search_fits(config, len(train_set), context.world_size)
    state = build_search_state(config, data, context.device, context.rank)
    with context.latest_checkpoint() as folder:
        if folder is not None:
            state.load_state_dict(load_checkpoint(folder))
            logger.info("resumed the search at epoch %d (step %d)", state.epoch, state.step)
    broadcast_parameters(state.network)
    broadcast_parameters(state.distribution)
    if context.rank == 0:
        logger.info("learning rates scaled by %.3g (global batch %d, reference batch %d)",
                    learning_rate_scale(config), config.batch_size, config.reference_batch_size)

    while state.epoch < config.epochs:
        set_learning_rates(state, config)
        started = time.perf_counter()
        means = run_search_epoch(state, config, train_set, val_set, context)
        state.epoch += 1
        metrics = _epoch_metrics(state, config, means, time.perf_counter() - started)
        if context.rank == 0:
            logger.info("search epoch %d/%d: train_loss %.3f train_acc %.3f entropy %.2f", state.epoch,
                        config.epochs, means.get("train_loss", float("nan")), means.get("train_acc", float("nan")),
                        metrics["entropy"])
        context.report_with_checkpoint(metrics, state.state_dict, {GENOTYPE_FILE: metrics["genotype"]})
    return state.distribution.genotype()


def search_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: config contains 'search' (SearchConfig) and 'data' (DataConfig)."""
    import torch.distributed as dist

    configure_worker_logging()
    context = RayTrainContext()
    genotype = run_search(config["search"], config["data"], context)
    if context.rank == 0:
        logger.info("search finished with genotype\n%s", genotype.describe())
    if dist.is_initialized():
        dist.barrier()
