"""Base optimizers (SGD, AdamW, LARS) and the learning-rate rule, a pure function of the step.

The LR is computed from the step rather than kept in a scheduler object, so a resumed run (on any
world size) lands on exactly the LR of the uninterrupted one.
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017): a per-layer trust ratio on SGD with momentum, for large batches.

    Tensors with one dimension (biases, BatchNorm) get neither the trust ratio nor weight decay,
    as in the reference large-batch recipes.
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    d = d.add(p, alpha=group["weight_decay"])
                    denom = g_norm + group["weight_decay"] * w_norm
                    trust = torch.where(
                        (w_norm > 0) & (denom > 0), group["trust_coefficient"] * w_norm / denom, torch.ones_like(w_norm)
                    )
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return LARS(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, trust_coefficient=cfg.trust_coefficient
    )


def peak_lr(cfg: OptimConfig, batch_size: int) -> float:
    """Linear scaling (Goyal et al. 2017) when a reference batch size is given."""
    if cfg.reference_batch_size:
        return cfg.lr * batch_size / cfg.reference_batch_size
    return cfg.lr


def lr_at(cfg: OptimConfig, batch_size: int, step: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_fraction`` of the run, then constant, step or cosine."""
    peak = peak_lr(cfg, batch_size)
    warm = round(cfg.warmup_fraction * total_steps)
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total_steps - warm)
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    passed = sum(step >= round(m * total_steps) for m in cfg.milestones)
    return peak * cfg.gamma**passed
