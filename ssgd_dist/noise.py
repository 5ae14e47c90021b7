"""Seeded, rank-consistent weight noise and exact perturb/restore.

Every replica must perturb by the *same* n without talking to the others, so the noise comes from a
private ``torch.Generator`` whose seed is a pure function of ``(seed, step)``; it never touches the
global RNG, which data loading and dropout consume differently on each rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): neighbouring steps and seeds give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def noise_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(step_seed(seed, step))
    return gen


def select_targets(model: nn.Module, targets: str) -> list[nn.Parameter]:
    """``weights``: conv/linear kernels (ndim >= 2), the usual weight-noise target; ``all``: everything."""
    params = [p for p in model.parameters() if p.requires_grad]
    if targets == "all":
        return params
    if targets == "weights":
        return [p for p in params if p.ndim >= 2]
    raise ValueError(f"noise.targets = {targets!r}: expected 'weights' or 'all'")


def unit_noise(
    shape: torch.Size, distribution: str, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """xi with E[xi^2] = 1 per element (sphere: exactly ||xi||^2 = numel)."""
    if distribution == "rademacher":
        xi = torch.randint(0, 2, shape, generator=gen, device=device, dtype=torch.int8).to(dtype)
        return xi.mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)
    if distribution == "sphere":
        xi = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        xi.mul_(math.sqrt(xi.numel()) / xi.norm().clamp_min(1e-12))
        return xi.to(dtype)
    if distribution == "uniform":
        xi = torch.rand(shape, generator=gen, device=device, dtype=dtype)
        return xi.mul_(2 * math.sqrt(3.0)).sub_(math.sqrt(3.0))
    raise ValueError(f"noise.distribution = {distribution!r}: expected rademacher, sphere, gaussian or uniform")


def noise_scale(w: torch.Tensor, rule: str) -> torch.Tensor | float:
    """scale_i of SPEC section 1, computed from the unperturbed weights."""
    if rule == "layer_rms":
        return w.detach().float().pow(2).mean().sqrt().to(w.dtype)
    if rule == "filter_norm":
        if w.ndim < 2:
            return w.detach().float().pow(2).mean().sqrt().to(w.dtype)
        rms = w.detach().float().flatten(1).pow(2).mean(1).sqrt().to(w.dtype)
        return rms.view(-1, *([1] * (w.ndim - 1)))
    if rule == "elementwise":
        return w.detach().abs()
    if rule == "absolute":
        return 1.0
    raise ValueError(f"noise.scale = {rule!r}: expected layer_rms, filter_norm, elementwise or absolute")


def draw_noise(
    params: Iterable[torch.Tensor], distribution: str, scale: str, alpha: float, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield n_i = alpha * scale_i * xi_i one tensor at a time, so at most one noise tensor is alive."""
    for w in params:
        xi = unit_noise(w.shape, distribution, gen, w.dtype, w.device)
        yield xi.mul_(noise_scale(w, scale)).mul_(alpha)


def alpha_at(alpha: float, schedule: str, fraction: float, step: int, total_steps: int) -> float:
    """Noise magnitude at a step: constant, linear warm-up over ``fraction`` of the run, or cosine decay."""
    if schedule == "constant":
        return alpha
    if schedule == "warmup":
        warm = max(1, round(fraction * total_steps))
        return alpha * min(1.0, (step + 1) / warm)
    if schedule == "cosine":
        return alpha * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    raise ValueError(f"noise.schedule = {schedule!r}: expected constant, warmup or cosine")


class Perturber:
    """Moves target parameters to w + delta and back to exactly w, holding one backup copy.

    The backup buffers are allocated once and reused, so the extra memory is one copy of the
    perturbed tensors and nothing else: noise is generated and added one tensor at a time, and the
    mirror point w - delta is computed from the backup instead of from a stored noise tensor.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self._backup: list[torch.Tensor] | None = None
        self.active = False

    def save(self) -> None:
        params = [p.detach() for p in self.params]
        if self._backup is None:
            self._backup = [p.clone() for p in params]
        else:
            torch._foreach_copy_(self._backup, params)
        self.active = True

    def add(self, deltas: Iterable[torch.Tensor], sign: float = 1.0) -> None:
        """w <- w + sign * delta; ``deltas`` may be a generator so each delta is freed after use."""
        with torch.no_grad():
            for p, delta in zip(self.params, deltas, strict=True):
                p.add_(delta, alpha=sign)

    def reflect(self) -> None:
        """w + delta -> w - delta, mirrored through the saved w: 2 w - (w + delta)."""
        assert self._backup is not None and self.active
        with torch.no_grad():
            params = [p.detach() for p in self.params]
            torch._foreach_mul_(params, -1.0)
            torch._foreach_add_(params, self._backup, alpha=2.0)

    def restore(self) -> None:
        """Bit-for-bit the weights seen by ``save``: a copy, never a subtraction."""
        if not self.active:
            return
        assert self._backup is not None
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.params], self._backup)
        self.active = False

