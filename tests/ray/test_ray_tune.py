"""``ssgd-dist sweep --ray``: one Ray Tune trial per grid run, on the session's real token-authenticated cluster.

Each trial is the same Ray Train run as ``launch/ray_job.py``; every log window reaches Tune (one Tune
result per window, not per checkpoint); an interrupted sweep resumes without training finished runs
again; ``report`` reads the run directories.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ssgd_dist.metrics import read_metrics
from tests.conftest import REPO
from tests.ray_cluster import sweep_env, sweep_on_ray_command

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

# 8 steps: log windows end at 2, 4, 6, 8; checkpoints only at 4 and 8.
GRID = """
name: tune4
base:
  device: cpu
  model: {name: mlp, hidden: [16]}
  data: {name: synthetic, batch_size: 256}
  optim: {lr: 0.2, warmup_fraction: 0.1}
  train: {epochs: 2, max_steps: 8, log_every: 2, checkpoint_every: 4, progress: false, num_threads: 1}
methods: [ssgd]
seeds: [0, 1, 2, 3]
flatness: false
"""
RUNS = [f"ssgd-halves-b256-s{seed}" for seed in range(4)]
WINDOWS = [2, 4, 6, 8]


def sweep_command(grid: Path, out: Path) -> list[str]:
    return sweep_on_ray_command(grid, out, "--workers", "1", "--max-concurrent", "2")


def started(output: str) -> list[str]:
    """The runs whose Tune trial started, in order (the sweep prints one line per trial start)."""
    return [line.split(":")[0] for line in output.splitlines() if ": training (Tune trial " in line]


def tune_results(out: Path, run: str) -> list[dict]:
    """The results Tune recorded for ``run``'s trial (its ``result.json``, one JSON object per result)."""
    found = [
        p
        for p in (out / ".ray").glob("sweep-tune4-*/*/result.json")
        if json.loads(p.read_text().splitlines()[0])["config"]["run"] == run
    ]
    assert len(found) == 1, found
    return [json.loads(line) for line in found[0].read_text().splitlines()]


def test_tune_sweep_of_four_runs_two_at_a_time(ray_cluster, tmp_path):
    grid, out = tmp_path / "tune4.yaml", tmp_path / "out"
    grid.write_text(GRID)
    start = time.monotonic()
    proc = subprocess.run(
        sweep_command(grid, out), env=sweep_env(ray_cluster), capture_output=True, text=True, timeout=280, cwd=REPO
    )
    print(f"sweep of 4 runs, 2 at a time: {time.monotonic() - start:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(started(proc.stdout)) == RUNS, proc.stdout
    lines = proc.stdout.splitlines()
    first_done = next(i for i, line in enumerate(lines) if line.endswith(": trial finished"))
    assert sum(": training (Tune trial " in line for line in lines[:first_done]) == 2, "two trials at once"

    for run in RUNS:
        run_dir = out / run
        assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
        assert any((run_dir / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard events still written"
        results = tune_results(out, run)
        assert [r["step"] for r in results] == WINDOWS, "one Tune result per log window"
        assert all({"train_loss", "lr", "grad_norm"} <= r.keys() for r in results)
        assert "test_acc" in results[-1]
        assert sum("checkpoint_path" in r for r in results) == 2, "checkpoints only at steps 4 and 8"
    report = (out / "report" / "report.md").read_text()
    assert "| ssgd-halves | 256 | 4 |" in report, report


def finished_runs(out: Path) -> list[str]:
    """Runs whose directory holds the final evaluation (what the sweep itself checks before offering a run)."""
    return [
        run
        for run in RUNS
        if (records := read_metrics(out / run)) and "test_acc" in records[-1] and records[-1]["step"] == 8
    ]


def test_interrupted_tune_sweep_resumes_without_retraining_finished_runs(ray_cluster, tmp_path):
    grid, out = tmp_path / "tune4.yaml", tmp_path / "out"
    grid.write_text(GRID)
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(
            sweep_command(grid, out), env=sweep_env(ray_cluster), stdout=sink, stderr=subprocess.STDOUT, cwd=REPO
        )
        try:
            deadline = time.monotonic() + 200
            while len(finished_runs(out)) < 2:  # the first two trials are done, the others start
                assert first.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.2)
            first.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops the trials and saves its state
            first.wait(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
    finished = finished_runs(out)
    assert 2 <= len(finished) < 4, log.read_text()[-4000:]
    stamps = {run: (out / run / "metrics.jsonl").stat().st_mtime_ns for run in finished}

    start = time.monotonic()
    resumed = subprocess.run(
        sweep_command(grid, out), env=sweep_env(ray_cluster), capture_output=True, text=True, timeout=200, cwd=REPO
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    again = started(resumed.stdout)
    print(
        f"finished before the interruption: {finished}; trainings started on resume: {again} "
        f"({time.monotonic() - start:.0f} s)"
    )
    assert sorted(again) == sorted(set(RUNS) - set(finished)), resumed.stdout
    for run in finished:
        assert (out / run / "metrics.jsonl").stat().st_mtime_ns == stamps[run], f"{run} was trained again"
    for run in RUNS:
        assert [r["step"] for r in read_metrics(out / run)] == list(range(1, 9)), run
    assert "| ssgd-halves | 256 | 4 |" in (out / "report" / "report.md").read_text()
