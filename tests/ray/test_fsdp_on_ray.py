"""``backend: fsdp`` through ``ray job submit``: Ray's workers shard the model as torchrun's do."""

from __future__ import annotations

import pytest

from tests.conftest import run_torchrun, sets
from tests.ray.test_ray_job import TINY, WORKERS, assert_same_params, job_output, submit_job

pytestmark = pytest.mark.ray


def test_a_sharded_job_on_ray_ends_where_unsharded_torchrun_ends(ray_cluster, tmp_path):
    reference = tmp_path / "ddp"
    proc = run_torchrun(WORKERS, "train", *TINY, "--run-dir", str(reference))
    assert proc.returncode == 0, job_output(proc)
    storage = tmp_path / "storage"
    proc = submit_job(ray_cluster, *TINY, *sets("backend=fsdp"), "--storage-path", str(storage), "--name", "fsdp")
    assert proc.returncode == 0, job_output(proc)
    assert_same_params(storage / "fsdp", reference, tol=1e-5)
