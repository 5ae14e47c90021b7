"""``backend: fsdp`` through ``ray job submit``: Ray's workers shard the model as torchrun's do, and a
worker group restarted after a crash resumes from a sharded checkpoint held by Ray."""

from __future__ import annotations

import pytest

from tests.conftest import run_torchrun, sets
from tests.ray.test_ray_job import TINY, WORKERS, assert_same_params, job_output, submit_job

pytestmark = pytest.mark.ray


def test_a_sharded_job_on_ray_resumes_from_rays_sharded_checkpoint_and_ends_where_torchrun_ends(ray_cluster, tmp_path):
    reference = tmp_path / "ddp"
    proc = run_torchrun(WORKERS, "train", *TINY, "--run-dir", str(reference))
    assert proc.returncode == 0, job_output(proc)
    storage = tmp_path / "storage"
    # A local working directory, cleared on restart: the resume must come from Ray's checkpoint.
    proc = submit_job(
        ray_cluster,
        *TINY,
        *sets("backend=fsdp", "train.crash_at_step=3"),
        "--max-failures",
        "1",
        "--local-dir",
        str(tmp_path / "local"),
        "--storage-path",
        str(storage),
        "--name",
        "fsdp",
    )
    assert proc.returncode == 0, job_output(proc)
    assert "resumed from" in proc.stdout and "last.dcp at step 2/6" in proc.stdout, job_output(proc)
    assert (storage / "fsdp" / "checkpoint-step-00000004" / "checkpoints" / "last.dcp" / "meta.pt").is_file()
    assert_same_params(storage / "fsdp", reference, tol=1e-5)
