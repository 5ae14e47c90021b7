"""The passes of one optimizer step for each method.

A method says which passes a step makes: for each pass, which slice of the local batch it sees, the
weight of its loss, whether BatchNorm may update its running statistics, and where the weights sit
while it runs. It knows nothing of distribution: a backend runs the passes, syncs gradients only on
the last one, and steps. Loss weights are chosen so the accumulated gradient is exactly the method's
gradient (for S-SGD: 1/2 (grad L(w+n) + grad L(w-n))).

Backends never branch on a method's name: they ask its class (``plan``, ``check_launch`` and
capabilities such as ``needs_local_gradient``), which works before any model exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import Config
from .errors import ConfigError
from .noise import Perturber, alpha_at, select_targets

Part = Literal["all", "even", "odd"]


@dataclass(frozen=True)
class Pass:
    part: Part
    loss_weight: float
    update_bn: bool = True


class Method:
    """One pass at w, plain SGD. Subclasses move the weights before passes and restore after."""

    name = "sgd"
    # Whether a pass reads this rank's gradient before it is synchronised (SAM's ascent direction):
    # a backend that moves gradients into its own buffers cannot run such a method.
    needs_local_gradient = False

    def __init__(self, cfg: Config, model: nn.Module, rank: int = 0, world_size: int = 1, total_steps: int = 1):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.total_steps = max(1, total_steps)
        self.perturber = Perturber(select_targets(model, cfg.noise.targets), restore=cfg.noise.restore)

    @classmethod
    def plan(cls, cfg: Config) -> list[Pass]:
        """The passes of every step under ``cfg``."""
        return [Pass("all", 1.0)]

    @classmethod
    def check_launch(cls, cfg: Config, world_size: int) -> None:
        """Refuse (``ConfigError``) a launch whose global batch does not split into this method's forwards:
        micro-steps, then ranks, then (``halves``) the two halves, then (``bn_mode: ghost``) ghost batches."""
        b, k = cfg.data.batch_size, cfg.train.accumulation_steps
        halves = any(p.part != "all" for p in cls.plan(cfg))
        factors = (["2"] if halves else []) + [f"{world_size} ranks"] + ([f"{k} micro-steps"] if k > 1 else [])
        divisor = (2 if halves else 1) * world_size * k
        if b % divisor:
            why = "'halves' needs every rank's batch to split in two, so " if halves else ""
            raise ConfigError(
                f"data.batch_size = {b}: {why}a multiple of {' x '.join(factors)} = {divisor}; "
                f"nearest: {_nearby(b, divisor)}"
            )
        ghost = cfg.model.bn_ghost_batch
        if cfg.model.bn_mode == "ghost" and cfg.model.has_batchnorm and (b // divisor) % ghost:
            raise ConfigError(
                f"model.bn_ghost_batch = {ghost}: each forward sees data.batch_size {b} / ({' x '.join(factors)}) = "
                f"{b // divisor} samples, not a whole number of ghost batches; use a ghost batch that divides "
                f"{b // divisor}, or data.batch_size {_nearby(b, divisor * ghost)}"
            )

    def passes(self) -> list[Pass]:
        return self.plan(self.cfg)

    def before_pass(self, index: int, step: int) -> None:
        """Place the weights for pass ``index`` of optimizer step ``step``."""

    def restore(self) -> None:
        self.perturber.restore()

    def alpha(self, step: int) -> float:
        n = self.cfg.noise
        return alpha_at(n.alpha, n.schedule, n.schedule_fraction, step, self.total_steps)

    def _add_noise(self, step: int, distribution: str, sign: float = 1.0) -> None:
        self.perturber.perturb(self.cfg.seed, step, distribution, self.cfg.noise.scale, self.alpha(step), sign)


class SGD(Method):
    name = "sgd"


class SSGD(Method):
    """Symmetrical SGD: the gradient at w+n and at w-n, averaged, applied at w."""

    name = "ssgd"

    def __init__(self, cfg: Config, model: nn.Module, rank: int = 0, world_size: int = 1, total_steps: int = 1):
        super().__init__(cfg, model, rank, world_size, total_steps)
        self.split = cfg.ssgd.batch_split

    @classmethod
    def plan(cls, cfg: Config) -> list[Pass]:
        split = cfg.ssgd.batch_split
        if split == "halves":
            return [Pass("even", 0.5), Pass("odd", 0.5)]
        if split == "full":
            # The same samples twice: the running statistics count them once (the w+n pass).
            return [Pass("all", 0.5), Pass("all", 0.5, update_bn=False)]
        return [Pass("all", 1.0)]

    @classmethod
    def check_launch(cls, cfg: Config, world_size: int) -> None:
        if cfg.ssgd.batch_split == "paired" and (world_size < 2 or world_size % 2):
            raise ConfigError(
                f"ssgd.batch_split = paired: needs an even number of ranks (w+n on even ranks, w-n on odd), "
                f"got {world_size}; use 'halves' or launch an even number of ranks"
            )
        super().check_launch(cfg, world_size)

    def before_pass(self, index: int, step: int) -> None:
        distribution = self.cfg.noise.distribution
        if self.split == "paired":
            self._add_noise(step, distribution, sign=1.0 if self.rank % 2 == 0 else -1.0)
        elif index == 0:
            self._add_noise(step, distribution)
        else:
            self.perturber.reflect()


class GNI(Method):
    """One-point Gaussian weight noise: the gradient at w+n, the step from w."""

    name = "gni"
    distribution = "gaussian"

    def before_pass(self, index: int, step: int) -> None:
        self._add_noise(step, self.distribution)


class SmoothOut(GNI):
    """SmoothOut (Wen et al. 2018): one point, uniform noise."""

    name = "smoothout"
    distribution = "uniform"


class SAM(Method):
    """SAM (Foret et al. 2020): gradient at w + rho g/||g||, with g this rank's unsynced gradient at w."""

    name = "sam"
    needs_local_gradient = True

    def __init__(self, cfg: Config, model: nn.Module, rank: int = 0, world_size: int = 1, total_steps: int = 1):
        super().__init__(cfg, model, rank, world_size, total_steps)
        # SAM perturbs every trainable tensor, whatever noise.targets says.
        self.perturber = Perturber([p for p in model.parameters() if p.requires_grad])

    @classmethod
    def plan(cls, cfg: Config) -> list[Pass]:
        return [Pass("all", 1.0), Pass("all", 1.0, update_bn=False)]

    def before_pass(self, index: int, step: int) -> None:
        if index == 0:
            return
        params = self.perturber.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = self.cfg.sam.rho / (norm + 1e-12)
        self.perturber.save()
        self.perturber.add(g * scale for g in grads)
        for p in params:
            p.grad = None  # the first pass only chose the direction; the step uses the second gradient


METHODS: dict[str, type[Method]] = {m.name: m for m in (SGD, SSGD, GNI, SmoothOut, SAM)}


def method_class(cfg: Config) -> type[Method]:
    return METHODS[cfg.method]


def build_method(cfg: Config, model: nn.Module, rank: int = 0, world_size: int = 1, total_steps: int = 1) -> Method:
    return method_class(cfg)(cfg, model, rank, world_size, total_steps)


def _nearby(batch: int, divisor: int) -> str:
    """The multiples of ``divisor`` around ``batch``, for an error message."""
    below = batch // divisor * divisor
    return " or ".join(str(v) for v in (below, below + divisor) if v > 0)


def select_part(x: torch.Tensor, part: Part) -> torch.Tensor:
    """Even/odd positions of the local batch; equal to the global batch's because local batches are even."""
    if part == "even":
        return x[0::2]
    if part == "odd":
        return x[1::2]
    return x
