"""Gathering across processes. Nothing else in the library knows about ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward all-reduces (sums) the incoming gradient and returns this rank's slice.

    Every rank computes the same global loss L from the gathered tensor, so the summed slice is W·∂L/∂x_r;
    DDP's averaging of parameter gradients then yields exactly ∂L/∂θ, the gradient a single process would get
    on the full batch. (The official `AllGather` returns the unsummed slice, which makes encoder gradients W
    times smaller than head gradients; spec §4.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sum_grads: bool) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size, ctx.sum_grads = rank, x.shape[0], sum_grads
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        if ctx.sum_grads:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size], None


def all_gather_with_grad(x: torch.Tensor, sum_grads: bool = True) -> torch.Tensor:
    """[b, ...] on each of W ranks -> [W·b, ...] in rank order, differentiable; identity on one process.

    Every rank must pass the same shape (training loaders drop the last incomplete batch). `sum_grads=False`
    reproduces the official `AllGather` (local slice only, no all-reduce): encoder gradients then come out W
    times smaller than head gradients after DDP's averaging.
    """
    if _world() == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(_world())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)
    return _GatherWithGrad.apply(x, sum_grads)


def gather_features(features: dict[str, torch.Tensor], sum_grads: bool = True) -> dict[str, torch.Tensor]:
    """Applies `all_gather_with_grad` to every tensor of a feature dict."""
    return {k: all_gather_with_grad(v, sum_grads) for k, v in features.items()}
