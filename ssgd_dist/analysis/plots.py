"""Every figure: the run report's and ``ssgd-dist flatness``'s, drawn the same way (headless, PNG).

Figures take plain data (flatness result dicts, the report's summaries) and write a file; nothing here
reads run directories, so the report and the flatness tool decide what is plotted and where.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import CellStats, RunSummary

METHOD_ORDER = ["sgd", "gni", "smoothout", "ssgd", "sam", "nso", "rwp"]


# -- matplotlib plumbing -----------------------------------------------------------------------------
def pyplot():
    """pyplot on the Agg backend: plots are written to files, on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend(ax, **kwargs) -> None:
    """A legend only when something is labelled (an empty one draws a warning and a blank box)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=kwargs.pop("fontsize", 8), **kwargs)


def save_figure(fig, path: Path, dpi: int = 120, tight: bool = True) -> None:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def label_axes(
    ax, title: str, xlabel: str, ylabel: str, title_size: float | None = None, log_grid: bool = False
) -> None:
    """Title, axis labels (with units), a light grid (minor lines too on log axes) and the legend."""
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if log_grid else "major")
    legend(ax)


def label_key(label: str) -> tuple[int, str]:
    """Methods in the paper's order (then by label), so tables, legends and colours agree."""
    base = label.split()[0].split("-")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)


def _log_axis(axis, max_labels: int = 6) -> None:
    """A log axis with at most ``max_labels`` plain-number labels, so they never overlap: at 1, 2, 5 x 10^k
    over a narrow range, at powers of ten (every few, over a wide one) otherwise. Call after plotting."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    subs = (1.0, 2.0, 5.0) if 3 * (decades + 1) <= max_labels else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=max_labels + 1))
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(NullFormatter())


def _colors(labels: list[str]) -> dict[str, Any]:
    cmap = pyplot().get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(sorted(set(labels), key=label_key))}


def _seeds_label(label: str, n: int) -> str:
    return f"{label} ({n} seed{'s' if n > 1 else ''})"


def _batch_panels(runs: list[RunSummary]):
    """One panel per batch size, side by side; yields (ax, the runs of that batch grouped by method label)."""
    batches = sorted({r.batch_size for r in runs})
    fig, axes = pyplot().subplots(1, len(batches), figsize=(5.6 * len(batches), 4.2), squeeze=False)

    def panels():
        for ax, batch in zip(axes[0], batches, strict=True):
            groups: dict[str, list[RunSummary]] = defaultdict(list)
            for r in runs:
                if r.batch_size == batch:
                    groups[r.label].append(r)
            yield ax, batch, {label: groups[label] for label in sorted(groups, key=label_key)}

    return fig, panels()


# -- one run (ssgd-dist flatness) ----------------------------------------------------------------------
def plot_landscape_1d(curves: dict[str, dict[str, Any]], path: Path, title: str = "1-D loss landscape") -> None:
    """One curve per label: training loss along a filter-normalised random direction (log scale)."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for label, land in curves.items():
        ax.plot(land["alphas"], land["loss"], label=label)
    ax.set_yscale("log")
    label_axes(
        ax,
        title,
        "step along the filter-normalised direction (units of ||filter||)",
        "training loss (cross-entropy, log scale)",
        log_grid=True,
    )
    save_figure(fig, path, dpi=120)


def plot_landscape_2d(
    panels: dict[str, dict[str, Any]], path: Path, title: str = "2-D loss landscape", cols: int | None = None
) -> None:
    """Contour maps of the training loss around w, one panel per label, with shared contour levels."""
    import numpy as np
    from matplotlib.colors import LogNorm

    n = len(panels)
    cols = cols or min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = pyplot().subplots(
        rows, cols, figsize=(3.9 * cols + 1.2, 3.7 * rows + 0.6), squeeze=False, layout="constrained"
    )
    all_losses = np.concatenate([np.asarray(p["loss"], dtype=float).ravel() for p in panels.values()])
    finite = all_losses[np.isfinite(all_losses)]
    lo, hi = (max(finite.min(), 1e-6), max(finite.max(), 1e-5)) if finite.size else (1e-3, 1.0)
    levels = np.geomspace(lo, max(hi, lo * 1.01), 20)
    contour = None
    for ax, (label, land) in zip(axes.ravel(), panels.items(), strict=False):
        z = np.nan_to_num(np.clip(np.asarray(land["loss"], dtype=float), lo, None), nan=hi, posinf=hi)
        contour = ax.contourf(
            land["alphas"], land["betas"], z, levels=levels, norm=LogNorm(lo, levels[-1]), cmap="viridis", extend="max"
        )
        ax.plot([0], [0], marker="*", color="white", markersize=10)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step along direction 1 (units of ||filter||)", fontsize=8)
        ax.set_ylabel("step along direction 2 (units of ||filter||)", fontsize=8)
        ax.set_aspect("equal")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if contour is not None:
        bar = fig.colorbar(contour, ax=axes.ravel().tolist(), shrink=0.9, format="%.3g")
        bar.set_label("training loss (log scale)")
    fig.suptitle(title)
    save_figure(fig, path, dpi=110, tight=False)


