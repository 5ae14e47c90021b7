"""``backend: fsdp`` through ``ray job submit``: Ray's workers shard the model as torchrun's do, write
sharded checkpoints that Ray's own checkpoints hold, and a worker group restarted after a crash resumes
from one."""

from __future__ import annotations

import pytest

from ssgd_dist.config import load_config
from ssgd_dist.launchers.ray import RunLocation, checkpoint_format_for
from tests.conftest import run_torchrun, sets
from tests.ray.test_ray_job import TINY, WORKERS, assert_same_params, job_output, submit_job

pytestmark = pytest.mark.ray


def test_a_sharded_job_on_ray_resumes_from_a_sharded_checkpoint_and_ends_where_torchrun_ends(ray_cluster, tmp_path):
    reference = tmp_path / "ddp"
    proc = run_torchrun(WORKERS, "train", *TINY, "--run-dir", str(reference))
    assert proc.returncode == 0, job_output(proc)
    storage = tmp_path / "storage"
    proc = submit_job(
        ray_cluster,
        *TINY,
        *sets("backend=fsdp", "train.crash_at_step=3"),
        "--max-failures",
        "1",
        "--storage-path",
        str(storage),
        "--name",
        "fsdp",
    )
    assert proc.returncode == 0, job_output(proc)
    assert "resumed from" in proc.stdout and "step-00000002.dcp at step 2/6" in proc.stdout, job_output(proc)
    # Ray's checkpoint of step 4 is a small run directory holding the sharded checkpoint
    assert (storage / "fsdp" / "checkpoint-step-00000004" / "checkpoints" / "last.dcp" / "meta.pt").is_file()
    assert_same_params(storage / "fsdp", reference, tol=1e-5)


def test_local_run_directories_get_plain_checkpoints(capsys):
    """Mirrored runs write each node's own disk: a sharded checkpoint would lack the other nodes' shards."""
    cfg = load_config("quickstart", ["backend=fsdp"])
    mirrored = RunLocation("run", "s3://bucket/runs", "/tmp/ssgd-dist/run", mirror=True)
    assert checkpoint_format_for(cfg, mirrored, announce=True).fsdp.checkpoint == "full"
    assert "fsdp.checkpoint=full" in capsys.readouterr().out
    shared = RunLocation("run", "/shared/runs", "/shared/runs/run")
    assert checkpoint_format_for(cfg, shared).fsdp.checkpoint == "sharded"
    assert cfg.fsdp.checkpoint == "sharded"  # the caller's config is left as it was
