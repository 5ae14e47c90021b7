"""How flat is a solution: perturbation sharpness, Hessian spectrum, loss landscapes; BN recalibration.

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

Usage: ``ssgd-dist flatness RUN_DIR`` (add ``--workers N``, or launch under torchrun, to shard).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import all_reduce_sum
from .noise import draw_noise, noise_generator, select_targets
from .seeding import RADIUS_STRIDE, Stream, generator, seed_initial_weights
from .plots import label_axes, pyplot as _plt, save_figure

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FlatnessOptions:
    """What to measure and how precisely; every field is a ``ssgd-dist flatness`` flag."""

    samples: int = 2000  # training examples (first N; 0: all), sharded over ranks
    batch_size: int = 1000  # evaluation chunk per rank
    radii: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2)
    draws: int = 10  # symmetric pairs per radius
    distribution: str = "sphere"  # of the perturbation direction: sphere, rademacher, gaussian, uniform
    targets: str = "weights"  # perturbed tensors: weights (ndim >= 2) or all
    power_iters: int = 100
    power_tol: float = 1e-5  # relative change of the eigenvalue estimate that stops the iteration
    hutchinson: int = 100  # Rademacher probes for the trace; 0 disables
    landscape_1d: int = 41  # points in [-span, span]; 0 disables
    landscape_2d: int = 21  # points per axis; 0 disables
    span: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["radii"] = [float(r) for r in self.radii]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "FlatnessOptions":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"flatness: unknown option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        if "radii" in d:
            d["radii"] = tuple(float(r) for r in d["radii"])
        return cls(**d)


# -- the loss over a fixed sample set ---------------------------------------------------------------
class LossOracle:
    """Loss, accuracy and Hessian-vector products of ``model`` on this rank's shard, reduced over ranks.

    ``x`` and ``y`` are this rank's samples; the loss is the mean over the union of all ranks' samples.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = nn.functional.cross_entropy, batch_size: int = 1000):
        self.model = model
        self.loss_fn = loss_fn
        self.device = next(model.parameters()).device
        self.x, self.y = x, y
        self.batch_size = max(1, batch_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.total = int(all_reduce_sum(torch.tensor([len(y)], dtype=torch.float64, device=self.device)).item())
        if self.total == 0:
            raise ValueError("flatness: no samples to evaluate on")
        self.evaluations = 0

    def _chunks(self):
        for start in range(0, len(self.y), self.batch_size):
            yield self.x[start : start + self.batch_size].to(self.device), self.y[start : start + self.batch_size].to(self.device)

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
            dot = sum((g * u).sum() for g, u in zip(grads, vs) if g is not None)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                continue  # the loss is linear in the parameters here: H = 0
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            acc += self.flat([h if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.params)]).double()
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
    oracle: LossOracle, targets: list[torch.Tensor], radii: Sequence[float], draws: int, distribution: str = "sphere", seed: int = 0
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
                    for p, b, n in zip(targets, backup, noise):
                        p.copy_(b).add_(n, alpha=sign)
                    results.append(oracle.loss_acc())
                increases.append(0.5 * (results[0][0] + results[1][0]) - base_loss)
                if base_acc is not None:
                    drops.append(base_acc - 0.5 * (results[0][1] + results[1][1]))
            mean = sum(increases) / len(increases)
            std = math.sqrt(sum((x - mean) ** 2 for x in increases) / (len(increases) - 1)) if len(increases) > 1 else 0.0
            row = {"radius": float(radius), "loss_increase": mean, "loss_increase_std": std}
            if drops:
                row["acc_drop"] = sum(drops) / len(drops)
            rows.append(row)
    finally:
        for p, b in zip(targets, backup):
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
                for c, d in zip(point, directions):
                    p.add_(d[i], alpha=c)
            loss, acc = oracle.loss_acc()
            losses.append(loss)
            accs.append(acc)
    finally:
        for p, b in zip(params, backup):
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
) -> dict[str, Any]:
    """Every measure on this rank's samples ``x, y`` (already sharded); the model is left exactly as given."""
    opts = opts or FlatnessOptions()
    was_training = model.training
    model.eval()
    try:
        oracle = LossOracle(model, x, y, loss_fn, opts.batch_size)
        targets = select_targets(model, opts.targets)
        result: dict[str, Any] = {"samples": oracle.total, "parameters": oracle.dim, "options": opts.to_dict()}
        loss, acc, rows = perturbation_sharpness(oracle, targets, opts.radii, opts.draws, opts.distribution, opts.seed)
        result.update(loss=loss, acc=acc, perturbation=rows)
        hessian: dict[str, Any] = {}
        if opts.power_iters:
            hessian["top_eigenvalue"], hessian["power_iterations"] = top_eigenvalue(oracle, opts.power_iters, opts.power_tol, opts.seed)
        if opts.hutchinson:
            hessian["trace"], hessian["trace_stderr"] = hessian_trace(oracle, opts.hutchinson, opts.seed)
            hessian["hutchinson_probes"] = opts.hutchinson
        result["hessian"] = hessian
        if opts.landscape_1d:
            result["landscape_1d"] = loss_landscape(oracle, opts.landscape_1d, opts.span, 1, opts.seed)
        if opts.landscape_2d:
            result["landscape_2d"] = loss_landscape(oracle, opts.landscape_2d, opts.span, 2, opts.seed)
        result["loss_evaluations"] = oracle.evaluations
        return result
    finally:
        model.train(was_training)


