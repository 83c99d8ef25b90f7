"""Data-parallel helpers over torch.distributed; every function is the identity in a single process.

Why not DistributedDataParallel: a UDA train step runs several modules through several optimisers (segmenter,
discriminators, critics, generators), some forward passes feed two losses, and some modules are frozen per stage.
DDP wraps one module with one forward per backward. Averaging the gradients of each optimiser's parameters right
before its `step()` (an optimiser step pre-hook) synchronises every trained module of every method, whatever its
step looks like, with the same arithmetic as DDP (gradient mean over workers).
Batch norm: by default each worker normalises with its own batch statistics (DDP's default), so N workers at batch
B/N match one worker at batch B only where batch norm is frozen (the DeepLab-v2 recipe) or absent.
`--sync-batchnorm` replaces every trained batch norm with torch's SyncBatchNorm (statistics over the global batch);
torch implements it for GPU tensors only, so the option requires GPU workers. Frozen batch norms (eval mode, running
statistics) are left alone: they compute the same thing on every worker.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from methods.contract import Optim


def sync_batchnorm(modules: nn.Module) -> nn.Module:
    """Every batch norm whose affine parameters train becomes a SyncBatchNorm with the same state."""
    for name, child in list(modules.named_children()):
        if (
            isinstance(child, nn.modules.batchnorm._BatchNorm)
            and child.weight is not None
            and child.weight.requires_grad
        ):
            setattr(modules, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            sync_batchnorm(child)
    return modules


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


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """NCCL reduces CUDA tensors only: CPU tensors (confusion matrices, loss means) travel through the GPU."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    reduced = tensor.to(_comm_device(tensor), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over workers (what `StepContext.all_reduce_mean` gives methods for state updated in a step)."""
    if world_size() == 1:
        return tensor
    return all_reduce_sum(tensor) / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all workers (their first dimensions may differ), in rank order."""
    if world_size() == 1:
        return tensor
    device = _comm_device(tensor)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)]).to(tensor.device)
