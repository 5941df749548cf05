"""The few torch.distributed calls of the pretraining, kept in one place.

The training script runs unchanged on one process or under ``torchrun`` (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): :func:`init` starts the process group (NCCL on CUDA, gloo on CPU) only
when WORLD_SIZE > 1. Every other function is a no-op on one process.

Data parallelism is plain: every process holds the full student and teacher, computes the loss on its slice of
the global batch, and :func:`all_reduce_grads` averages the gradients (one flat all-reduce) before the optimiser
step, so all replicas stay identical. Loss statistics that need the whole batch (teacher centering,
Sinkhorn-Knopp, KoLeo neighbours) use :func:`all_reduce_` and :func:`all_gather_grad`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, int]:
    """Start the process group when launched by torchrun; returns (rank, world_size, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum ("sum"), mean ("mean") or max ("max") of ``t`` over processes; returns ``t``."""
    if active():
        if op == "max":
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if op == "mean":
                t.div_(dist.get_world_size())
    return t


def all_reduce_grads(params) -> None:
    """Average the gradients of ``params`` over processes (missing gradients count as zeros)."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of the gathered tensor over processes and keeps one's own rows."""

    @staticmethod
    def forward(ctx, x):
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = dist.get_rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) of every process (same B on each) along dim 0, differentiably: the gradient
    of every copy flows back to the process that owns the rows."""
    if not active():
        return x
    return _GatherWithGrad.apply(x)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process."""
    if not active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
