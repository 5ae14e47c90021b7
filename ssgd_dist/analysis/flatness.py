"""How flat is a solution: perturbation sharpness, Hessian spectrum, loss landscapes.

All measures are taken at the weights of a checkpoint, with the model in eval mode (BatchNorm uses
its running statistics), on a fixed subset of the training set:

- **Random-perturbation sharpness.** For each relative radius r, the expected loss increase
  E[L(w + n)] - L(w) with n a random fixed-magnitude perturbation of every weight tensor, ||n_i|| =
  r ||w_i|| (a ``sphere`` direction by default; ``rademacher`` is S-SGD's own noise). Each draw
  evaluates the symmetric pair w +- n and averages, which cancels the first-order term and leaves the
  expectation unchanged (n and -n are equally likely).
- **Hessian.** The top eigenvalue (largest in magnitude) by power iteration on Hessian-vector products
  (double back-propagation), and the trace by Hutchinson's estimator E[v^T H v] over Rademacher v.
  Both over all trainable parameters.
- **Loss landscapes** (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"): L(w + a d1)
  and L(w + a d1 + b d2) along random Gaussian directions normalised filter by filter, so that each
  output filter (row) of d has the norm of the same filter of w; 1-D tensors (biases, BatchNorm) get a
  zero direction, as in the paper's ``ignore biasbn`` setting.

Distributed: every rank takes a strided shard of the samples, computes sums, and the sums are
all-reduced, so R ranks give the numbers of one process (to float tolerance). Random directions come
from generators seeded by (seed, index), identical on every rank without communication.

Run directories (reading checkpoints, writing ``flatness.json`` and figures) are
:mod:`ssgd_dist.analysis.flatness_run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import FlatnessOptions
from ..distributed import all_reduce_sum
from ..noise import draw_noise, noise_generator, select_targets
from ..seeding import RADIUS_STRIDE, Stream, generator

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- the loss over a fixed sample set ---------------------------------------------------------------
class LossOracle:
    """Loss, accuracy and Hessian-vector products of ``model`` on this rank's shard, reduced over ranks.

    ``x`` and ``y`` are this rank's samples; the loss is the mean over the union of all ranks' samples.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn = nn.functional.cross_entropy,
        batch_size: int = 1000,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.device = next(model.parameters()).device
        self.x, self.y = x, y
        self.batch_size = max(1, batch_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        count = torch.tensor([len(y)], dtype=torch.float64, device=self.device)
        self.total = int(all_reduce_sum(count).item())
        if self.total == 0:
            raise ValueError("flatness: no samples to evaluate on")
        self.evaluations = 0

    def _chunks(self):
        for start in range(0, len(self.y), self.batch_size):
            end = start + self.batch_size
            yield self.x[start:end].to(self.device), self.y[start:end].to(self.device)

    @torch.no_grad()
    def loss_acc(self) -> tuple[float, float | None]:
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in self._chunks():
            out = self.model(x)
            totals[0] += self.loss_fn(out, y).double() * len(y)
            if out.ndim == 2 and not y.is_floating_point():
                totals[1] += (out.argmax(1) == y).sum()
                totals[2] += len(y)
        all_reduce_sum(totals)
        self.evaluations += 1
        loss = float(totals[0]) / self.total
        return loss, (float(totals[1] / totals[2]) if totals[2] > 0 else None)

    def loss(self) -> float:
        return self.loss_acc()[0]

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflat(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(v[start : start + p.numel()].view_as(p))
            start += p.numel()
        return out

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v, by double back-propagation, summed over chunks and ranks."""
        vs = self.unflat(v.to(self.device))
        acc = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for x, y in self._chunks():
            loss = self.loss_fn(self.model(x), y) * (len(y) / self.total)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            dot = sum((g * u).sum() for g, u in zip(grads, vs, strict=True) if g is not None)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                continue  # the loss is linear in the parameters here: H = 0
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            dense = [h if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.params, strict=True)]
            acc += self.flat(dense).double()
        return all_reduce_sum(acc).to(v.dtype)


# -- measures ---------------------------------------------------------------------------------------
def top_eigenvalue(oracle: LossOracle, iters: int = 100, tol: float = 1e-5, seed: int = 0) -> tuple[float, int]:
    """Power iteration on H v; the Rayleigh quotient v^T H v of the converged v (largest |eigenvalue|)."""
    gen = generator(Stream.HESSIAN_POWER, seed)
    v = torch.randn(oracle.dim, generator=gen, dtype=torch.float64)
    v /= v.norm()
    estimate = float("nan")
    for it in range(1, iters + 1):
        hv = oracle.hvp(v.float()).double().cpu()
        new = float(v @ hv)
        norm = hv.norm()
        if norm == 0:
            return 0.0, it
        v = hv / norm
        if math.isfinite(estimate) and abs(new - estimate) <= tol * max(abs(new), 1e-12):
            return new, it
        estimate = new
    return estimate, iters


def hessian_trace(oracle: LossOracle, probes: int = 100, seed: int = 0) -> tuple[float, float]:
    """Hutchinson: mean of v^T H v over Rademacher probes v, and the standard error of that mean."""
    gen = generator(Stream.HESSIAN_TRACE, seed)
    values = []
    for _ in range(probes):
        v = torch.randint(0, 2, (oracle.dim,), generator=gen).float().mul_(2).sub_(1)
        values.append(float(v.double() @ oracle.hvp(v).double().cpu()))
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var / len(values))


@torch.no_grad()
def perturbation_sharpness(
    oracle: LossOracle,
    targets: list[torch.Tensor],
    radii: Sequence[float],
    draws: int,
    distribution: str = "sphere",
    seed: int = 0,
) -> tuple[float, float | None, list[dict[str, float]]]:
    """For each relative radius: mean and std over draws of (L(w+n) + L(w-n))/2 - L(w), and the accuracy drop."""
    base_loss, base_acc = oracle.loss_acc()
    if not targets:
        return base_loss, base_acc, []
    backup = [p.detach().clone() for p in targets]
    rows = []
    try:
        for ri, radius in enumerate(radii):
            increases, drops = [], []
            for k in range(draws):
                gen = noise_generator(seed * RADIUS_STRIDE + ri, k, backup[0].device)
                noise = list(draw_noise(backup, distribution, "layer_rms", float(radius), gen))
                results = []
                for sign in (1.0, -1.0):
                    for p, b, n in zip(targets, backup, noise, strict=True):
                        p.copy_(b).add_(n, alpha=sign)
                    results.append(oracle.loss_acc())
                increases.append(0.5 * (results[0][0] + results[1][0]) - base_loss)
                if base_acc is not None:
                    drops.append(base_acc - 0.5 * (results[0][1] + results[1][1]))
            mean = sum(increases) / len(increases)
            spread = sum((x - mean) ** 2 for x in increases)
            std = math.sqrt(spread / (len(increases) - 1)) if len(increases) > 1 else 0.0
            row = {"radius": float(radius), "loss_increase": mean, "loss_increase_std": std}
            if drops:
                row["acc_drop"] = sum(drops) / len(drops)
            rows.append(row)
    finally:
        for p, b in zip(targets, backup, strict=True):
            p.copy_(b)
    return base_loss, base_acc, rows


def filter_normalized_direction(params: Sequence[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Li et al. 2018: Gaussian direction, each output filter rescaled to the norm of w's filter; 1-D tensors 0."""
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        if p.ndim <= 1:
            out.append(torch.zeros_like(p))
            continue
        w = p.detach().reshape(p.shape[0], -1)
        dv = d.reshape(p.shape[0], -1)
        dv.mul_(w.norm(dim=1, keepdim=True) / dv.norm(dim=1, keepdim=True).clamp_min(1e-12))
        out.append(d)
    return out


@torch.no_grad()
def loss_landscape(oracle: LossOracle, points: int, span: float, dims: int, seed: int = 0) -> dict[str, Any]:
    """Loss (and accuracy) on a grid along 1 or 2 filter-normalised random directions through w."""
    params = oracle.params
    gen = generator(Stream.LANDSCAPE, seed)
    directions = [filter_normalized_direction(params, gen) for _ in range(dims)]
    coords = torch.linspace(-span, span, points).tolist()
    backup = [p.detach().clone() for p in params]
    losses: list = []
    accs: list = []
    try:
        grid = [(a,) for a in coords] if dims == 1 else [(a, b) for b in coords for a in coords]
        for point in grid:
            for i, p in enumerate(params):
                p.copy_(backup[i])
                for c, d in zip(point, directions, strict=True):
                    p.add_(d[i], alpha=c)
            loss, acc = oracle.loss_acc()
            losses.append(loss)
            accs.append(acc)
    finally:
        for p, b in zip(params, backup, strict=True):
            p.copy_(b)
    if dims == 2:
        losses = [losses[i * points : (i + 1) * points] for i in range(points)]  # rows: beta, cols: alpha
        accs = [accs[i * points : (i + 1) * points] for i in range(points)]
        return {"alphas": coords, "betas": coords, "loss": losses, "acc": accs}
    return {"alphas": coords, "loss": losses, "acc": accs}


def measure(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opts: FlatnessOptions | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    progress: Callable[[str], None] = lambda stage: None,
) -> dict[str, Any]:
    """Every measure on this rank's samples ``x, y`` (already sharded); the model is left exactly as given.
    ``progress`` is told each measure before it starts: together they take tens of seconds."""
    opts = opts or FlatnessOptions()
    was_training = model.training
    model.eval()
    try:
        oracle = LossOracle(model, x, y, loss_fn, opts.batch_size)
        targets = select_targets(model, opts.targets)
        result: dict[str, Any] = {"samples": oracle.total, "parameters": oracle.dim, "options": opts.to_dict()}
        progress(f"perturbation sharpness: {len(opts.radii)} radii x {opts.draws} draws")
        loss, acc, rows = perturbation_sharpness(oracle, targets, opts.radii, opts.draws, opts.distribution, opts.seed)
        result.update(loss=loss, acc=acc, perturbation=rows)
        hessian: dict[str, Any] = {}
        if opts.power_iters:
            progress(f"top Hessian eigenvalue: at most {opts.power_iters} power iterations")
            top = top_eigenvalue(oracle, opts.power_iters, opts.power_tol, opts.seed)
            hessian["top_eigenvalue"], hessian["power_iterations"] = top
        if opts.hutchinson:
            progress(f"Hessian trace: {opts.hutchinson} Hutchinson probes")
            hessian["trace"], hessian["trace_stderr"] = hessian_trace(oracle, opts.hutchinson, opts.seed)
            hessian["hutchinson_probes"] = opts.hutchinson
        result["hessian"] = hessian
        if opts.landscape_1d:
            progress(f"1-D loss landscape: {opts.landscape_1d} points")
            result["landscape_1d"] = loss_landscape(oracle, opts.landscape_1d, opts.span, 1, opts.seed)
        if opts.landscape_2d:
            progress(f"2-D loss landscape: {opts.landscape_2d}x{opts.landscape_2d} points")
            result["landscape_2d"] = loss_landscape(oracle, opts.landscape_2d, opts.span, 2, opts.seed)
        result["loss_evaluations"] = oracle.evaluations
        return result
    finally:
        model.train(was_training)
