"""BertAdam, the warm-up/cosine schedule and parameter groups of NeighborRetr (spec §5).

The official optimiser keeps the schedule inside ``BertAdam.step`` with a per-parameter step counter. Here the
update and the schedule are split: :class:`BertAdam` applies the update at the group's current ``lr`` and
:func:`build_scheduler` scales that ``lr`` with a ``LambdaLR`` stepped once after every optimiser step. The
resulting learning rates are the same, including the official quirk that the first update runs at lr 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("bertadam", "adamw")


class BertAdam(Optimizer):
    """Adam without bias correction, with decoupled weight decay and per-tensor gradient clipping.

    For every parameter ``p`` with a gradient ``g`` (spec §5):

    * if ``max_grad_norm > 0``, ``g`` is scaled to norm at most ``max_grad_norm`` (per tensor, the rule of
      ``clip_grad_norm_`` applied to this tensor alone); ``p.grad`` itself is left untouched;
    * ``m <- b1 * m + (1 - b1) * g`` and ``v <- b2 * v + (1 - b2) * g**2``;
    * ``u = m / (sqrt(v) + eps) + weight_decay * p`` and ``p <- p - lr * u``.

    There is no bias correction and no internal schedule: ``lr`` is used as it is in the param group, so a
    schedule must be applied from outside (see :func:`build_scheduler`). The moments ``exp_avg`` (m) and
    ``exp_avg_sq`` (v) have the parameter's dtype and device, so fp16 parameters get fp16 moments as in the
    official code.

    Args:
        params: parameters or param-group dicts.
        lr: default learning rate for groups that do not set one.
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added to ``sqrt(v)`` in the denominator.
        weight_decay: decoupled weight-decay coefficient (multiplied by lr, like the official code).
        max_grad_norm: per-tensor clipping norm; 0 disables clipping.
        foreach: update every parameter of a group with `torch._foreach_*` kernels (a few launches per group
            instead of about ten per tensor); the same element-wise operations in the same order, so the same
            result as the per-tensor loop (tests/unit/test_fast_paths.py). False runs the per-tensor loop.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        b1: float = 0.9,
        b2: float = 0.98,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        foreach: bool = True,
    ) -> None:
        _check_range("lr", lr, low=0.0)
        _check_range("b1", b1, low=0.0, high=1.0)
        _check_range("b2", b2, low=0.0, high=1.0)
        _check_range("eps", eps, low=0.0)
        _check_range("weight_decay", weight_decay, low=0.0)
        _check_range("max_grad_norm", max_grad_norm, low=0.0)
        defaults = dict(lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one update to every parameter that has a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("BertAdam does not support sparse gradients; use a dense embedding")
            if self.foreach and params:
                self._foreach_update(params, group)
                continue
            for p in params:
                self._update(p, group)
        return loss

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _foreach_update(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """`_update` on a list of parameters at once, operation for operation."""
        grads = [p.grad for p in params]
        if group["max_grad_norm"] > 0.0:
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, 1e-6)
            coefs = torch._foreach_reciprocal(norms)
            torch._foreach_mul_(coefs, group["max_grad_norm"])  # max_norm / (norm + 1e-6), as `_clipped`
            torch._foreach_clamp_max_(coefs, 1.0)
            grads = torch._foreach_mul(grads, coefs)
        states = [self._state(p) for p in params]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(m, group["b1"])
        torch._foreach_add_(m, grads, alpha=1.0 - group["b1"])
        torch._foreach_mul_(v, group["b2"])
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - group["b2"])
        denominator = torch._foreach_sqrt(v)
        torch._foreach_add_(denominator, group["eps"])
        update = torch._foreach_div(m, denominator)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(update, torch._foreach_mul(params, group["weight_decay"]))
        torch._foreach_mul_(update, group["lr"])
        torch._foreach_sub_(params, update)
        for state in states:
            state["step"] += 1

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = _clipped(p.grad, group["max_grad_norm"])
        state = self._state(p)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(group["b1"]).add_(grad, alpha=1.0 - group["b1"])
        v.mul_(group["b2"]).addcmul_(grad, grad, value=1.0 - group["b2"])
        update = m / (v.sqrt() + group["eps"])
        # The official code rounds wd * p and lr * u to the parameter dtype before adding them; keeping that
        # order matters for fp16 parameters, where lr * u is often subnormal (spec §5, precision).
        if group["weight_decay"] > 0.0:
            update.add_(p * group["weight_decay"])
        p.sub_(update.mul_(group["lr"]))
        state["step"] += 1


