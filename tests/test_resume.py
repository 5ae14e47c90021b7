"""A run killed mid-way and started again ends bit-for-bit where the uninterrupted run ends."""

import torch

from tests.conftest import TINY, final_params, run_cli, run_torchrun

ARGS = ["train", "--config", "quickstart", *TINY, "--set", "train.epochs=2", "--set", "train.checkpoint_every=3"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_killed_single_process_run_resumes_exactly(tmp_path):
    full = run_cli(*ARGS, "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    crashed = run_cli(*ARGS, "--set", "train.crash_at_step=8", "--run-dir", str(tmp_path / "resumed"))
    assert crashed.returncode == -9  # SIGKILLed itself after the step-6 checkpoint
    assert torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["step"] == 6
    resumed = run_cli(*ARGS, "--set", "train.crash_at_step=8", "--run-dir", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(final_params(tmp_path / "full"), final_params(tmp_path / "resumed"))
    steps = [line for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 16  # metrics past the checkpoint were dropped, not duplicated


def test_killed_two_rank_run_resumes_exactly(tmp_path):
    full = run_torchrun(2, *ARGS, "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    crashed = run_torchrun(2, *ARGS, "--set", "train.crash_at_step=5", "--run-dir", str(tmp_path / "resumed"))
    assert crashed.returncode != 0
    resumed = run_torchrun(2, *ARGS, "--set", "train.crash_at_step=5", "--run-dir", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(final_params(tmp_path / "full"), final_params(tmp_path / "resumed"))
