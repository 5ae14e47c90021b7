"""``ssgd-dist sweep`` on a 2 x 2 x 1 grid of tiny runs, then ``report``: the runs, the resumability,
the table's numbers against the runs' own metrics, and PNGs that decode."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ssgd_dist.cli import main
from ssgd_dist.metrics import read_metrics

GRID = """
name: tiny
base:
  device: cpu
  model: {name: mlp, hidden: [16]}
  data: {name: synthetic}
  optim: {lr: 0.2, warmup_fraction: 0.1}
  train: {epochs: 2, progress: false, num_threads: 1}
methods: [sgd, ssgd]
batch_sizes: [64, 128]
seeds: [0]
flatness: {samples: 256, radii: [0.05, 0.1], draws: 2, power_iters: 10, hutchinson: 4, landscape_1d: 5, landscape_2d: 3}
"""
RUNS = ["sgd-b64-s0", "sgd-b128-s0", "ssgd-halves-b64-s0", "ssgd-halves-b128-s0"]
PNGS = [
    "accuracy_vs_batch.png",
    "learning_curves.png",
    "sharpness_vs_accuracy.png",
    "perturbation.png",
    "landscape_1d.png",
    "landscape_2d.png",
]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    grid = tmp / "tiny.yaml"
    grid.write_text(GRID)
    out = tmp / "out"
    assert main(["sweep", str(grid), "--out", str(out)]) == 0
    return grid, out


def final_acc(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir) if "test_acc" in r][-1]["test_acc"]


def table_rows(report: str) -> dict[tuple[str, int], list[str]]:
    """The comparison table (the first table, headed ``| method | batch | seeds |``), by (label, batch)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | batch | seeds |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[(cells[0], int(cells[1]))] = cells
    return rows


