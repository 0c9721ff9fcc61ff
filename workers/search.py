"""The UNAS search loop: architecture steps through a gradient estimator, weight steps through
the same relaxed sample, with warm-up, cosine schedules and an exact-resume checkpoint per epoch.

`run_search` runs in a plain process (RunContext) or as a Ray Train worker (`search_worker`).
"""

import logging
import shutil
import time
from dataclasses import dataclass
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
from workers.context import RayTrainContext, RunContext, capture_rng_state, configure_worker_logging, load_checkpoint, restore_rng_state, save_checkpoint
from workers.data import describe_dataset, load_search_data
from workers.estimators import create_estimator
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


def build_search_state(config: SearchConfig, data: DataConfig, device: torch.device, rank: int) -> SearchState:
    info = describe_dataset(data.name)
    seed_everything(config.seed)  # identical initial weights on every rank
    network_config = NetworkConfig(config.chs, config.layers, info.num_classes, in_chs=info.in_chs)
    network = SearchNetwork(network_config, search_ops(config, data.name)).to(device)
    distribution = ArchitectureDistribution(network.op_names, config.softening_eps).to(device)
    weight_optimizer = torch.optim.Adam(network.parameters(), lr=config.weight_lr, weight_decay=config.weight_decay)
    arch_optimizer = torch.optim.Adam(distribution.parameters(), lr=config.arch_lr, weight_decay=config.arch_weight_decay)
    estimator = create_estimator(config.estimator, **_estimator_options(config))
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    seed_everything(config.seed * 1000 + rank)
    return SearchState(network, distribution, weight_optimizer, arch_optimizer, estimator, generator)


def _estimator_options(config: SearchConfig) -> dict[str, Any]:
    options = dict(config.estimator_options)
    if config.estimator != "reinforce":
        options.setdefault("tau", config.tau)
    return options


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def architecture_step(state: SearchState, config: SearchConfig, train_batch, val_batch) -> tuple[list, dict[str, float]]:
    """One estimator update of the architecture logits; returns the weights' sample and the terms."""
    (x_t, y_t), (x_v, y_v) = train_batch, val_batch
    terms: dict[str, float] = {}

    def objective(sample: list[torch.Tensor]) -> torch.Tensor:
        weights = state.distribution.to_weights(sample)
        ce_train = _per_example_loss(state.network(x_t, weights), y_t)
        val_logits = state.network(x_v, weights)
        ce_val = _per_example_loss(val_logits, y_v)
        if config.gap_term:
            loss = ce_train + config.gap_weight * (ce_val - ce_train).abs()
        else:
            loss = ce_val
        overlap = overlap_penalty(sample)
        if config.overlap_term:
            loss = loss + config.overlap_weight * overlap
        with torch.no_grad():
            terms.update(train_ce=ce_train.mean().item(), val_ce=ce_val.mean().item(),
                         gap=(ce_val - ce_train).abs().mean().item(), overlap=overlap.float().mean().item(),
                         val_acc=(val_logits.argmax(1) == y_v).float().mean().item())
        # Per-minibatch sampling draws one architecture: its loss is the batch mean.
        return loss if config.per_example else loss.mean().view(1)

    num_samples = x_t.shape[0] if config.per_example else 1
    logits = state.distribution.normalized_logits()
    result = state.estimator.estimate(logits, objective, num_samples, state.generator)
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
    return [s.detach() for s in result.weight_sample], terms


def weight_step(state: SearchState, config: SearchConfig, train_batch, sample: list[torch.Tensor]) -> tuple[float, float]:
    """One Adam step on the supernet weights through a fixed (detached) architecture sample."""
    x_t, y_t = train_batch
    weights = state.distribution.to_weights(sample)
    logits = state.network(x_t, weights)
    loss = F.cross_entropy(logits, y_t)
    check_finite(loss, "weight loss (train cross-entropy)", state.step)
    state.weight_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in state.network.parameters()]
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


def run_search_epoch(state: SearchState, config: SearchConfig, train_set, val_set, context: RunContext) -> dict[str, float]:
    device = context.device
    warmup = state.epoch < config.warmup_epochs
    loader = shard_loader(train_set, config.batch_size, config.seed, state.epoch, context.rank,
                          context.world_size, shuffle=True, drop_last=True, loader_workers=config.loader_workers)
    state.network.train()
    sums: dict[str, float] = {}
    batches = 0
    for images, labels in loader:
        train_batch = (images.to(device), labels.to(device))
        if warmup:
            with torch.no_grad():
                sample = state.distribution.sample_relaxed(images.shape[0] if config.per_example else 1,
                                                           config.tau, state.generator)
            terms: dict[str, float] = {}
        else:
            val_batch = _draw_validation_batch(val_set, images.shape[0], state.generator, device)
            sample, terms = architecture_step(state, config, train_batch, val_batch)
        terms["train_loss"], terms["train_acc"] = weight_step(state, config, train_batch, sample)
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
    """Constant during warm-up; cosine over the remaining epochs afterwards."""
    search_epoch = max(0, state.epoch - config.warmup_epochs)
    search_epochs = config.epochs - config.warmup_epochs
    set_lr(state.weight_optimizer, cosine_value(config.weight_lr, config.weight_lr_min, search_epoch, search_epochs))
    set_lr(state.arch_optimizer, cosine_value(config.arch_lr, config.arch_lr_min, search_epoch, search_epochs))


def check_search_fits(config: SearchConfig, train_size: int, world_size: int) -> None:
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
        folder = save_checkpoint(state.state_dict(), {GENOTYPE_FILE: metrics["genotype"]}) if context.rank == 0 else None
        context.report(metrics, folder)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return state.distribution.genotype()


def search_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: config holds 'search' (SearchConfig) and 'data' (DataConfig)."""
    import torch.distributed as dist

    configure_worker_logging()
    context = RayTrainContext()
    genotype = run_search(config["search"], config["data"], context)
    if context.rank == 0:
        logger.info("search finished with genotype\n%s", genotype.describe())
    if dist.is_initialized():
        dist.barrier()
