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

from .seeding import Stream, generator


def noise_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    """The noise of optimizer ``step``: the same on every rank, drawn on the weights' device."""
    return generator(Stream.NOISE, seed, step, device)


def select_targets(model: nn.Module, targets: str) -> list[nn.Parameter]:
    """``weights``: conv/linear kernels (ndim >= 2), the usual weight-noise target; ``all``: everything."""
    params = [p for p in model.parameters() if p.requires_grad]
    if targets == "all":
        return params
    if targets == "weights":
        return [p for p in params if p.ndim >= 2]
    raise ValueError(f"noise.targets = {targets!r}: expected 'weights' or 'all'")


RESTORE_MODES = ("copy", "regenerate")
_SQRT3 = math.sqrt(3.0)


def _norms(ts: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """L2 norms accumulated in at least fp32 (bf16/fp16 sums lose digits), float64 kept as is."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    return torch._foreach_norm(ts, 2, dtype=dtype)


def sample_unit_(ts: list[torch.Tensor], distribution: str, gen: torch.Generator) -> None:
    """Fill each tensor in place with xi (E[xi^2] = 1 per element; sphere: ||xi||^2 = numel), in order.

    Drawing straight into the destination needs no temporary; the element-wise maps are batched
    (``_foreach``) so a model's many small tensors cost a few kernels, not a few per tensor. A list
    of one tensor gives exactly the values that tensor gets inside a longer list.
    """
    if distribution == "rademacher":
        for t in ts:
            t.random_(0, 2, generator=gen)
        torch._foreach_mul_(ts, 2.0)
        torch._foreach_sub_(ts, 1.0)
    elif distribution in ("gaussian", "sphere"):
        for t in ts:
            t.normal_(generator=gen)
        if distribution == "sphere":
            norms = _norms(ts)
            for t, norm in zip(ts, norms):
                t.mul_(math.sqrt(max(1, t.numel())) / norm.clamp_min(1e-12))
    elif distribution == "uniform":
        for t in ts:
            t.uniform_(-_SQRT3, _SQRT3, generator=gen)
    else:
        raise ValueError(f"noise.distribution = {distribution!r}: expected rademacher, sphere, gaussian or uniform")


def batched_signs(ws: list[torch.Tensor], distribution: str) -> bool:
    """Rademacher noise on an accelerator: draw all signs at once (``rademacher_signs``) and apply each
    tensor's in one fused kernel, because there the cost is kernel launches (about 9 us each on an
    H100 host), not arithmetic. On the CPU the per-tensor in-place path is the faster one."""
    return distribution == "rademacher" and bool(ws) and ws[0].device.type != "cpu"


def rademacher_signs(ws: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """xi = +-1 for every tensor of ``ws`` from one draw, as int8 views shaped like them: one random
    kernel for the whole model and a transient one byte per element (no float copy)."""
    sizes = [w.numel() for w in ws]
    flat = torch.empty(sum(sizes), dtype=torch.int8, device=ws[0].device).random_(0, 2, generator=gen)
    flat.mul_(2).sub_(1)
    return [v.view(w.shape) for v, w in zip(flat.split(sizes), ws)]


def add_scaled_(
    p: torch.Tensor, xi: torch.Tensor, sigma, w: torch.Tensor | None, alpha: float, coefficient: float
) -> None:
    """p <- p + coefficient * sigma * xi in one fused kernel; ``w`` (unperturbed) only for ``elementwise``."""
    if sigma is None:
        p.addcmul_(xi, w.abs(), value=coefficient * alpha)
    elif isinstance(sigma, float):
        p.add_(xi, alpha=coefficient * sigma)
    else:
        p.addcmul_(xi, sigma, value=coefficient)


def unit_noise(
    shape: torch.Size, distribution: str, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """xi with E[xi^2] = 1 per element (sphere: exactly ||xi||^2 = numel)."""
    xi = torch.empty(shape, dtype=dtype, device=device)
    sample_unit_([xi], distribution, gen)
    return xi


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


def noise_sigmas(ws: list[torch.Tensor], rule: str, alpha: float) -> list[torch.Tensor | float | None]:
    """sigma_i = alpha * scale_i from the unperturbed weights, kept on their device (no host sync).

    ``layer_rms`` is one batched reduction. ``elementwise`` gives None: its sigma is a full-size
    tensor, so it is formed where it is applied, one tensor at a time.
    """
    if rule == "layer_rms":
        if not ws:
            return []
        norms = list(_norms(ws))
        torch._foreach_mul_(norms, [alpha / math.sqrt(max(1, w.numel())) for w in ws])
        return norms
    if rule == "filter_norm":
        return [noise_scale(w, rule) * alpha for w in ws]
    if rule == "elementwise":
        return [None] * len(ws)
    if rule == "absolute":
        return [float(alpha)] * len(ws)
    raise ValueError(f"noise.scale = {rule!r}: expected layer_rms, filter_norm, elementwise or absolute")


def scale_noise_(ts: list[torch.Tensor], ws: list[torch.Tensor], sigmas: list, alpha: float) -> None:
    """xi -> sigma * xi in place; ``ws`` (the unperturbed weights) are read only by ``elementwise``."""
    if sigmas and all(isinstance(s, float) for s in sigmas):
        torch._foreach_mul_(ts, sigmas)
        return
    for t, w, s in zip(ts, ws, sigmas, strict=True):
        if s is None:
            t.mul_(w.abs()).mul_(alpha)
        else:
            t.mul_(s)


def draw_noise(
    params: Iterable[torch.Tensor], distribution: str, scale: str, alpha: float, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield n_i = alpha * scale_i * xi_i one tensor at a time, so at most one noise tensor is alive.

    The values are exactly those ``Perturber.perturb`` adds for the same generator.
    """
    ws = [w.detach() for w in params]
    if not ws:
        return
    sigmas = noise_sigmas(ws, scale, alpha)
    signs = rademacher_signs(ws, gen) if batched_signs(ws, distribution) else None
    for i, (w, s) in enumerate(zip(ws, sigmas)):
        if signs is not None:
            n = torch.zeros_like(w)
            add_scaled_(n, signs[i], s, w, alpha, 1.0)
        else:
            n = torch.empty_like(w)
            sample_unit_([n], distribution, gen)
            scale_noise_([n], [w], [s], alpha)
        yield n


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
    """Moves target parameters to w + delta and back to w.

    ``restore="copy"`` (the default) holds one backup copy and restores bit-for-bit: the backup
    buffers are allocated once and reused, the noise is drawn straight into the parameters (on an
    accelerator, Rademacher signs go through a transient one-byte-per-element buffer instead, see
    ``batched_signs``), and the mirror point w - delta is computed from the backup. ``"regenerate"`` keeps
    no copy: it remembers only how the noise was drawn (seed, step and the per-tensor sigmas) and
    draws it again to move to the mirror point and back, one tensor at a time; w is then restored
    to within rounding (docs/performance.md measures the drift), not bit-for-bit.
    """

    def __init__(self, params: list[torch.Tensor], restore: str = "copy"):
        if restore not in RESTORE_MODES:
            raise ValueError(f"noise.restore = {restore!r}: expected 'copy' or 'regenerate'")
        self.params = params
        self.restore_mode = restore
        self._backup: list[torch.Tensor] | None = None
        self._drawn: tuple | None = None  # regenerate: (seed, step, distribution, sigmas, alpha)
        self._sign = 1.0
        self.active = False

    def save(self) -> None:
        if self.restore_mode != "copy":
            raise RuntimeError("Perturber(restore='regenerate') keeps no copy of the weights; use perturb()")
        with torch.no_grad():  # in place on the parameters themselves: no per-call detach()
            if self._backup is None:
                self._backup = [p.clone() for p in self.params]
            else:
                torch._foreach_copy_(self._backup, self.params)
        self.active = True

    def add(self, deltas: Iterable[torch.Tensor], sign: float = 1.0) -> None:
        """w <- w + sign * delta after ``save``; ``deltas`` may be a generator so each delta is freed after use."""
        if self.restore_mode != "copy":
            raise RuntimeError("Perturber(restore='regenerate') can only undo noise it drew itself; use perturb()")
        with torch.no_grad():
            for p, delta in zip(self.params, deltas, strict=True):
                p.add_(delta, alpha=sign)

    def perturb(self, seed: int, step: int, distribution: str, scale: str, alpha: float, sign: float = 1.0) -> None:
        """w <- w + sign * n, n drawn on the weights' device from the generator of (seed, step)."""
        params = self.params
        if not params:
            return
        gen = noise_generator(seed, step, params[0].device)
        with torch.no_grad():
            if self.restore_mode == "copy":
                self.save()
                assert self._backup is not None
                sigmas = noise_sigmas(self._backup, scale, alpha)
                if batched_signs(params, distribution):  # w + sigma * xi, one kernel per tensor
                    for p, xi, s, w in zip(params, rademacher_signs(params, gen), sigmas, self._backup):
                        add_scaled_(p, xi, s, w, alpha, sign)
                    return
                sample_unit_(params, distribution, gen)  # drawn straight into the parameters
                scale_noise_(params, self._backup, sigmas, alpha)
                if sign < 0:
                    torch._foreach_neg_(params)
                torch._foreach_add_(params, self._backup)
                return
            if scale == "elementwise":
                raise ValueError(
                    "noise.restore = regenerate with noise.scale = elementwise: noise scaled by |w| cannot be "
                    "undone without a copy of w; use noise.scale=layer_rms/filter_norm/absolute or noise.restore=copy"
                )
            self._drawn = (seed, step, distribution, noise_sigmas(params, scale, alpha), alpha)
            self._sign = sign
            self._add_drawn(sign)
            self.active = True

    def _add_drawn(self, coefficient: float) -> None:
        """Regenerate mode: w <- w + coefficient * n, drawing n again one tensor at a time."""
        assert self._drawn is not None
        seed, step, distribution, sigmas, alpha = self._drawn
        params = self.params
        gen = noise_generator(seed, step, params[0].device)
        with torch.no_grad():
            if batched_signs(params, distribution):  # one byte per element, no float temporary
                for p, xi, s in zip(params, rademacher_signs(params, gen), sigmas):
                    add_scaled_(p, xi, s, None, alpha, coefficient)
                return
            for p, s in zip(params, sigmas):
                n = torch.empty_like(p)
                sample_unit_([n], distribution, gen)
                scale_noise_([n], [p], [s], alpha)
                p.add_(n, alpha=coefficient)
                del n  # before the next one is allocated: one noise tensor alive at a time

    def reflect(self) -> None:
        """w + delta -> w - delta: mirrored through the saved w (2 w - (w + delta)), or by subtracting 2 delta."""
        assert self.active
        if self.restore_mode == "regenerate":
            self._add_drawn(-2.0 * self._sign)
            self._sign = -self._sign
            return
        assert self._backup is not None
        with torch.no_grad():
            torch._foreach_mul_(self.params, -1.0)
            torch._foreach_add_(self.params, self._backup, alpha=2.0)

    def restore(self) -> None:
        """Copy mode: bit-for-bit the weights seen by ``save`` (a copy, never a subtraction)."""
        if not self.active:
            return
        if self.restore_mode == "regenerate":
            self._add_drawn(-self._sign)
            self._drawn = None
            self.active = False
            return
        assert self._backup is not None
        with torch.no_grad():
            torch._foreach_copy_(self.params, self._backup)
        self.active = False
