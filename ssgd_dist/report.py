"""Comparison tables (markdown) and plots (PNG) from run directories."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from .metrics import read_metrics


@dataclass
class RunSummary:
    run_dir: Path
    method: str
    label: str
    batch_size: int
    seed: int
    test_acc: float | None
    test_loss: float | None
    curve: list[tuple[float, float]]  # (epoch, test_acc) at evaluations


def method_label(cfg: dict) -> str:
    if cfg["method"] == "ssgd":
        return f"ssgd-{cfg['ssgd']['batch_split']}"
    return cfg["method"]


def summarize_run(run_dir: Path) -> RunSummary:
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    evals = [r for r in read_metrics(run_dir) if "test_acc" in r]
    last = evals[-1] if evals else {}
    return RunSummary(
        Path(run_dir),
        cfg["method"],
        method_label(cfg),
        cfg["data"]["batch_size"],
        cfg["seed"],
        last.get("test_acc"),
        last.get("test_loss"),
        [(r["epoch"], r["test_acc"]) for r in evals],
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def comparison_table(runs: list[RunSummary]) -> str:
    """Markdown: one row per (method, batch size), test accuracy mean +- std over seeds."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in runs:
        if r.test_acc is not None:
            groups[(r.label, r.batch_size)].append(100 * r.test_acc)
    lines = ["| method | batch | seeds | test acc (%) |", "|---|---:|---:|---:|"]
    for (label, batch), accs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mean, std = _mean_std(accs)
        lines.append(f"| {label} | {batch} | {len(accs)} | {mean:.2f} +- {std:.2f} |")
    return "\n".join(lines)


def plot_learning_curves(runs: list[RunSummary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in runs:
        if r.curve:
            epochs, accs = zip(*r.curve)
            ax.plot(epochs, [100 * a for a in accs], label=f"{r.label} (batch {r.batch_size}, seed {r.seed})")
    ax.set_title("Test accuracy during training")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs: list[Path], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    runs = [summarize_run(d) for d in run_dirs]
    table = comparison_table(runs)
    plot_learning_curves(runs, out / "learning_curves.png")
    text = f"# ssgd-dist report\n\n{table}\n\n![learning curves](learning_curves.png)\n\nRuns:\n"
    text += "".join(f"- `{r.run_dir}`\n" for r in runs)
    (out / "report.md").write_text(text)
    return out / "report.md"
