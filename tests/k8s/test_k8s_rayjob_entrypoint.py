"""The RayJob overlay's entrypoint, as KubeRay would submit it, against a real local Ray cluster.

Changed as the cluster would change it: the image's /app is this checkout, the mounted ConfigMap
is a tiny CPU config, /data/runs is a temporary directory, and there are no GPUs here.
"""

from __future__ import annotations

import shlex

import pytest
import torch
import yaml


@pytest.mark.ray
def test_rayjob_entrypoint_runs_on_a_token_auth_cluster(rendered, ray_cluster, tmp_path):
    rayjob = next(o for o in rendered["rayjob"] if o["kind"] == "RayJob")
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/app/launch/ray_job.py"]

    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "method": "ssgd",
                "device": "cpu",
                "model": {"name": "mlp", "hidden": [32, 32]},
                "data": {"name": "mnist1d", "num_samples": 2000, "batch_size": 200},
                "optim": {"lr": 0.5},
                "train": {"max_steps": 4, "progress": False, "num_threads": 1},
            }
        )
    )
    replace = {
        "/app/launch/ray_job.py": "launch/ray_job.py",
        "/etc/ssgd/config.yaml": str(config),
        "/data/runs": str(tmp_path / "runs"),
    }
    argv = [replace.get(a, a) for a in argv if a != "--use-gpu"]
    argv[argv.index("--num-workers") + 1] = "2"

    result = ray_cluster.submit(argv, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = argv[argv.index("--name") + 1]
    state = torch.load(tmp_path / "runs" / name / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 2
