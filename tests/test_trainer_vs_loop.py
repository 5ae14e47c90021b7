"""``bench/trainer_vs_loop.py`` runs, reports ``ratio_trainer_vs_loop``, and its two sides do the same work
(no timing is asserted: a shared machine cannot hold a ratio to a few percent)."""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_trainer_vs_loop_reports_the_ratio_of_two_sides_that_end_on_the_same_weights(tmp_path):
    out = tmp_path / "vs-loop.json"
    cmd = [sys.executable, str(REPO / "bench" / "trainer_vs_loop.py"), "--rounds", "2", "--steps", "6"]
    result = subprocess.run(
        [*cmd, "--warmup", "2", "--set", "train.progress=false", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    ratio = report["ratio_trainer_vs_loop"]
    assert math.isfinite(ratio) and ratio > 0 and len(report["rounds"]) == 2
    assert "ratio_trainer_vs_loop" in result.stdout
    # Same initial weights, batches, LR schedule, noise and S-SGD step: the same parameters at the end.
    assert report["max_param_diff"] < 1e-5
