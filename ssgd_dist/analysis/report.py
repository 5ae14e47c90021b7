"""Comparison tables (markdown) and a summary (JSON) from run directories; the figures are ``plots``.

``write_report(run_dirs, out)`` writes ``out/report.md`` and ``out/summary.json`` with, per method and
batch size, the test accuracy over seeds (mean +- sample std), the difference to small-batch SGD, the
paired gain over SGD at the same batch (same seed: same initial weights and batch order) with a paired
t-test's p-value, and the
sharpness measured by ``ssgd-dist flatness`` (when ``RUN_DIR/flatness/flatness.json`` exists); and the
plots: test accuracy vs batch size, learning curves, sharpness vs accuracy, perturbation sharpness vs
radius, and 1-D / 2-D loss landscapes.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import safe_yaml
from ..errors import ConfigError
from ..metrics import read_metrics
from .plots import (
    label_key,
    plot_accuracy_vs_batch,
    plot_landscapes,
    plot_learning_curves,
    plot_perturbation_curves,
    plot_sharpness_vs_accuracy,
)

NA = "—"


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
    diverged: bool = False
    loss_curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch, mean training loss) per epoch
    step: int | None = None
    train_loss: float | None = None
    flatness: dict[str, Any] | None = field(default=None, repr=False)

    # sharpness shortcuts (None when not measured)
    @property
    def top_eigenvalue(self) -> float | None:
        return (self.flatness or {}).get("hessian", {}).get("top_eigenvalue")

    @property
    def hessian_trace(self) -> float | None:
        return (self.flatness or {}).get("hessian", {}).get("trace")

    def loss_increase(self, radius: float) -> float | None:
        for row in (self.flatness or {}).get("perturbation", []):
            if math.isclose(row["radius"], radius, rel_tol=1e-9):
                return row["loss_increase"]
        return None


def method_label(cfg: dict) -> str:
    if cfg["method"] == "ssgd":
        return f"ssgd-{cfg['ssgd']['batch_split']}"
    return cfg["method"]


def summarize_run(run_dir: Path) -> RunSummary:
    """One run's summary; a damaged run directory raises ``ConfigError`` naming the file at fault."""
    run_dir = Path(run_dir)
    what = f"report: {safe_yaml.clip(str(run_dir / 'config.yaml'))}"
    cfg = safe_yaml.read_mapping(run_dir / "config.yaml", what)
    try:
        return _summarize(run_dir, cfg)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{what}: lacks or mistypes {exc} (not a config.yaml that ssgd-dist train wrote)") from None
    except ConfigError:
        raise
    except ValueError as exc:  # a damaged sweep.json or flatness.json
        raise ConfigError(f"report: {safe_yaml.clip(str(run_dir))}: a damaged JSON file ({exc})") from None


def summarize_runs(run_dirs: list[Path]) -> list[RunSummary]:
    """The summaries of the readable runs; each damaged one is skipped with a one-line warning naming it
    (when none is readable: ``ConfigError``, the one run's own message when there was one)."""
    runs, skipped = [], []
    for d in run_dirs:
        try:
            runs.append(summarize_run(d))
        except ConfigError as exc:
            skipped.append((d, exc))
    if not runs and skipped:
        if len(skipped) == 1:
            raise skipped[0][1]
        raise ConfigError(f"report: no readable run directory; {skipped[0][1]} (and {len(skipped) - 1} more damaged)")
    for d, exc in skipped:
        print(f"ssgd-dist: warning: skipping {d}: {exc}", file=sys.stderr, flush=True)
    return runs


def _summarize(run_dir: Path, cfg: dict) -> RunSummary:
    label = method_label(cfg)
    info_path = run_dir / "sweep.json"
    if info_path.exists():
        label = json.loads(info_path.read_text()).get("label") or label
    records = read_metrics(run_dir)
    evals = [r for r in records if "test_acc" in r]
    last = evals[-1] if evals else {}
    diverged = (run_dir / "nonfinite.json").exists()
    flat_path = run_dir / "flatness" / "flatness.json"
    flat = json.loads(flat_path.read_text()) if flat_path.exists() and not diverged else None
    return RunSummary(
        run_dir,
        cfg["method"],
        label,
        cfg["data"]["batch_size"],
        cfg["seed"],
        None if diverged else last.get("test_acc"),
        None if diverged else last.get("test_loss"),
        [(r["epoch"], r["test_acc"]) for r in evals],
        diverged=diverged,
        loss_curve=epoch_means(records, "train_loss"),
        step=records[-1]["step"] if records else None,
        train_loss=records[-1].get("train_loss") if records else None,
        flatness=flat,
    )