# -- plots ------------------------------------------------------------------------------------------
def plot_landscape_1d(curves: dict[str, dict[str, Any]], path: Path, title: str = "1-D loss landscape") -> None:
    """One curve per label: training loss along a filter-normalised random direction (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, land in curves.items():
        ax.plot(land["alphas"], land["loss"], label=label)
    ax.set_yscale("log")
    label_axes(ax, title, "step along the filter-normalised direction (alpha, units of ||filter||)", "training loss (cross-entropy, log scale)", log_grid=True)
    save_figure(fig, path, dpi=120)


def plot_landscape_2d(panels: dict[str, dict[str, Any]], path: Path, title: str = "2-D loss landscape", cols: int | None = None) -> None:
    """Contour maps of the training loss around w, one panel per label, with shared contour levels."""
    import numpy as np

    plt = _plt()
    n = len(panels)
    cols = cols or min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols + 1.2, 3.7 * rows + 0.6), squeeze=False, layout="constrained")
    all_losses = np.concatenate([np.asarray(p["loss"], dtype=float).ravel() for p in panels.values()])
    finite = all_losses[np.isfinite(all_losses)]
    lo, hi = (max(finite.min(), 1e-6), max(finite.max(), 1e-5)) if finite.size else (1e-3, 1.0)
    levels = np.geomspace(lo, max(hi, lo * 1.01), 20)
    from matplotlib.colors import LogNorm

    contour = None
    for ax, (label, land) in zip(axes.ravel(), panels.items()):
        z = np.clip(np.asarray(land["loss"], dtype=float), lo, None)
        contour = ax.contourf(land["alphas"], land["betas"], np.nan_to_num(z, nan=hi, posinf=hi), levels=levels, norm=LogNorm(lo, levels[-1]), cmap="viridis", extend="max")
        ax.plot([0], [0], marker="*", color="white", markersize=10)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("direction 1 (alpha)")
        ax.set_ylabel("direction 2 (beta)")
        ax.set_aspect("equal")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if contour is not None:
        bar = fig.colorbar(contour, ax=axes.ravel().tolist(), shrink=0.9, format="%.3g")
        bar.set_label("training loss (log scale)")
    fig.suptitle(title)
    save_figure(fig, path, dpi=110, tight=False)


def plot_perturbation(rows_by_label: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in rows_by_label.items():
        ax.plot([r["radius"] for r in rows], [max(r["loss_increase"], 1e-8) for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    label_axes(ax, title, "relative perturbation radius r (||n_i|| = r ||w_i||)", "expected training-loss increase", log_grid=True)
    save_figure(fig, path, dpi=120)


# -- run directories --------------------------------------------------------------------------------
FLATNESS_DIR = "flatness"
FLATNESS_FILE = "flatness.json"


def flatness_path(run_dir: Path) -> Path:
    return Path(run_dir) / FLATNESS_DIR / FLATNESS_FILE


def measure_run(run_dir: Path, opts: FlatnessOptions | None = None, checkpoint: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Measure a run's final (or a given) checkpoint; rank 0 writes ``flatness.json`` and PNGs to ``out``.

    Joins the process group when launched by torchrun or Ray (each rank then takes a shard of the
    samples); otherwise runs alone.
    """
    from . import distributed
    from .checkpoint import load_checkpoint_file, load_latest
    from .config import load_config
    from .errors import ConfigError
    from .data import load_dataset
    from .models import build_model

    run_dir = Path(run_dir)
    opts = opts or FlatnessOptions()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"flatness: {run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(str(run_dir / "config.yaml"))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = distributed.setup(cfg.device)
    try:
        if checkpoint is not None:
            if not Path(checkpoint).is_file():
                raise ConfigError(f"flatness --checkpoint {checkpoint}: no such file")
            state, ckpt_path = load_checkpoint_file(Path(checkpoint), map_location=ctx.device), Path(checkpoint)
        else:
            found = load_latest(run_dir, map_location=ctx.device)
            if found is None:
                raise ConfigError(f"flatness: {run_dir} has no checkpoint yet (train it first, or pass --checkpoint FILE)")
            state, ckpt_path = found
        data = load_dataset(cfg.data)
        seed_initial_weights(cfg.seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(ctx.device)
        model.load_state_dict(state["model"])
        n = len(data.y_train) if opts.samples <= 0 else min(opts.samples, len(data.y_train))
        x, y = data.x_train[:n][ctx.rank :: ctx.world_size], data.y_train[:n][ctx.rank :: ctx.world_size]
        result = measure(model, x, y, opts)
        result.update(run_dir=str(run_dir), checkpoint=str(ckpt_path), step=int(state.get("step", -1)), world_size=ctx.world_size)
        if ctx.is_main:
            write_outputs(result, Path(out) if out else run_dir / FLATNESS_DIR, title=run_dir.name)
        distributed.barrier()
        return result
    finally:
        distributed.teardown(ctx)


def write_outputs(result: dict[str, Any], out: Path, title: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FLATNESS_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / FLATNESS_FILE)
    if result.get("perturbation"):
        plot_perturbation({title or "run": result["perturbation"]}, out / "perturbation.png", f"Random-perturbation sharpness: {title}")
    if "landscape_1d" in result:
        plot_landscape_1d({title or "run": result["landscape_1d"]}, out / "landscape_1d.png", f"1-D loss landscape: {title}")
    if "landscape_2d" in result:
        plot_landscape_2d({title or "run": result["landscape_2d"]}, out / "landscape_2d.png", f"2-D loss landscape: {title}")
    return out / FLATNESS_FILE


def summary_line(result: dict[str, Any]) -> str:
    h = result.get("hessian", {})
    parts = [f"loss={result['loss']:.4g}"]
    if result.get("acc") is not None:
        parts.append(f"acc={result['acc']:.4f}")
    if "top_eigenvalue" in h:
        parts.append(f"lambda_max={h['top_eigenvalue']:.4g}")
    if "trace" in h:
        parts.append(f"trace={h['trace']:.4g}+-{h['trace_stderr']:.2g}")
    for row in result.get("perturbation", []):
        parts.append(f"dL(r={row['radius']:g})={row['loss_increase']:.3g}")
    return " ".join(parts)


if __name__ == "__main__":  # pragma: no cover - convenience
    print(summary_line(measure_run(Path(sys.argv[1]))))
