"""DeepSpeed inside Ray Train workers: ``ray job submit -- python launch/ray_job.py --set backend=deepspeed``.

A real token-authenticated local Ray head (``tests.ray_cluster``); the reference is a DDP run of the same
config under torchrun. Slow (a Ray head plus a job): ``-m "not slow"`` leaves it out.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY as BASE
from tests.conftest import run_torchrun, sets

# The deepspeed and ray markers make tests/conftest.py require both (a skip, or an error under CI=true).
pytestmark = [pytest.mark.deepspeed, pytest.mark.ray, pytest.mark.slow]

TINY = ["--config", "quickstart", *BASE, *sets("train.max_steps=4", "train.checkpoint_every=2")]


def test_ray_train_workers_run_the_deepspeed_backend(tmp_path):
    from tests.ray_cluster import start_cluster

    reference = tmp_path / "ddp"
    proc = run_torchrun(2, "train", *TINY, "--set", "backend=ddp", "--run-dir", str(reference))
    assert proc.returncode == 0, proc.stderr[-3000:]

    cluster = start_cluster(num_cpus=2, log_dir=tmp_path / "ray-head")
    try:
        storage = tmp_path / "storage"
        job = cluster.submit(
            [
                "python",
                "launch/ray_job.py",
                "--num-workers",
                "2",
                *TINY,
                "--set",
                "backend=deepspeed",
                "--set",
                "deepspeed.zero_stage=2",
                "--storage-path",
                str(storage),
                "--name",
                "ds",
            ],
            timeout=500,
        )
    finally:
        cluster.stop()
    assert job.returncode == 0, f"{job.stdout[-6000:]}\n{job.stderr[-3000:]}"
    got = torch.load(storage / "ds" / "checkpoints" / "last.pt", weights_only=True)
    want = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    assert got["step"] == 4
    worst = max(float((got["model"][k].double() - want["model"][k].double()).abs().max()) for k in want["model"])
    assert worst <= 1e-5
    # Ray's own checkpoint (a run directory) holds the same state
    assert (storage / "ds" / "checkpoint-step-00000004" / "checkpoints" / "last.pt").is_file()
