"""The evaluation loop: train a genotype's network from scratch with a recipe and test it.

The reported error is the one at the end of training; the minimum over epochs is logged
beside it. A checkpoint every epoch lets an interrupted trial continue where it stopped.

`paper_recipe` returns the published recipes with any field overridden:

- CIFAR: 600 epochs, batch 128, SGD momentum 0.9, weight decay 3e-4, gradient clipping 5.
  The lr warms up linearly to 0.05 over 30 epochs and then follows a cosine to 0. Training
  images get cutout 16, drop path ramps up linearly to 0.2 (CIFAR-10) or 0.3 (CIFAR-100), and
  the auxiliary head's loss has weight 0.4.
- ImageNet: 250 epochs, 14 cells of 48 channels, SGD momentum 0.9, weight decay 3e-5, gradient
  clipping 5. The lr is 0.1 per 128 images of global batch (linear scaling, see `lr_scale`)
  after 5 warm-up epochs. The training loss uses label smoothing 0.1 and auxiliary weight 0.4.
  There is no cutout and no drop path.
- ProxylessNAS space, ImageNet: 300 epochs, SGD momentum 0.9, weight decay 5e-5. The lr is 0.2
  per 512 images of global batch (linear scaling) after 5 warm-up epochs, then a cosine to 0.
  The training loss uses label smoothing 0.1. There is no cutout, drop path or auxiliary head.

`run_evaluation` trains the network that its `build_network` argument builds: the DARTS network
by default, or the one of another space from `workers.genotype_spaces`.
"""

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.darts import EvalNetwork, Genotype, NetworkConfig
from search_spaces.darts.counting import count_params_m
from search_spaces.errors import UnasError
from workers.config import DataConfig, EvalRecipe
from workers.context import RunContext, capture_rng_state, load_checkpoint, restore_rng_state
from workers.data import describe_dataset, is_in_memory, load_eval_data
from workers.training import all_reduce_gradients, all_reduce_mean, seed_everything, set_lr, shard_loader

logger = logging.getLogger(__name__)

# The published recipes by search space, then data set.
PAPER_RECIPES: dict[str, dict[str, EvalRecipe]] = {
    "darts": {
        "cifar10": EvalRecipe(),
        "cifar100": EvalRecipe(drop_path=0.3),
        # UNAS (Vahdat et al., CVPR 2020) trains ImageNet with 128 images per GPU and lr 0.1 scaled
        # linearly with the GPUs, which batch_size = 128 x GPUs reproduces here. The 14 cells of 48
        # channels and the absence of drop path follow DARTS's train_imagenet.py defaults.
        "imagenet": EvalRecipe(chs=48, layers=14, epochs=250, batch_size=128, lr=0.1, reference_batch_size=128,
                               weight_decay=3e-5, warmup_epochs=5, drop_path=0.0, cutout=0, label_smoothing=0.1),
    },
    "proxyless": {
        # chs and layers do not apply: the search section's network fields shape the network.
        # NOTE: this loop clips gradients at norm 5 in every recipe, but the published recipe
        # names no clipping.
        "imagenet": EvalRecipe(epochs=300, batch_size=512, lr=0.2, reference_batch_size=512, weight_decay=5e-5,
                               warmup_epochs=5, drop_path=0.0, auxiliary_weight=0.0, cutout=0,
                               label_smoothing=0.1),
    },
}

# Builds the evaluation network of a genotype for a recipe and data set.
NetworkBuilder = Callable[[Any, EvalRecipe, DataConfig], nn.Module]


