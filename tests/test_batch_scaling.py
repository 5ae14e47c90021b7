"""The packaged batch-size grid (``mnist1d-batch-scaling``) end to end at a tiny size, and what ``report``
makes of it: one accuracy line per method, the paired gain with its t-test, and a figure that is drawn
even when a report holds a single batch size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ssgd_dist.analysis.report import paired_t_p, write_report
from ssgd_dist.cli import main
from ssgd_dist.metrics import read_metrics
from ssgd_dist.sweep import load_grid

pytestmark = pytest.mark.timeout(240)

METHODS = {"sgd", "ssgd-halves", "gni", "sam", "nso", "rwp"}
TINY = ["--set", "data.num_samples=2000", "--set", "model.hidden=[16]", "--set", "train.epochs=1"]
TINY += ["--set", "train.eval_every=1", "--batch-sizes", "128,512", "--seeds", "0,1"]


def test_the_packaged_grid_is_the_documented_recipe():
    grid = load_grid("mnist1d-batch-scaling")
    cells = {(c.label, c.batch_size, c.seed) for c in grid.cells}
    assert cells == {(m, b, s) for m in METHODS for b in (128, 512, 2048, 8192) for s in (0, 1, 2)}
    for c in grid.cells:
        cfg = c.cfg
        assert cfg.data.num_samples == 20480 and cfg.model.hidden == [128, 128] and grid.flatness is None
        # square-root scaling from 0.1 at batch 32, capped at 0.8
        assert cfg.optim.lr == pytest.approx(min(0.8, 0.1 * math.sqrt(c.batch_size / 32)), rel=1e-3)
        assert cfg.optim.reference_batch_size is None
        steps = cfg.train.epochs * (16384 // c.batch_size)
        assert steps == {128: 2560, 512: 640, 2048: 160, 8192: 160}[c.batch_size]


def test_paired_t_p_matches_the_closed_form_for_two_degrees_of_freedom():
    # df = 2: P(|T| > t) = 1 - t / sqrt(t^2 + 2)
    diffs = [1.0, 2.0, 4.5]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = mean / (sd / math.sqrt(3))
    assert paired_t_p(diffs) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert paired_t_p([-d for d in diffs]) == pytest.approx(paired_t_p(diffs))
    assert paired_t_p([1.0]) is None and paired_t_p([2.0, 2.0]) is None


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch-scaling") / "out"
    assert main(["sweep", "mnist1d-batch-scaling", "--out", str(out), *TINY]) == 0
    return out


def final_acc(run_dir: Path) -> float:
    return 100 * [r for r in read_metrics(run_dir) if "test_acc" in r][-1]["test_acc"]


def test_tiny_grid_runs_every_method_and_the_report_compares_them(tiny_sweep):
    out = tiny_sweep
    summary = json.loads((out / "report" / "summary.json").read_text())
    cells = {(c["label"], c["batch_size"]): c for c in summary["cells"]}
    assert set(cells) == {(m, b) for m in METHODS for b in (128, 512)}
    for (label, batch), cell in cells.items():
        accs = {s: final_acc(out / f"{label}-b{batch}-s{s}") for s in (0, 1)}
        assert cell["mean"] == pytest.approx(sum(accs.values()) / 2)
        if label == "sgd":
            continue
        sgd = {s: final_acc(out / f"sgd-b{batch}-s{s}") for s in (0, 1)}
        diffs = [accs[s] - sgd[s] for s in (0, 1)]
        assert cell["paired_gain"] == pytest.approx(sum(diffs) / 2)
        assert cell["paired_p"] == (None if diffs[0] == diffs[1] else pytest.approx(paired_t_p(diffs)))
    report = (out / "report" / "report.md").read_text()
    assert "| p (paired t) |" in report and "![Test accuracy vs batch size](accuracy_vs_batch.png)" in report


def _pixels_of(png: Path, rgb: tuple[int, int, int]) -> int:
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(img * 255 - np.array(rgb)).max(-1) < 8).sum())


FIRST_COLOUR = (31, 119, 180)  # tab10's first colour: the first method in the paper's order (sgd when present)


def test_accuracy_vs_batch_draws_each_method_with_one_or_many_batch_sizes(tiny_sweep, tmp_path):
    many = tiny_sweep / "report" / "accuracy_vs_batch.png"
    one = tmp_path / "one"
    write_report(sorted(tiny_sweep.glob("*-b512-s*")), one)
    for png in (many, one / "accuracy_vs_batch.png"):
        assert _pixels_of(png, FIRST_COLOUR) > 100, png
    # a report of runs without SGD has no gain panel, and still a point per method
    write_report(sorted(tiny_sweep.glob("nso-b512-s*")), tmp_path / "nso")
    assert _pixels_of(tmp_path / "nso" / "accuracy_vs_batch.png", FIRST_COLOUR) > 100


def test_report_takes_the_paired_gains_against_any_reference(tiny_sweep, tmp_path):
    out = tmp_path / "vs-ssgd"
    assert main(["report", str(tiny_sweep), "--out", str(out), "--reference", "ssgd-halves"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "ssgd-halves"
    cell = next(c for c in summary["cells"] if c["label"] == "nso" and c["batch_size"] == 128)
    diffs = [
        final_acc(tiny_sweep / f"nso-b128-s{s}") - final_acc(tiny_sweep / f"ssgd-halves-b128-s{s}") for s in (0, 1)
    ]
    assert cell["paired_gain"] == pytest.approx(sum(diffs) / 2)
    assert "| paired gain vs ssgd-halves (pts) |" in (out / "report.md").read_text()
    assert main(["report", str(tiny_sweep), "--out", str(out), "--reference", "ssgd"]) == 2