def epoch_means(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(end of epoch e, mean of ``key`` over the steps logged in epoch e): one point per epoch, so a curve
    does not depend on how often a run logged, and per-step noise averages out."""
    bins: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if key in r and "epoch" in r and math.isfinite(r[key]):
            bins[max(0, math.ceil(r["epoch"]) - 1)].append(r[key])
    return [(e + 1.0, statistics.fmean(v)) for e, v in sorted(bins.items())]


def paired_t_p(diffs: list[float]) -> float | None:
    """Two-sided p-value of the paired t-test of mean(diffs) = 0 (None for fewer than 2 pairs or no spread)."""
    if len(diffs) < 2:
        return None
    sd = statistics.stdev(diffs)
    if sd == 0:
        return None
    from scipy.stats import t  # scikit-learn's own dependency

    return float(2 * t.sf(abs(statistics.fmean(diffs)) / (sd / math.sqrt(len(diffs))), len(diffs) - 1))


def _fmt_p(p: float | None) -> str:
    return NA if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def collect_run_dirs(paths: list[Path | str]) -> list[Path]:
    """Run directories among ``paths``: each path is a run directory or a folder holding some (a sweep)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            found.append(p)
        elif p.is_dir():
            parents = [c.parent for c in p.rglob("config.yaml")]
            found += sorted(d for d in parents if not any(part.startswith(".") for part in d.relative_to(p).parts))
    seen, unique = set(), []
    for d in found:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return NA if x is None or not math.isfinite(x) else format(x, spec)


# -- statistics per (method, batch size) -------------------------------------------------------------
@dataclass
class CellStats:
    label: str
    batch_size: int
    runs: list[RunSummary]
    accs: dict[int, float]  # seed -> test accuracy (%), finished runs only
    diverged: int
    mean: float | None
    std: float | None
    gap_to_small_batch_sgd: float | None = None
    paired_gain: float | None = None
    paired_gain_std: float | None = None
    paired_positive: int = 0
    paired_count: int = 0
    paired_p: float | None = None  # two-sided paired t-test over seeds
    top_eigenvalue: float | None = None
    hessian_trace: float | None = None
    loss_increase: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "runs"}
        d["accs"] = {str(k): v for k, v in self.accs.items()}
        d["runs"] = [str(r.run_dir) for r in self.runs]
        return d