def paper_recipe(dataset: str, space: str = "darts", **overrides) -> EvalRecipe:
    """Builds the published recipe of a data set in a search space with the given fields replaced."""
    recipes = PAPER_RECIPES.get(space, {})
    if dataset not in recipes:
        known = ", ".join(f"{dataset_name} ({space_name})" for space_name, by_dataset in PAPER_RECIPES.items()
                          for dataset_name in by_dataset)
        raise UnasError(f"evaluate.recipe: no published recipe for {dataset!r} in the {space!r} space; "
                        f"known: {known}")
    fields = {field.name for field in dataclasses.fields(EvalRecipe)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UnasError(f"evaluate.recipe: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(recipes[dataset], **overrides)


def lr_scale(recipe: EvalRecipe) -> float:
    """Returns the linear-scaling factor batch_size / reference_batch_size (1 when no reference is set).

    The factor follows the global batch, not the number of workers, so one global batch split
    over more or fewer GPUs trains with the same lr.
    """
    if recipe.reference_batch_size <= 0:
        return 1.0
    return recipe.batch_size / recipe.reference_batch_size


def recipe_lr(recipe: EvalRecipe, epoch: int) -> float:
    """Returns the learning rate of an epoch (0-based): linear warm-up, then cosine to lr_min.

    With W > 0 warm-up epochs, epoch e < W uses lr * (e + 1) / W, so epoch 0 already trains at
    lr / W and epoch W - 1 reaches lr. The cosine then starts at lr in epoch W and would reach
    lr_min at epoch `epochs`, one past the last. With W = 0, epoch 0 uses lr itself. Both lr
    and lr_min are multiplied by `lr_scale(recipe)`.
    """
    peak, floor = recipe.lr * lr_scale(recipe), recipe.lr_min * lr_scale(recipe)
    if epoch < recipe.warmup_epochs:
        return peak * (epoch + 1) / recipe.warmup_epochs
    cosine_epochs = max(1, recipe.epochs - recipe.warmup_epochs)
    progress = (epoch - recipe.warmup_epochs) / cosine_epochs
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def drop_path_prob(recipe: EvalRecipe, epoch: int) -> float:
    """Ramped linearly from 0 to recipe.drop_path over the epochs."""
    return recipe.drop_path * epoch / recipe.epochs


@dataclass
class EvalOutcome:
    test_error: float
    min_test_error: float
    params_m: float
    epochs: int


def network_config(recipe: EvalRecipe, data: DataConfig) -> NetworkConfig:
    """Builds the evaluation network's shape; ImageNet gets the three-conv stride-8 stem."""
    info = describe_dataset(data.name, data.root)
    stem = "imagenet" if data.name == "imagenet" else "cifar"
    return NetworkConfig(recipe.chs, recipe.layers, info.num_classes, in_chs=info.in_chs, stem=stem)


def build_eval_network(genotype: Genotype, recipe: EvalRecipe, data: DataConfig) -> EvalNetwork:
    return EvalNetwork(genotype, network_config(recipe, data), auxiliary=recipe.auxiliary_weight > 0)


def check_recipe(recipe: EvalRecipe, world_size: int, train_examples: int) -> None:
    """Raises UnasError for a recipe this loop cannot run, naming the field and the fix."""
    if recipe.epochs <= 0:
        raise UnasError(f"evaluate.recipe.epochs: {recipe.epochs} is not allowed; train for at least one epoch")
    if not 0 <= recipe.warmup_epochs < recipe.epochs:
        raise UnasError(f"evaluate.recipe.warmup_epochs: {recipe.warmup_epochs} must be in 0..{recipe.epochs - 1} "
                        f"(below epochs)")
    if recipe.reference_batch_size < 0:
        raise UnasError(f"evaluate.recipe.reference_batch_size: {recipe.reference_batch_size} is negative; "
                        f"use 0 for no scaling")
    if recipe.batch_size > train_examples:
        raise UnasError(f"evaluate.recipe.batch_size: {recipe.batch_size} is larger than the {train_examples} "
                        f"training examples; lower the batch size")
    if recipe.batch_size % world_size:
        raise UnasError(f"evaluate.recipe.batch_size: {recipe.batch_size} does not split evenly over "
                        f"{world_size} workers; use a multiple of {world_size}")


def trial_cpus() -> int:
    """CPUs of this trial: Ray's assignment inside a Ray task or actor, else the CPU affinity."""
    try:
        import ray

        if ray.is_initialized():
            assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if assigned:
                return max(1, int(assigned))
    except ImportError:
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_loader_workers(recipe: EvalRecipe, data: DataConfig) -> int:
    """recipe.loader_workers, or for -1 one loader process per trial CPU beside the training one."""
    if recipe.loader_workers >= 0:
        return recipe.loader_workers
    if is_in_memory(data.name):
        return 0
    return max(0, trial_cpus() - 1)


def training_loss(logits: torch.Tensor, aux_logits: torch.Tensor | None, labels: torch.Tensor,
                  recipe: EvalRecipe) -> torch.Tensor:
    """Cross-entropy with the recipe's label smoothing, plus the weighted auxiliary head's."""
    loss = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
    if aux_logits is not None:
        aux_loss = F.cross_entropy(aux_logits, labels, label_smoothing=recipe.label_smoothing)
        loss = loss + recipe.auxiliary_weight * aux_loss
    return loss


def train_epoch(network: nn.Module, optimizer: torch.optim.Optimizer, recipe: EvalRecipe, loader,
                device: torch.device, world_size: int) -> dict[str, float]:
    """Trains one pass over the loader; `lr` in the result is the one the optimizer stepped with."""
    network.train()
    loss_sum, correct, seen = 0.0, 0, 0
    lr = optimizer.param_groups[0]["lr"]
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits, aux_logits = network(images)
        loss = training_loss(logits, aux_logits, labels, recipe)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite training loss; the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients([p for p in network.parameters() if p.requires_grad], world_size)
        torch.nn.utils.clip_grad_norm_(network.parameters(), recipe.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        loss_sum += loss.item() * labels.shape[0]
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.shape[0]
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "lr": lr}


@torch.no_grad()
def test_network(network: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Plain cross-entropy and accuracy on the test images (no smoothing, no augmentation)."""
    network.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits, _ = network(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.shape[0]
    return {"test_loss": loss_sum / max(seen, 1), "test_acc": correct / max(seen, 1)}


@dataclass
class _Progress:
    epoch: int = 0
    test_error: float = 1.0
    min_test_error: float = 1.0


def _resume(network: nn.Module, optimizer: torch.optim.Optimizer, context: RunContext) -> _Progress:
    with context.latest_checkpoint() as folder:
        if folder is None:
            return _Progress()
        state = load_checkpoint(folder)
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])
    logger.info("resumed the evaluation after epoch %d", state["epoch"])
    return _Progress(state["epoch"], state["test_error"], state["min_test_error"])


def _checkpoint_state(network: nn.Module, optimizer: torch.optim.Optimizer, progress: _Progress) -> dict:
    return {"network": network.state_dict(), "optimizer": optimizer.state_dict(), "epoch": progress.epoch,
            "min_test_error": progress.min_test_error, "test_error": progress.test_error,
            "rng": capture_rng_state()}


def run_evaluation(genotype: Any, recipe: EvalRecipe, data: DataConfig, context: RunContext,
                   build_network: NetworkBuilder = build_eval_network) -> EvalOutcome:
    """Trains (or resumes) the genotype's network and returns its final and minimum test error."""
    train_set, test_set = load_eval_data(data, recipe.cutout)
    check_recipe(recipe, context.world_size, len(train_set))
    device = context.device
    loader_workers = resolve_loader_workers(recipe, data)
    seed_everything(recipe.seed)
    network = build_network(genotype, recipe, data).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=recipe_lr(recipe, 0), momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    progress = _resume(network, optimizer, context)

    while progress.epoch < recipe.epochs:
        started = time.perf_counter()
        set_lr(optimizer, recipe_lr(recipe, progress.epoch))
        drop_prob = drop_path_prob(recipe, progress.epoch)
        network.set_drop_path_prob(drop_prob)
        train_loader = shard_loader(train_set, recipe.batch_size, recipe.seed, progress.epoch, context.rank,
                                    context.world_size, shuffle=True, drop_last=True, loader_workers=loader_workers)
        train_metrics = train_epoch(network, optimizer, recipe, train_loader, device, context.world_size)
        test_loader = shard_loader(test_set, recipe.batch_size, recipe.seed, progress.epoch, context.rank,
                                   context.world_size, shuffle=False, drop_last=False, loader_workers=loader_workers)
        test_metrics = all_reduce_mean(test_network(network, test_loader, device), context.world_size)

        progress.epoch += 1
        progress.test_error = 1.0 - test_metrics["test_acc"]
        progress.min_test_error = min(progress.min_test_error, progress.test_error)
        metrics = {"epoch": progress.epoch, **train_metrics, **test_metrics, "drop_path_prob": drop_prob,
                   "test_error": progress.test_error, "min_test_error": progress.min_test_error,
                   "epoch_time_s": time.perf_counter() - started}
        if context.rank == 0:
            logger.info("evaluation epoch %d/%d: lr %.4g train_acc %.3f test_acc %.3f", progress.epoch,
                        recipe.epochs, train_metrics["lr"], train_metrics["train_acc"], test_metrics["test_acc"])
        context.report_with_checkpoint(metrics, lambda: _checkpoint_state(network, optimizer, progress))

    logger.info("evaluation done: final test error %.4f (minimum over epochs %.4f)", progress.test_error,
                progress.min_test_error)
    return EvalOutcome(test_error=progress.test_error, min_test_error=progress.min_test_error,
                       params_m=count_params_m(network), epochs=progress.epoch)


def evaluation_worker(config: dict) -> None:
    """Ray Train entry point of an evaluation that spans several workers (DDP over the group).

    config contains 'genotype' (JSON), 'space' (the GenotypeSpace that parses it and builds its
    network), 'recipe' (EvalRecipe) and 'data' (DataConfig). The final and minimum test errors
    are in the last epoch's reported metrics.
    """
    from workers.context import RayTrainContext, configure_worker_logging

    configure_worker_logging()
    space = config["space"]
    run_evaluation(space.parse_genotype(config["genotype"]), config["recipe"], config["data"], RayTrainContext(),
                   build_network=space.build_network)