def _clipped(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``grad`` scaled to norm at most ``max_norm`` (a new tensor), or ``grad`` itself if ``max_norm`` is 0.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` on one tensor: coefficient ``max_norm / (norm + 1e-6)``
    clamped to 1. The scaling is always applied, with no ``if``, so no host-device sync is needed.
    """
    if max_norm <= 0.0:
        return grad
    coef = (max_norm / (torch.linalg.vector_norm(grad) + 1e-6)).clamp(max=1.0)
    return grad * coef


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    """Raise ValueError unless ``low <= value`` (and ``value < high`` when ``high`` is given)."""
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def warmup_cosine(step: int, total_steps: int, warmup: float) -> float:
    """Learning-rate multiplier f(x) of the official ``warmup_cosine``, with ``x = step / total_steps``.

    ``f(x) = x / warmup`` for ``x < warmup`` and ``0.5 * (1 + cos(pi * x))`` afterwards. As in the official
    code the cosine is not rescaled to start at the end of warm-up, so f drops from about 1 to
    ``0.5 * (1 + cos(pi * warmup))`` (0.976 for warmup 0.1) at the boundary. Steps past ``total_steps`` keep
    following the cosine (it rises again), also as in the official code, so size ``total_steps`` correctly.

    Args:
        step: number of optimiser steps already taken (0 for the first update).
        total_steps: total number of optimiser steps of the run.
        warmup: warm-up length as a fraction of ``total_steps``, in [0, 1).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is a fraction of total_steps and must be in [0, 1), got {warmup}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    x = step / total_steps
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


def build_scheduler(optimizer: Optimizer, total_steps: int, warmup: float) -> LambdaLR:
    """A ``LambdaLR`` that multiplies every group's base lr by :func:`warmup_cosine`.

    Call ``scheduler.step()`` once after every ``optimizer.step()``. ``LambdaLR`` sets ``lr = base_lr * f(0)``
    when it is built, so with ``warmup > 0`` the first update runs at lr 0, exactly like the official
    per-parameter counter that starts at 0; update ``k`` (0-based) then runs at ``base_lr * f(k / total_steps)``.
    """
    warmup_cosine(0, total_steps, warmup)  # validate the arguments now rather than inside LambdaLR
    return LambdaLR(optimizer, lr_lambda=partial(warmup_cosine, total_steps=total_steps, warmup=warmup))


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_scale: float,
    backbone_prefix: str = "clip.",
    no_decay: Sequence[str] = ("bias",),
) -> list[dict[str, Any]]:
    """Split the trainable parameters into backbone/rest x decay/no-decay groups (spec §5).

    A parameter is in the backbone if its name starts with ``backbone_prefix`` or contains
    ``"." + backbone_prefix`` (so ``module.clip.`` in a wrapped model also counts). It gets no weight decay if
    any string of ``no_decay`` occurs in its name; the default ``("bias",)`` is the rule that the official code
    effectively applies (its LayerNorm entries match no name), so LayerNorm weights, embeddings and
    ``logit_scale`` are decayed, for parity. Frozen parameters are skipped and empty groups dropped.

    Returns:
        Group dicts with keys ``name`` (for logging), ``params``, ``lr`` (``lr * backbone_lr_scale`` for the
        backbone) and ``weight_decay``, in the order backbone_decay, backbone_no_decay, rest_decay,
        rest_no_decay.
    """
    _check_range("lr", lr, low=0.0)
    _check_range("weight_decay", weight_decay, low=0.0)
    _check_range("backbone_lr_scale", backbone_lr_scale, low=0.0)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(b, d): [] for b in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = name.startswith(backbone_prefix) or f".{backbone_prefix}" in name
        decays = not any(s in name for s in no_decay)
        buckets[(is_backbone, decays)].append(p)
    groups = []
    for (is_backbone, decays), params in buckets.items():
        if params:
            groups.append(
                {
                    "name": f"{'backbone' if is_backbone else 'rest'}_{'decay' if decays else 'no_decay'}",
                    "params": params,
                    "lr": lr * backbone_lr_scale if is_backbone else lr,
                    "weight_decay": weight_decay if decays else 0.0,
                }
            )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    max_grad_norm: float = 1.0,
    foreach: bool = True,
    fused: bool | None = None,
) -> Optimizer:
    """BertAdam (the official optimiser) or ``torch.optim.AdamW`` over ``groups``.

    The groups' own ``lr`` and ``weight_decay`` take precedence; ``lr`` and a weight decay of 0 are only the
    defaults for groups that lack them. ``max_grad_norm`` is BertAdam's per-tensor clipping and is ignored by
    AdamW (global clipping belongs to the training loop in both cases).

    Args:
        name: ``"bertadam"`` or ``"adamw"`` (case-insensitive).
        foreach: BertAdam's multi-tensor update (same result as its per-tensor loop); AdamW ignores it.
        fused: AdamW's single-kernel update (``torch.optim.AdamW(fused=True)``, the same Adam maths to float
            rounding); None or False keeps PyTorch's default implementation. BertAdam refuses True.
    """
    key = name.lower()
    if key == "bertadam":
        if fused:
            raise ValueError("fused=True is an AdamW option; BertAdam's fast path is foreach=True")
        return BertAdam(groups, lr=lr, b1=betas[0], b2=betas[1], eps=eps, max_grad_norm=max_grad_norm, foreach=foreach)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, fused=fused or None)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def create_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-4,
    weight_decay: float = 0.2,
    backbone_lr_scale: float = 1.0,
    betas: Sequence[float] = (0.9, 0.98),
    eps: float = 1e-6,
    no_decay: Sequence[str] = ("bias",),
    max_grad_norm: float = 1.0,
    foreach: bool = True,
    fused: bool | None = None,
) -> Optimizer:
    """`param_groups` + `build_optimizer` in one call (configs/optim/*.yaml is this function's `_partial_` target;
    the recipe passes the model). `max_grad_norm` is BertAdam's per-tensor clipping; AdamW ignores it.
    `foreach` (BertAdam) and `fused` (AdamW) pick the fast update kernels, see `build_optimizer`."""
    groups = param_groups(model, lr, weight_decay, backbone_lr_scale, no_decay=tuple(no_decay))
    return build_optimizer(name, groups, lr, (betas[0], betas[1]), eps, max_grad_norm, foreach, fused)
