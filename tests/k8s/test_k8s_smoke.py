"""Run the cpu-smoke pods' exact commands as two local processes ("pods"), twice: the whole job is lost
after its first checkpoint (every pod killed, as when the Job is deleted or its pods' node goes down)
and applied again, and the second job resumes from the run directory on the shared volume.

Taken from the rendered Job: command, args and env, changed only as ``pods.py`` says. The run is
longer than the overlay's 20 steps (the mounted config's ``train.max_steps`` and ``epochs``) so that
the loss falls mid-run: the test must not pass because the first job happened to finish.
"""

from __future__ import annotations

import torch
from pods import mount_config, pod_command

from tests.conftest import free_port, run_cli
from tests.nodes import checkpoint, listening, start, stop_all, wait_until

STEPS = 200


def start_pods(container, pods, tmp_path, rdzv_host, log_name):
    """Pod 0 first (its torchrun hosts the rendezvous store), then the others once it listens."""
    port, procs = free_port(), []
    for index in range(pods):
        pod = tmp_path / f"pod{index}"
        argv, env = pod_command(container, tmp_path, pod, rdzv_host, port, {"JOB_COMPLETION_INDEX": str(index)})
        procs.append(start(argv, pod / f"{log_name}.txt", pod, env))
        if index == 0:
            wait_until(lambda: listening(port), 60, procs, "rendezvous store")
    return procs


def test_cpu_smoke_pods_train_together_and_a_reapplied_job_resumes(rendered, tmp_path):
    import yaml

    objs = rendered["cpu-smoke"]
    job = next(o for o in objs if o["kind"] == "Job")
    svc = next(o for o in objs if o["kind"] == "Service")
    container = job["spec"]["template"]["spec"]["containers"][0]
    pods = job["spec"]["completions"]
    cfg = yaml.safe_load(next(o for o in objs if o["kind"] == "ConfigMap")["data"]["config.yaml"])
    cfg["train"].update(max_steps=STEPS, epochs=10)  # the overlay's one epoch is 31 steps
    config = mount_config(cfg, tmp_path)
    rdzv_host = f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
    run_dir = tmp_path / "data" / "runs" / env["RUN_NAME"]

    first = start_pods(container, pods, tmp_path, rdzv_host, "first")
    try:
        wait_until((run_dir / "checkpoints" / "last.pt").is_file, 200, first, "first checkpoint")
        lost = checkpoint(run_dir)
    finally:
        stop_all(first)  # the whole job is gone: every pod SIGKILLed with its workers
    assert lost["step"] < STEPS, "the first job finished before it was lost"

    second = start_pods(container, pods, tmp_path, rdzv_host, "second")
    try:
        codes = [p.wait(timeout=200) for p in second]
    finally:
        stop_all(second)
    logs = [(tmp_path / f"pod{i}" / "second.txt").read_text(errors="replace") for i in range(pods)]
    assert codes == [0] * pods, "\n".join(log[-3000:] for log in logs)
    assert any(f"resumed from {run_dir}/checkpoints/" in log for log in logs)
    state = checkpoint(run_dir)
    assert state["world_size"] == pods * int(env["NPROC_PER_NODE"])
    assert state["step"] == STEPS

    # The pods trained as one data-parallel job, across the loss: the same as one process with the whole
    # batch, uninterrupted. (That the replicas stay bitwise identical is tests/test_distributed.py's job.)
    alone = run_cli("train", "--config", str(config), "--run-dir", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    reference = checkpoint(tmp_path / "alone")
    assert reference["step"] == state["step"] and reference["world_size"] == 1
    assert state["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    assert max((state["model"][n] - lost["model"][n]).abs().max().item() for n in state["model"]) > 1e-2
