"""Data-parallel helpers over torch.distributed; every function is the identity in a single process.

Why not DistributedDataParallel: a UDA train step runs several modules through several optimisers (segmenter,
discriminators, critics, generators), some forward passes feed two losses, and some modules are frozen per stage.
DDP wraps one module with one forward per backward. Averaging the gradients of each optimiser's parameters right
before its `step()` (an optimiser step pre-hook) synchronises every trained module of every method, whatever its
step looks like, with the same arithmetic as DDP (gradient mean over workers).
Batch norm: each worker normalises with its own batch statistics (DDP's default); see docs/architecture.md.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from methods.contract import Optim


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_parameters(module: nn.Module) -> None:
    """Give every worker rank 0's initial parameters and buffers."""
    if world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def _average_gradients(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    size = world_size()
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad.div_(size)


def synchronise_gradients(optims: Iterable[Optim]) -> None:
    if world_size() == 1:
        return
    for optim in optims:
        optim.optimizer.register_step_pre_hook(_average_gradients)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all workers (their first dimensions may differ), in rank order."""
    if world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])
