"""The evaluation loop: train a genotype's network from scratch with a recipe and test it.

The reported error is the one at the end of training; the minimum over epochs is logged
beside it. A checkpoint every epoch lets an interrupted trial continue where it stopped.
"""

import logging
import math
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from search_spaces.darts import EvalNetwork, Genotype, NetworkConfig
from search_spaces.darts.counting import count_params_m
from search_spaces.errors import UnasError
from workers.config import DataConfig, EvalRecipe
from workers.context import RunContext, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from workers.data import describe_dataset, load_eval_data
from workers.training import all_reduce_gradients, all_reduce_mean, seed_everything, set_lr, shard_loader

logger = logging.getLogger(__name__)


def recipe_lr(recipe: EvalRecipe, epoch: int) -> float:
    """The learning rate of an epoch (0-based): linear warm-up, then cosine to lr_min."""
    if epoch < recipe.warmup_epochs:
        return recipe.lr * (epoch + 1) / recipe.warmup_epochs
    cosine_epochs = recipe.epochs - recipe.warmup_epochs
    progress = (epoch - recipe.warmup_epochs) / cosine_epochs
    return recipe.lr_min + 0.5 * (recipe.lr - recipe.lr_min) * (1.0 + math.cos(math.pi * progress))


def drop_path_prob(recipe: EvalRecipe, epoch: int) -> float:
    """Ramped linearly from 0 to recipe.drop_path over the epochs."""
    return recipe.drop_path * epoch / recipe.epochs


@dataclass
class EvalOutcome:
    test_error: float
    min_test_error: float
    params_m: float
    epochs: int


def build_eval_network(genotype: Genotype, recipe: EvalRecipe, data: DataConfig) -> EvalNetwork:
    info = describe_dataset(data.name)
    config = NetworkConfig(recipe.chs, recipe.layers, info.num_classes, in_chs=info.in_chs)
    return EvalNetwork(genotype, config, auxiliary=recipe.auxiliary_weight > 0)


def train_epoch(network: EvalNetwork, optimizer, recipe: EvalRecipe, loader, device, world_size: int) -> dict[str, float]:
    network.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits, aux_logits = network(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
        if aux_logits is not None:
            loss = loss + recipe.auxiliary_weight * F.cross_entropy(aux_logits, labels,
                                                                    label_smoothing=recipe.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite training loss; the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients([p for p in network.parameters() if p.requires_grad], world_size)
        torch.nn.utils.clip_grad_norm_(network.parameters(), recipe.grad_clip)
        optimizer.step()
        loss_sum += loss.item() * labels.shape[0]
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.shape[0]
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}


@torch.no_grad()
def test_network(network: EvalNetwork, loader, device) -> dict[str, float]:
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


def run_evaluation(genotype: Genotype, recipe: EvalRecipe, data: DataConfig, context: RunContext) -> EvalOutcome:
    """Trains (or resumes) the genotype's network and returns its final and minimum test error."""
    train_set, test_set = load_eval_data(data, recipe.cutout)
    if recipe.batch_size > len(train_set):
        raise UnasError(f"evaluation.batch_size: {recipe.batch_size} is larger than the {len(train_set)} training "
                        f"examples; lower the batch size")
    device = context.device
    seed_everything(recipe.seed)
    network = build_eval_network(genotype, recipe, data).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    epoch, min_error, test_error = 0, 1.0, 1.0
    with context.latest_checkpoint() as folder:
        if folder is not None:
            state = load_checkpoint(folder)
            network.load_state_dict(state["network"])
            optimizer.load_state_dict(state["optimizer"])
            epoch, min_error, test_error = state["epoch"], state["min_test_error"], state["test_error"]
            restore_rng_state(state["rng"])
            logger.info("resumed the evaluation at epoch %d", epoch)

    while epoch < recipe.epochs:
        started = time.perf_counter()
        lr = recipe_lr(recipe, epoch)
        set_lr(optimizer, lr)
        network.set_drop_path_prob(drop_path_prob(recipe, epoch))
        train_loader = shard_loader(train_set, recipe.batch_size, recipe.seed, epoch, context.rank,
                                    context.world_size, shuffle=True, drop_last=True,
                                    loader_workers=recipe.loader_workers)
        train_metrics = train_epoch(network, optimizer, recipe, train_loader, device, context.world_size)
        test_loader = shard_loader(test_set, recipe.batch_size, recipe.seed, epoch, context.rank,
                                   context.world_size, shuffle=False, drop_last=False,
                                   loader_workers=recipe.loader_workers)
        test_metrics = all_reduce_mean(test_network(network, test_loader, device), context.world_size)
        epoch += 1
        test_error = 1.0 - test_metrics["test_acc"]
        min_error = min(min_error, test_error)
        metrics = {"epoch": epoch, **train_metrics, **test_metrics, "lr": lr,
                   "test_error": test_error, "min_test_error": min_error,
                   "epoch_time_s": time.perf_counter() - started}
        folder = None
        if context.rank == 0:
            folder = save_checkpoint({"network": network.state_dict(), "optimizer": optimizer.state_dict(),
                                      "epoch": epoch, "min_test_error": min_error,
                                      "test_error": test_error, "rng": capture_rng_state()})
            logger.info("evaluation epoch %d/%d: train_acc %.3f test_acc %.3f", epoch, recipe.epochs,
                        train_metrics["train_acc"], test_metrics["test_acc"])
        context.report(metrics, folder)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return EvalOutcome(test_error=test_error, min_test_error=min_error,
                       params_m=count_params_m(network), epochs=epoch)
