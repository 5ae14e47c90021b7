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
from .noise import Perturber, alpha_at, held, held_filter_norms, noise_generator, select_targets, unit_for

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

    @classmethod
    def weights_differ_by_rank(cls, cfg: Config) -> bool:
        """Whether ranks forward at different weights in the same pass: a backend whose ranks gather one shared
        set of weights (FSDP) cannot run that."""
        return False

    @classmethod
    def rank_dependence(cls, cfg: Config) -> str | None:
        """Why the trajectory under ``cfg`` depends on the number of ranks (None: it does not), for launches
        that change it mid-run (elastic)."""
        return None

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
    def weights_differ_by_rank(cls, cfg: Config) -> bool:
        return cfg.ssgd.batch_split == "paired"

    @classmethod
    def rank_dependence(cls, cfg: Config) -> str | None:
        if cfg.ssgd.batch_split == "paired":
            return "ssgd.batch_split = paired pairs the ranks (each pair is one perturbation); use halves or full"
        return None

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
    def rank_dependence(cls, cfg: Config) -> str | None:
        return "sam ascends along each rank's own gradient (m-sharpness), so the ranks are part of the method"

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


class NSO(Method):
    """Noise stability optimization (Zhang, Li, Ju): k Gaussian samples n_j, the gradients at w+n_j and w-n_j
    averaged, optionally mixed with the gradient at w. S-SGD without the fixed magnitude."""

    name = "nso"
    distribution = "gaussian"

    @classmethod
    def plan(cls, cfg: Config) -> list[Pass]:
        nso = cfg.nso
        clean = [Pass("all", nso.clean_weight)] if nso.clean_pass else []
        weight = (1.0 - nso.clean_weight if nso.clean_pass else 1.0) / (2 * nso.num_samples)
        # Every pass sees the whole batch: the running statistics count it once (the first pass).
        noisy = [Pass("all", weight, update_bn=not nso.clean_pass and i == 0) for i in range(2 * nso.num_samples)]
        return clean + noisy

    def before_pass(self, index: int, step: int) -> None:
        index -= int(self.cfg.nso.clean_pass)  # the clean pass runs at w
        if index < 0:
            return
        if index % 2:
            self.perturber.reflect()
            return
        self.perturber.restore()  # sample j starts from w, not from the previous sample's w - n
        n = self.cfg.noise
        self.perturber.perturb(self.cfg.seed, step, self.distribution, n.scale, self.alpha(step), sample=index // 2)


class RWP(Method):
    """Random weight perturbation (Li et al.): (1 - mix) grad L(w) + mix grad L(w + n), n filter-wise Gaussian
    with std ``gamma`` times each output filter's L2 norm (a 1-D tensor: its own norm), on every trainable tensor.

    ``split: passes`` takes the clean gradient on the even positions of the global batch and the perturbed
    one on the odd positions (the compute of SGD, the same on any number of ranks); ``split: ranks`` is the
    original form, even ranks clean and odd ranks perturbed, each on its whole local batch.
    """

    name = "rwp"

    def __init__(self, cfg: Config, model: nn.Module, rank: int = 0, world_size: int = 1, total_steps: int = 1):
        super().__init__(cfg, model, rank, world_size, total_steps)
        # Like the original, RWP perturbs every trainable tensor, whatever noise.targets says; its noise is
        # not one noise.scale rule, so it is added as deltas onto a copy.
        self.perturber = Perturber([p for p in model.parameters() if p.requires_grad])
        self.ranks = cfg.rwp.split == "ranks"

    @classmethod
    def plan(cls, cfg: Config) -> list[Pass]:
        mix = cfg.rwp.mix
        if cfg.rwp.split == "ranks":  # the weight is the rank's (see passes); the mean over ranks mixes them
            return [Pass("all", 1.0)]
        return [Pass("even", 1.0 - mix), Pass("odd", mix, update_bn=False)]

    @classmethod
    def weights_differ_by_rank(cls, cfg: Config) -> bool:
        return cfg.rwp.split == "ranks"

    @classmethod
    def rank_dependence(cls, cfg: Config) -> str | None:
        if cfg.rwp.split == "ranks":
            return "rwp.split = ranks gives the clean and perturbed gradients to different ranks; use rwp.split=passes"
        return None

    @classmethod
    def check_launch(cls, cfg: Config, world_size: int) -> None:
        if cfg.rwp.split == "ranks" and (world_size < 2 or world_size % 2):
            raise ConfigError(
                f"rwp.split = ranks: needs an even number of ranks (clean on even ranks, perturbed on odd), "
                f"got {world_size}; use rwp.split=passes or launch an even number of ranks"
            )
        super().check_launch(cfg, world_size)

    def passes(self) -> list[Pass]:
        if not self.ranks:
            return self.plan(self.cfg)
        # Half the ranks of each kind: 2 (1 - mix) and 2 mix average to the mixing weights.
        return [Pass("all", 2 * (self.cfg.rwp.mix if self.perturbed else 1.0 - self.cfg.rwp.mix))]

    @property
    def perturbed(self) -> bool:
        return self.rank % 2 == 1

    def before_pass(self, index: int, step: int) -> None:
        if (self.perturbed if self.ranks else index == 1) and self.perturber.params:
            self.perturber.save()
            self.perturber.add(filter_noise(self.perturber.params, self.cfg.rwp.gamma, self.cfg.seed, step))


def filter_noise(params: list[torch.Tensor], gamma: float, seed: int, step: int):
    """RWP's noise for the elements this rank holds, one tensor at a time: N(0, 1) from the step's noise
    stream, times gamma * ||filter||_2 (an output row; a 1-D tensor is one filter). The norms are the whole
    tensors' (``held_filter_norms``: a filter that shards split sums its squares over the ranks)."""
    targets = [held(p) for p in params]
    norms = held_filter_norms(targets, [h.local for h in targets], [len(h.shape) > 1 for h in targets])
    gen = noise_generator(seed, step, targets[0].local.device)
    for h, norm in zip(targets, norms):
        yield unit_for(h, "gaussian", gen).mul_(norm.to(h.local.dtype) * gamma)


METHODS: dict[str, type[Method]] = {m.name: m for m in (SGD, SSGD, GNI, SmoothOut, SAM, NSO, RWP)}


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
