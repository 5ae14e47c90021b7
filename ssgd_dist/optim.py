"""S-SGD as a ``torch.optim.Optimizer`` for your own training loop.

    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SymmetricNoiseOptimizer(model, base, alpha=0.3, seed=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)  # schedulers see base's groups

    for x, y in loader:
        opt.zero_grad()
        opt.perturb()                      # weights at w + n
        with ddp.no_sync():                # DDP users: no all-reduce on the first pass
            loss_fn(ddp(x[0::2]), y[0::2]).mul(0.5).backward()
        opt.reflect()                      # weights at w - n
        loss_fn(ddp(x[1::2]), y[1::2]).mul(0.5).backward()   # the one all-reduce
        opt.step()                         # back to w exactly, then the base optimizer's step
        sched.step()

``param_groups`` and ``state`` are the base optimizer's own objects, so LR schedulers, gradient
clipping and checkpointing keep working; ``state_dict`` adds the step counter that seeds the noise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .noise import Perturber, draw_noise, noise_generator, select_targets


class SymmetricNoiseOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer; moves weights to w +- n between your passes and steps from w."""

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        alpha: float = 0.3,
        distribution: str = "rademacher",
        scale: str = "layer_rms",
        targets: str = "weights",
        seed: int = 0,
    ):
        if alpha < 0:
            raise ValueError(f"alpha = {alpha}: must be >= 0")
        self.base_optimizer = base_optimizer
        self.alpha, self.distribution, self.scale, self.seed = alpha, distribution, scale, seed
        self.perturber = Perturber(select_targets(model, targets))
        self.step_count = 0
        # Share, do not copy: schedulers and users change the base optimizer's groups through us.
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.state = base_optimizer.state
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @torch.no_grad()
    def perturb(self) -> None:
        """w -> w + n, with n drawn from (seed, step): the same on every rank, no communication."""
        params = self.perturber.params
        if not params:
            return
        if self.perturber.active:
            raise RuntimeError("perturb() called twice without step() or restore(): the weights are already at w + n")
        gen = noise_generator(self.seed, self.step_count, params[0].device)
        self.perturber.save()
        self.perturber.add(draw_noise(params, self.distribution, self.scale, self.alpha, gen))

    @torch.no_grad()
    def reflect(self) -> None:
        """w + n -> w - n."""
        if self.perturber.params:
            self.perturber.reflect()

    def restore(self) -> None:
        self.perturber.restore()

    @torch.no_grad()
    def step(self, closure=None):
        """Restore w bit-for-bit, then the base step. With a closure: perturb, closure, reflect, closure.

        The closure must zero nothing and call ``backward`` on its loss; each call's gradient gets
        weight 1/2 here, so the step uses 1/2 (g(w+n) + g(w-n)).
        """
        loss = None
        if closure is not None:
            self.perturb()
            try:
                with torch.enable_grad():
                    loss_plus = closure()
                self.reflect()
                with torch.enable_grad():
                    loss_minus = closure()
            finally:
                self.restore()  # never leave the weights at w +- n, even when the closure raises
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(grads, 0.5)
            loss = (loss_plus + loss_minus) / 2
        self.restore()
        self.base_optimizer.step()
        self.step_count += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base_optimizer.state_dict(), "step": self.step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.step_count = int(state_dict["step"])
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