def test_sweep_runs_every_cell_and_measures_it(swept):
    _, out = swept
    for name in RUNS:
        run = out / name
        info = json.loads((run / "sweep.json").read_text())
        assert info["name"] == name and info["seed"] == 0
        steps = 2 * (1638 // info["batch_size"])
        assert read_metrics(run)[-1]["step"] == steps
        flat = json.loads((run / "flatness" / "flatness.json").read_text())
        assert flat["step"] == steps and flat["hessian"]["top_eigenvalue"] > 0


def test_report_table_equals_the_runs_metrics(swept):
    _, out = swept
    report = (out / "report" / "report.md").read_text()
    rows = table_rows(report)
    acc = {name: 100 * final_acc(out / name) for name in RUNS}
    for name in RUNS:
        label, batch = name.rsplit("-b", 1)[0], int(name.split("-b")[-1].split("-")[0])
        row = rows[(label, batch)]
        assert row[2] == "1"
        assert row[3] == f"{acc[name]:.2f} ± 0.00"
        flat = json.loads((out / name / "flatness" / "flatness.json").read_text())
        assert row[8] == format(flat["hessian"]["top_eigenvalue"], ".3g")
        assert row[9] == format(flat["hessian"]["trace"], ".3g")
        assert row[10] == format(flat["perturbation"][0]["loss_increase"], ".3g")  # median of [0.05, 0.1] -> 0.05
    # gap to small-batch SGD (batch 64) and paired gain over SGD at the same batch and seed
    assert rows[("sgd", 64)][4] == "+0.00"
    assert rows[("sgd", 128)][4] == f"{acc['sgd-b128-s0'] - acc['sgd-b64-s0']:+.2f}"
    for batch in (64, 128):
        gain = acc[f"ssgd-halves-b{batch}-s0"] - acc[f"sgd-b{batch}-s0"]
        assert rows[("ssgd-halves", batch)][5] == f"{gain:+.2f} ± 0.00"
        assert rows[("ssgd-halves", batch)][6] == f"{int(gain > 0)}/1"
        assert rows[("ssgd-halves", batch)][7] == "—"  # one seed: no t-test
    assert "ΔL (r=0.05)" in report
    summary = json.loads((out / "report" / "summary.json").read_text())
    got = {(c["label"], c["batch_size"]): c["mean"] for c in summary["cells"]}
    assert got[("sgd", 64)] == pytest.approx(acc["sgd-b64-s0"])


def test_report_pngs_exist_and_decode(swept):
    import matplotlib.image

    _, out = swept
    report = (out / "report" / "report.md").read_text()
    for name in PNGS:
        assert f"]({name})" in report
        img = matplotlib.image.imread(out / "report" / name)
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300
        assert float(img[..., :3].std()) > 0.01  # not blank


def test_rerun_skips_finished_runs(swept, capsys):
    grid, out = swept
    before = {name: (out / name / "metrics.jsonl").stat().st_mtime_ns for name in RUNS}
    assert main(["sweep", str(grid), "--out", str(out), "--no-report"]) == 0
    text = capsys.readouterr().out
    assert text.count("done, skipped") == 4
    assert all((out / name / "metrics.jsonl").stat().st_mtime_ns == before[name] for name in RUNS)
    assert main(["sweep", str(grid), "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count(" done ") == 4


def test_report_cli_on_the_sweep_directory(swept, tmp_path):
    _, out = swept
    assert main(["report", str(out), "--out", str(tmp_path / "r"), "--title", "Tiny"]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert text.startswith("# Tiny") and len(table_rows(text)) == 4


def test_flatness_cli(swept, tmp_path):
    _, out = swept
    rc = main(
        [
            "flatness",
            str(out / "sgd-b64-s0"),
            "--out",
            str(tmp_path / "f"),
            "--samples",
            "128",
            "--radii",
            "0.1",
            "--draws",
            "1",
            "--power-iters",
            "5",
            "--hutchinson",
            "2",
            "--landscape-1d",
            "3",
            "--landscape-2d",
            "0",
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "f" / "flatness.json").read_text())
    assert result["samples"] == 128 and [r["radius"] for r in result["perturbation"]] == [0.1]
    assert (tmp_path / "f" / "landscape_1d.png").exists() and not (tmp_path / "f" / "landscape_2d.png").exists()


def test_diverged_run_is_recorded_and_not_repeated(tmp_path, capsys):
    grid = tmp_path / "bad.yaml"
    grid.write_text(
        GRID.replace("optim: {lr: 0.2, warmup_fraction: 0.1}", "optim: {lr: 1.0e+30}").replace(
            "name: tiny", "name: bad"
        )
    )
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--out", str(out), "--methods", "sgd", "--batch-sizes", "64"]) == 0
    assert "1 diverged" in capsys.readouterr().out
    assert (out / "sgd-b64-s0" / "nonfinite.json").exists()
    assert main(["sweep", str(grid), "--out", str(out), "--methods", "sgd", "--batch-sizes", "64"]) == 0
    assert "diverged, skipped" in capsys.readouterr().out
    row = table_rows((out / "report" / "report.md").read_text())[("sgd", 64)]
    assert row[2] == "0 (+1 diverged)" and row[3] == "—"


def test_grid_errors_name_the_problem(tmp_path):
    from ssgd_dist.errors import ConfigError
    from ssgd_dist.sweep import load_grid

    bad = tmp_path / "g.yaml"
    bad.write_text(GRID.replace("seeds: [0]", "seeds: [0]\nvary: {noise.alpa: [0.1]}"))
    with pytest.raises(ConfigError, match=re.escape("noise.alpa")):
        load_grid(str(bad))
    bad.write_text(GRID.replace("methods: [sgd, ssgd]", "methods: [sgd, adam]"))
    with pytest.raises(ConfigError, match="adam"):
        load_grid(str(bad))
    with pytest.raises(ConfigError, match="packaged grid"):
        load_grid("no-such-grid")


def optim_peak(cfg):
    from ssgd_dist.optimizers import peak_lr

    return peak_lr(cfg.optim, cfg.data.batch_size)


def test_packaged_grids_expand():
    from ssgd_dist.sweep import load_grid, packaged_grid_names

    names = packaged_grid_names()
    assert {"mnist1d-large-batch", "cifar10-resnet20", "cifar100-resnet20", "cifar10-vgg16"} <= set(names)
    grid = load_grid("mnist1d-large-batch")
    cells = {(c.label, c.batch_size) for c in grid.cells}
    assert {
        ("sgd", 32),
        ("sgd", 2000),
        ("ssgd-halves", 2000),
        ("gni", 2000),
        ("smoothout", 2000),
        ("sam", 2000),
    } <= cells
    assert len({c.seed for c in grid.cells if c.batch_size == 2000 and c.label == "ssgd-halves"}) >= 5
    for c in grid.cells:  # the measured recipe: 120 epochs, peak lr 1.0 at batch 2000, 0.1 at batch 32
        assert c.cfg.train.epochs == 120
        assert optim_peak(c.cfg) == pytest.approx({2000: 1.0, 32: 0.1}[c.batch_size])
        opts = grid.flatness_for(c)  # every run measured; the costly 2-D landscape for seed 0 only
        assert opts is not None and (opts.landscape_2d > 0) == (c.seed == 0)
    for name in ("cifar10-resnet20", "cifar100-resnet20", "cifar10-vgg16"):
        g = load_grid(name)
        assert {c.batch_size for c in g.cells} >= {128, 8192}
        assert all(c.cfg.train.epochs == 200 and c.cfg.optim.warmup_fraction > 0 for c in g.cells)


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_on_a_local_ray_cluster(tmp_path):
    """The same grid cell as concurrent Ray Train jobs (2 workers each) on a real local cluster."""
    import subprocess

    # the ray marker: tests/conftest.py requires Ray
    from tests.ray_cluster import start_cluster, sweep_env, sweep_on_ray_command

    grid = tmp_path / "tiny.yaml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    cluster = start_cluster(num_cpus=2, log_dir=tmp_path / "ray-logs")
    try:
        options = ["--workers", "2", "--batch-sizes", "64", "--methods", "sgd", "--max-concurrent", "1"]
        proc = subprocess.run(
            sweep_on_ray_command(grid, out, *options),
            env=sweep_env(cluster),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        cluster.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = out / "sgd-b64-s0"
    assert read_metrics(run)[-1]["step"] == 2 * (1638 // 64)
    assert (run / "flatness" / "flatness.json").exists()
    assert (out / "report" / "report.md").exists()