def _mean_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def default_radius(runs: list[RunSummary]) -> float | None:
    """The median of the radii every measured run has (0.05 with the default radii)."""
    sets = [{row["radius"] for row in r.flatness.get("perturbation", [])} for r in runs if r.flatness]
    common = sorted(set.intersection(*sets)) if sets else []
    return common[(len(common) - 1) // 2] if common else None


def sgd_reference_label(runs: list[RunSummary]) -> str | None:
    labels = sorted({r.label for r in runs if r.method == "sgd"}, key=lambda s: (s != "sgd", s))
    return labels[0] if labels else None


def reference_label(runs: list[RunSummary], reference: str | None = None) -> str | None:
    """The label the paired gains are taken against: ``reference`` when given (any method's label, e.g. to
    compare every rival with S-SGD), else the SGD runs'."""
    if reference is None:
        return sgd_reference_label(runs)
    labels = sorted({r.label for r in runs}, key=label_key)
    if reference not in labels:
        raise ConfigError(
            f"report --reference {safe_yaml.clip(reference)}: no such method label; the runs have {labels}"
        )
    return reference


def reference_name(ref: str | None, runs: list[RunSummary]) -> str:
    """How headings call the reference: SGD for the default, else its label."""
    return "SGD" if ref is not None and ref == sgd_reference_label(runs) else str(ref)


def cell_stats(runs: list[RunSummary], radius: float | None = None, reference: str | None = None) -> list[CellStats]:
    groups: dict[tuple[str, int], list[RunSummary]] = defaultdict(list)
    for r in runs:
        groups[(r.label, r.batch_size)].append(r)
    cells = []
    for (label, batch), members in groups.items():
        members.sort(key=lambda r: r.seed)
        accs = {r.seed: 100 * r.test_acc for r in members if r.test_acc is not None}
        mean, std = _mean_std(list(accs.values())) if accs else (None, None)
        cell = CellStats(label, batch, members, accs, sum(r.diverged for r in members), mean, std)
        cell.top_eigenvalue = _mean_of([r.top_eigenvalue for r in members])
        cell.hessian_trace = _mean_of([r.hessian_trace for r in members])
        if radius is not None:
            cell.loss_increase = _mean_of([r.loss_increase(radius) for r in members])
        cells.append(cell)
    ref_label = reference_label(runs, reference)
    by_key = {(c.label, c.batch_size): c for c in cells}
    if ref_label is not None:
        sgd_batches = sorted(c.batch_size for c in cells if c.label == ref_label and c.mean is not None)
        small = by_key[(ref_label, sgd_batches[0])] if sgd_batches else None
        for c in cells:
            if small is not None and c.mean is not None:
                c.gap_to_small_batch_sgd = c.mean - small.mean
            base = by_key.get((ref_label, c.batch_size))
            if base is None or c.label == ref_label:
                continue
            diffs = [c.accs[s] - base.accs[s] for s in sorted(set(c.accs) & set(base.accs))]
            if diffs:
                c.paired_gain, c.paired_gain_std = _mean_std(diffs)
                c.paired_positive, c.paired_count = sum(d > 0 for d in diffs), len(diffs)
                c.paired_p = paired_t_p(diffs)
    cells.sort(key=lambda c: (c.batch_size, label_key(c.label)))
    return cells


def comparison_table(runs: list[RunSummary], radius: float | None = None, reference: str | None = None) -> str:
    """Markdown: one row per (method, batch size); accuracy mean +- std over seeds, gaps, sharpness."""
    if radius is None:
        radius = default_radius(runs)
    cells = cell_stats(runs, radius, reference)
    ref = reference_label(runs, reference)
    name = reference_name(ref, runs)
    small = min((c.batch_size for c in cells if c.label == ref), default=None)
    gap_head = f"vs {name}@{small} (pts)" if small is not None else f"vs small-batch {name} (pts)"
    flat = any(r.flatness for r in runs)
    head = [
        "method",
        "batch",
        "seeds",
        "test acc (%)",
        gap_head,
        f"paired gain vs {name} (pts)",
        "seeds better",
        "p (paired t)",
    ]
    if flat:
        head += ["λ_max", "tr(H)", f"ΔL (r={radius:g})" if radius is not None else "ΔL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for c in cells:
        seeds = f"{len(c.accs)}" + (f" (+{c.diverged} diverged)" if c.diverged else "")
        acc = f"{c.mean:.2f} ± {c.std:.2f}" if c.mean is not None else NA
        gap = f"{c.gap_to_small_batch_sgd:+.2f}" if c.gap_to_small_batch_sgd is not None else NA
        gain = f"{c.paired_gain:+.2f} ± {c.paired_gain_std:.2f}" if c.paired_gain is not None else NA
        better = f"{c.paired_positive}/{c.paired_count}" if c.paired_count else NA
        row = [c.label, str(c.batch_size), seeds, acc, gap, gain, better, _fmt_p(c.paired_p)]
        if flat:
            row += [_fmt(c.top_eigenvalue), _fmt(c.hessian_trace), _fmt(c.loss_increase)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def per_run_table(runs: list[RunSummary], radius: float | None) -> str:
    head = [
        "method",
        "batch",
        "seed",
        "test acc (%)",
        "final train loss",
        "λ_max",
        "tr(H)",
        f"ΔL (r={radius:g})" if radius else "ΔL",
        "run",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for r in sorted(runs, key=lambda r: (r.batch_size, label_key(r.label), r.seed)):
        acc = "diverged" if r.diverged else _fmt(100 * r.test_acc if r.test_acc is not None else None, ".2f")
        row = [
            r.label,
            str(r.batch_size),
            str(r.seed),
            acc,
            _fmt(r.train_loss, ".4f"),
            _fmt(r.top_eigenvalue),
            _fmt(r.hessian_trace),
            _fmt(r.loss_increase(radius) if radius else None),
            f"`{r.run_dir.name}`",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- the report --------------------------------------------------------------------------------------
def write_report(
    run_dirs: list[Path],
    out: Path,
    title: str | None = None,
    radius: float | None = None,
    reference: str | None = None,
) -> Path:
    """``reference``: the method label the paired gains are taken against (default: SGD's)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = summarize_runs(run_dirs)
    if radius is None:
        radius = default_radius(runs)
    ref = reference_label(runs, reference)
    cells = cell_stats(runs, radius, ref)
    table = comparison_table(runs, radius, ref)
    plots = []
    plot_accuracy_vs_batch(cells, out / "accuracy_vs_batch.png", reference=reference_name(ref, runs))
    plots.append(("Test accuracy vs batch size", "accuracy_vs_batch.png"))
    plot_learning_curves(runs, out / "learning_curves.png")
    plots.append(("Learning curves", "learning_curves.png"))
    if any(r.flatness for r in runs):
        plot_sharpness_vs_accuracy(runs, radius, out / "sharpness_vs_accuracy.png")
        plots.append(("Sharpness vs accuracy", "sharpness_vs_accuracy.png"))
        plot_perturbation_curves(runs, out / "perturbation.png")
        plots.append(("Loss increase under random weight noise", "perturbation.png"))
        for name in plot_landscapes(runs, out):
            plots.append(("1-D loss landscapes" if "1d" in name else "2-D loss landscapes", name))
    text = [f"# {title or 'ssgd-dist report'}\n", table, ""]
    text.append(
        "Test accuracy: final evaluation, mean ± sample std over seeds (diverged runs are counted, not averaged). "
        f"`vs {reference_name(ref, runs)}@b`: difference of the mean to `{ref}` at its smallest batch size. "
        "`paired gain`: mean ± std over "
        f"seeds of (method - `{ref}`) at the same batch size and seed (same initial weights and batch order); "
        "`seeds better`: how many of those differences are positive; `p (paired t)`: two-sided p-value of a paired "
        "t-test of those differences (n - 1 degrees of freedom; with 3 seeds only a large, consistent gain reaches "
        "p < 0.05)."
        if ref
        else "Test accuracy: final evaluation, mean ± sample std over seeds."
    )
    if any(r.flatness for r in runs):
        text.append(
            "\nSharpness (`ssgd-dist flatness`, training-set subset, eval mode; mean over seeds): `λ_max` the top "
            "Hessian eigenvalue (power iteration), `tr(H)` the Hessian trace (Hutchinson), "
            f"`ΔL (r={radius:g})` the expected training-loss increase under random weight noise with "
            f"||n_i|| = {radius:g} ||w_i|| per weight tensor. Lower is flatter."
            if radius is not None
            else ""
        )
    text.append("")
    for name, file in plots:
        text.append(f"## {name}\n\n![{name}]({file})\n")
    text.append("## Every run\n")
    text.append(per_run_table(runs, radius))
    text.append("")
    (out / "report.md").write_text("\n".join(text) + "\n")
    summary = {
        "radius": radius,
        "reference": ref,
        "cells": [c.to_dict() for c in cells],
        "runs": [
            {
                "run_dir": str(r.run_dir),
                "label": r.label,
                "method": r.method,
                "batch_size": r.batch_size,
                "seed": r.seed,
                "test_acc": r.test_acc,
                "diverged": r.diverged,
                "top_eigenvalue": r.top_eigenvalue,
                "hessian_trace": r.hessian_trace,
                "loss_increase": r.loss_increase(radius) if radius else None,
            }
            for r in runs
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return out / "report.md"
