"""The elastic PyTorchJob's pod command as two local processes ("pods"), one of them lost mid-run.

Changed as ``pods.py`` says, and as this machine needs: the mounted config is a tiny CPU run (the
overlay's is CIFAR-10 on GPUs) and each pod runs one process (there are no GPUs here). Worker 0 hosts
the rendezvous (the operator points every pod at ``<job>-worker-0``); worker 1 is killed, agent and
worker, after the first checkpoint, and worker 0 re-forms the group alone and finishes the run.
"""

from __future__ import annotations

import copy

import pytest
from pods import mount_config, pod_command

from tests.conftest import free_port
from tests.nodes import checkpoint, kill_node, listening, start, stop_all, wait_until

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

STEPS = 400
CONFIG = {
    "method": "ssgd",
    "device": "cpu",
    "model": {"name": "mlp", "hidden": [32, 32]},
    "data": {"name": "mnist1d", "num_samples": 2000, "batch_size": 200},
    "optim": {"lr": 0.1},
    "train": {"max_steps": STEPS, "epochs": 1000, "checkpoint_every": 50, "progress": False, "num_threads": 1},
}


def test_elastic_pytorchjob_pods_survive_losing_one(rendered, tmp_path):
    job = next(o for o in rendered["pytorchjob"] if o["kind"] == "PyTorchJob")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    container = worker["template"]["spec"]["containers"][0]
    mount_config(copy.deepcopy(CONFIG), tmp_path)
    one_process = ["--nproc-per-node=1" if a.startswith("--nproc-per-node=") else a for a in container["args"]]
    container = {**container, "args": one_process}
    run_name = next(v["value"] for v in container["env"] if v["name"] == "RUN_NAME")
    run_dir = tmp_path / "data" / "runs" / run_name
    port, pods = free_port(), []
    try:
        for index in range(worker["replicas"]):
            pod = tmp_path / f"worker{index}"
            argv, env = pod_command(container, tmp_path, pod, f"{job['metadata']['name']}-worker-0", port)
            pods.append(start(argv, pod / "log.txt", pod, env))
            if index == 0:
                wait_until(lambda: listening(port), 60, pods, "rendezvous store")
        wait_until((run_dir / "checkpoints" / "last.pt").is_file, 200, pods, "first checkpoint")
        assert checkpoint(run_dir)["world_size"] == 2
        kill_node(pods[1])
        assert pods[0].wait(timeout=200) == 0, (tmp_path / "worker0" / "log.txt").read_text()[-5000:]
    finally:
        stop_all(pods)
    final = checkpoint(run_dir)
    assert (final["step"], final["world_size"]) == (STEPS, 1)
    assert "resumed from" in (tmp_path / "worker0" / "log.txt").read_text()