def plot_perturbation(rows_by_label: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for label, rows in rows_by_label.items():
        ax.plot([r["radius"] for r in rows], [max(r["loss_increase"], 1e-8) for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    label_axes(
        ax,
        title,
        "relative perturbation radius r (||n_i|| = r ||w_i||)",
        "expected training-loss increase",
        log_grid=True,
    )
    save_figure(fig, path, dpi=120)


# -- many runs (the report) ----------------------------------------------------------------------------
def plot_accuracy_vs_batch(cells: list[CellStats], path: Path, title: str = "", reference: str = "SGD") -> None:
    """The paper's central picture: test accuracy (mean +- std over seeds, one line per method) against the
    batch size, and beside it each method's paired gain over the ``reference`` (SGD by default). With a
    single batch size there is no axis to draw along: each method is a point (every seed a dot) instead."""
    by_label: dict[str, list[CellStats]] = defaultdict(list)
    for c in cells:
        if c.mean is not None:
            by_label[c.label].append(c)
    labels = sorted(by_label, key=label_key)
    colors = _colors(labels)
    batches = sorted({c.batch_size for c in cells})
    gains = any(c.paired_gain is not None for c in cells)
    fig, axes = pyplot().subplots(1, 2 if gains else 1, figsize=(12.4 if gains else 6.4, 4.4), squeeze=False)
    ax = axes[0][0]
    title = title or "Test accuracy vs batch size (mean ± std over seeds)"
    if len(batches) == 1:
        for i, label in enumerate(labels):
            (c,) = by_label[label]
            ax.scatter([i] * len(c.accs), list(c.accs.values()), color=colors[label], alpha=0.4, s=14)
            ax.errorbar([i], [c.mean], yerr=[c.std], marker="o", capsize=5, color=colors[label], label=label)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(labels) - 0.4)
        label_axes(ax, f"Test accuracy at batch {batches[0]} (dots: seeds)", "method", "final test accuracy (%)")
    else:
        for label in labels:
            cs = sorted(by_label[label], key=lambda c: c.batch_size)
            xs = [c.batch_size * _dodge(label, labels) for c in cs]
            ax.errorbar(xs, [c.mean for c in cs], yerr=[c.std for c in cs], marker="o", capsize=3, color=colors[label])
            ax.plot([], [], marker="o", color=colors[label], label=label)
        _batch_axis(ax, batches)
        label_axes(ax, title, "global batch size (samples, log scale)", "final test accuracy (%)")
    if gains:
        _plot_paired_gains(axes[0][1], by_label, labels, colors, batches, reference)
    save_figure(fig, path, dpi=120)


def _dodge(label: str, labels: list[str]) -> float:
    """A small multiplicative offset per method on a log axis, so error bars at one batch size do not overlap."""
    return 2 ** (0.06 * (labels.index(label) - (len(labels) - 1) / 2))


def _batch_axis(ax, batches: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.minorticks_off()


def _plot_paired_gains(ax, by_label, labels, colors, batches, reference: str) -> None:
    """Per method: mean +- std over seeds of (method - reference) at the same seed; hollow where p >= 0.05."""
    for label in labels:
        cs = sorted((c for c in by_label[label] if c.paired_gain is not None), key=lambda c: c.batch_size)
        if not cs:
            continue
        xs = [c.batch_size * _dodge(label, labels) for c in cs] if len(batches) > 1 else [labels.index(label)]
        ax.errorbar(
            xs, [c.paired_gain for c in cs], yerr=[c.paired_gain_std for c in cs], capsize=3, color=colors[label]
        )
        significant = [c.paired_p is not None and c.paired_p < 0.05 for c in cs]
        ax.scatter(
            xs,
            [c.paired_gain for c in cs],
            marker="o",
            s=36,
            zorder=3,
            edgecolors=colors[label],
            facecolors=[colors[label] if sig else "white" for sig in significant],
            label=label,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    if len(batches) > 1:
        _batch_axis(ax, batches)
        xlabel = "global batch size (samples, log scale)"
    else:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(labels) - 0.4)
        xlabel = "method"
    label_axes(
        ax,
        f"Paired gain over {reference} (same seed), mean ± std; filled: paired t p < 0.05",
        xlabel,
        f"test accuracy minus {reference}'s (points)",
        title_size=10,
    )


def plot_learning_curves(runs: list[RunSummary], path: Path) -> None:
    """Test accuracy (top) and training loss (bottom) during training, mean over seeds (band: +- std), one
    column per batch size. The training loss is what the step's passes saw: for the noise methods, the loss
    at the perturbed weights, so it sits above the loss at w."""
    import numpy as np

    colors = _colors([r.label for r in runs])
    batches = sorted({r.batch_size for r in runs})
    fig, axes = pyplot().subplots(2, len(batches), figsize=(5.6 * len(batches), 7.6), squeeze=False)
    for col, batch in enumerate(batches):
        groups: dict[str, list[RunSummary]] = defaultdict(list)
        for r in runs:
            if r.batch_size == batch and r.curve and not r.diverged:
                groups[r.label].append(r)
        for row, get in enumerate((_accuracy_points, _loss_points)):
            ax = axes[row][col]
            for label in sorted(groups, key=label_key):
                curves = [get(r) for r in groups[label]]
                n = min(len(c) for c in curves)
                if n == 0:
                    continue
                epochs = [e for e, _ in curves[0][:n]]
                values = np.array([[v for _, v in c[:n]] for c in curves])
                mean = values.mean(0)
                ax.plot(epochs, mean, color=colors[label], label=_seeds_label(label, len(curves)))
                if len(curves) > 1:
                    std = values.std(0, ddof=1)
                    ax.fill_between(epochs, mean - std, mean + std, color=colors[label], alpha=0.2)
            if row == 0:
                label_axes(ax, f"Test accuracy during training, batch {batch}", "epoch", "test accuracy (%)")
            else:
                ax.set_yscale("log")
                _log_axis(ax.yaxis)
                label_axes(
                    ax,
                    f"Training loss of the step's passes (per-epoch mean), batch {batch}",
                    "epoch",
                    "training loss (log scale)",
                    title_size=10,
                    log_grid=True,
                )
    save_figure(fig, path, dpi=110)


def _accuracy_points(run: RunSummary) -> list[tuple[float, float]]:
    return [(e, 100 * a) for e, a in run.curve]


def _loss_points(run: RunSummary) -> list[tuple[float, float]]:
    return [(e, v) for e, v in run.loss_curve if v > 0]


def plot_sharpness_vs_accuracy(runs: list[RunSummary], radius: float | None, path: Path) -> None:
    """Every run as a point: sharpness (x, log) against test accuracy (y); colour: method, marker: batch."""
    measured = [r for r in runs if r.flatness and r.test_acc is not None]
    colors = _colors([r.label for r in measured])
    markers = dict(zip(sorted({r.batch_size for r in measured}), "osD^vP*X", strict=False))
    panels = [("top Hessian eigenvalue λ_max", "Top Hessian eigenvalue", lambda r: r.top_eigenvalue)]
    if radius is not None:
        panels.append(
            (
                f"loss increase under random perturbation, r = {radius:g}",
                "Random-perturbation sharpness",
                lambda r: r.loss_increase(radius),
            )
        )
    panels.append(("Hessian trace (Hutchinson)", "Hessian trace", lambda r: r.hessian_trace))
    fig, axes = pyplot().subplots(
        1, len(panels), figsize=(4.8 * len(panels) + 2.2, 4.4), squeeze=False, layout="constrained"
    )
    for ax, (name, short, get) in zip(axes[0], panels, strict=True):
        for label in sorted({r.label for r in measured}, key=label_key):
            for batch, marker in markers.items():
                pts = [
                    (get(r), 100 * r.test_acc)
                    for r in measured
                    if r.label == label and r.batch_size == batch and get(r) is not None and get(r) > 0
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.scatter(xs, ys, color=colors[label], marker=marker, label=f"{label}, batch {batch}", alpha=0.8)
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
        ax.set_xlabel(f"{name} (log scale)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{short} vs test accuracy", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            fontsize=8,
            loc="outside right center",
            title="method, batch (one point per run)",
            title_fontsize=8,
        )
    fig.suptitle("Flatter solutions (left in each panel) against test accuracy")
    save_figure(fig, path, dpi=110, tight=False)


def plot_perturbation_curves(runs: list[RunSummary], path: Path) -> None:
    """Loss increase against the radius, mean over seeds (band: +- std), one panel per batch size."""
    import numpy as np

    measured = [r for r in runs if r.flatness and r.flatness.get("perturbation")]
    colors = _colors([r.label for r in measured])
    fig, panels = _batch_panels(measured)
    for ax, batch, groups in panels:
        for label, group in groups.items():
            rows = [r.flatness["perturbation"] for r in group]
            radii = [row["radius"] for row in rows[0]]
            values = np.array(
                [[row["loss_increase"] for row in rs[: len(radii)]] for rs in rows if len(rs) >= len(radii)]
            )
            mean = np.clip(values.mean(0), 1e-8, None)
            ax.plot(radii, mean, marker="o", color=colors[label], label=_seeds_label(label, len(values)))
            if len(values) > 1:
                std = values.std(0, ddof=1)
                ax.fill_between(radii, np.clip(mean - std, 1e-8, None), mean + std, color=colors[label], alpha=0.15)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_axis(ax.xaxis)
        label_axes(
            ax,
            f"Loss increase under random weight noise, batch {batch}",
            "relative radius r (||n_i|| = r ||w_i||, log scale)",
            "E[L(w+n)] - L(w), training loss (log scale)",
            title_size=10,
            log_grid=True,
        )
    save_figure(fig, path, dpi=110)


def plot_landscapes(runs: list[RunSummary], out: Path) -> list[str]:
    """1-D: mean curve over seeds per method, one panel per batch size; 2-D: the lowest seed's map."""
    import numpy as np

    written = []
    one_d = [r for r in runs if r.flatness and "landscape_1d" in r.flatness]
    if one_d:
        colors = _colors([r.label for r in one_d])
        fig, panels = _batch_panels(one_d)
        for ax, batch, groups in panels:
            for label, group in groups.items():
                lands = [r.flatness["landscape_1d"] for r in group]
                alphas = lands[0]["alphas"]
                losses = np.array([land["loss"] for land in lands if len(land["loss"]) == len(alphas)])
                ax.plot(alphas, losses.mean(0), color=colors[label], label=_seeds_label(label, len(losses)))
            ax.set_yscale("log")
            label_axes(
                ax,
                f"1-D loss landscape (Li et al. 2018), batch {batch}",
                "step along a filter-normalised random direction (units of ||filter||)",
                "training loss (log scale), mean over seeds",
                title_size=10,
                log_grid=True,
            )
        save_figure(fig, out / "landscape_1d.png", dpi=110)
        written.append("landscape_1d.png")
    two_d = [r for r in runs if r.flatness and "landscape_2d" in r.flatness]
    if two_d:
        maps, per_batch = {}, []
        for batch in sorted({r.batch_size for r in two_d}):
            labels = sorted({r.label for r in two_d if r.batch_size == batch}, key=label_key)
            per_batch.append(len(labels))
            for label in labels:
                first = min((r for r in two_d if r.label == label and r.batch_size == batch), key=lambda r: r.seed)
                maps[f"{label}, batch {batch} (seed {first.seed})"] = first.flatness["landscape_2d"]
        title = "2-D loss landscapes (filter-normalised directions, shared colour scale)"
        plot_landscape_2d(maps, out / "landscape_2d.png", title, cols=max(per_batch))
        written.append("landscape_2d.png")
    return written
