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
        """Refuse (``ConfigError``) a number of ranks this method cannot run on."""
        b = cfg.data.batch_size
        if b % world_size:
            raise ConfigError(
                f"data.batch_size = {b}: not divisible by the {world_size} ranks; use a multiple of {world_size}"
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
        b, split = cfg.data.batch_size, cfg.ssgd.batch_split
        if split == "halves" and b % (2 * world_size):
            raise ConfigError(
                f"data.batch_size = {b}: 'halves' needs every rank's batch to split in two, so a multiple of "
                f"2 x {world_size} ranks = {2 * world_size}"
            )
        if split == "paired" and (world_size < 2 or world_size % 2):
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


def select_part(x: torch.Tensor, part: Part) -> torch.Tensor:
    """Even/odd positions of the local batch; equal to the global batch's because local batches are even."""
    if part == "even":
        return x[0::2]
    if part == "odd":
        return x[1::2]
    return x
