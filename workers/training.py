"""Pieces shared by the search and evaluation loops: seeding, sharded batches, gradient sync."""

import logging
import math
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """Returns the same shuffled order on every rank for a given (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(count).tolist()


def shard_loader(dataset: Dataset, global_batch: int, seed: int, epoch: int, rank: int, world_size: int,
                 shuffle: bool, drop_last: bool, loader_workers: int = 0) -> DataLoader:
    """Builds a loader over this rank's share of the data. Each global batch splits evenly over ranks."""
    order = epoch_order(len(dataset), seed, epoch) if shuffle else list(range(len(dataset)))
    per_rank = global_batch // world_size
    if drop_last:
        order = order[: len(order) // global_batch * global_batch]
    shard = order[rank::world_size]
    return DataLoader(dataset, batch_size=per_rank, sampler=shard, drop_last=drop_last,
                      num_workers=loader_workers, persistent_workers=False)


def all_reduce_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Averages gradients over ranks; a parameter unused on a rank contributes zeros."""
    if world_size == 1 or not dist.is_initialized():
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([param.grad.reshape(-1) for param in params])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for param in params:
        count = param.numel()
        param.grad.copy_(flat[offset:offset + count].view_as(param))
        offset += count


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Starts every rank from rank 0's values."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def fill_missing_gradients(params: list[torch.nn.Parameter]) -> None:
    """Give every parameter without a gradient a zero one.

    A supernet op that no example used gets no gradient, and Adam would skip it. With a zero
    gradient, Adam applies weight decay and moment decay to it on every rank alike. That is
    what happens when the op is computed and multiplied by a zero architecture weight.
    """
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)


def all_reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1 or not dist.is_initialized():
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: float(v) / world_size for k, v in zip(keys, tensor)}


def cosine_value(start: float, end: float, step: int, total: int) -> float:
    """Cosine from start (step 0) to end (step total)."""
    if total <= 0:
        return start
    progress = min(step, total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"non-finite {what} at step {step}; the last good checkpoint is kept")
