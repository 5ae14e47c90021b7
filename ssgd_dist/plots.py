"""Matplotlib plumbing shared by the report and the flatness plots (headless, consistent output)."""

from __future__ import annotations

from pathlib import Path


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


def label_axes(ax, title: str, xlabel: str, ylabel: str, title_size: float | None = None, log_grid: bool = False) -> None:
    """Title, axis labels (with units), a light grid (minor lines too on log axes) and the legend."""
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if log_grid else "major")
    legend(ax)
