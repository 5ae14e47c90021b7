"""Run the cpu-smoke pods' exact commands as two local processes ("pods") and check they train.

Taken from the rendered Job: command, args and env. Changed, as a cluster would change them: the
kubelet expands $(VAR) from the env plus JOB_COMPLETION_INDEX; pod 0's DNS name becomes
127.0.0.1 (with a free port, since this machine is shared); the ConfigMap and the volume become
temporary directories. Both pods share the data cache; each has its own run directory.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import k8s_checks as kc
import yaml

from tests.conftest import run_cli

# Set by torchrun or a parent job; the "pods" must see only what their manifest gives them.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_path(path: str, tmp: Path, pod: Path) -> str:
    """Where a container path lives in this test: the config and cache shared, runs and /tmp per pod."""
    for prefix, target in (
        ("/etc/ssgd/", tmp / "etc"),
        ("/data/runs/", pod / "runs"),
        ("/data/", tmp / "data"),
        ("/tmp", pod / "tmp"),
    ):
        if path == prefix.rstrip("/") or path.startswith(prefix):
            return str(target / path[len(prefix) :].lstrip("/"))
    return path


def test_cpu_smoke_pods_train_together(rendered, tmp_path):
    objs = rendered["cpu-smoke"]
    job = next(o for o in objs if o["kind"] == "Job")
    svc = next(o for o in objs if o["kind"] == "Service")
    config = next(o for o in objs if o["kind"] == "ConfigMap")["data"]["config.yaml"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    pods = job["spec"]["completions"]
    assert container["command"] == ["torchrun"]

    # The ConfigMap as mounted, with its /data paths moved into tmp (yaml keeps it a mapping).
    (tmp_path / "etc").mkdir()
    cfg = yaml.safe_load(config)
    for key, value in cfg.get("data", {}).items():
        if isinstance(value, str):
            cfg["data"][key] = local_path(value, tmp_path, tmp_path)
    (tmp_path / "etc" / "config.yaml").write_text(yaml.safe_dump(cfg))

    master = f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    port = str(free_port())
    procs = []
    for index in range(pods):
        pod = tmp_path / f"pod{index}"
        (pod / "tmp").mkdir(parents=True)
        env = {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}
        env["JOB_COMPLETION_INDEX"] = str(index)  # what the Job controller adds for Indexed Jobs
        args = [expand(a, env) for a in container["args"]]
        args = [a.replace(master, "127.0.0.1") for a in args]
        args = [re.sub(r"^--master-port=\d+$", f"--master-port={port}", a) for a in args]
        args = [local_path(a, tmp_path, pod) for a in args]
        proc_env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
        proc_env.update({k: local_path(v, tmp_path, pod) for k, v in env.items()})
        proc_env["PYTHONPATH"] = os.pathsep.join([str(kc.REPO), os.environ.get("PYTHONPATH", "")])
        log = open(pod / "log.txt", "w")
        procs.append(
            (
                pod,
                log,
                subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", *args],  # = the image's `torchrun`
                    cwd=pod,
                    env=proc_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
            )
        )
    try:
        for pod, log, proc in procs:
            rc = proc.wait(timeout=180)
            log.close()
            assert rc == 0, f"{pod.name} exited {rc}:\n{(pod / 'log.txt').read_text()[-4000:]}"
    finally:
        for _, log, proc in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()

    import torch

    run_name = expand("$(RUN_NAME)", env)
    run_dirs = [pod / "runs" / run_name for pod, _, _ in procs]
    rank0 = run_dirs[0]
    assert (rank0 / "config.yaml").is_file() and (rank0 / "metrics.jsonl").is_file()
    # Only rank 0 writes a run directory's files; the other pods' directories stay empty.
    assert [d for d in run_dirs[1:] if (d / "checkpoints").exists()] == []
    state = torch.load(rank0 / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == pods * int(env["NPROC_PER_NODE"])
    assert state["step"] == cfg["train"]["max_steps"]

    # The pods trained as one data-parallel job: the same as one process with the whole batch. (That
    # the replicas stay bitwise identical meanwhile is tests/test_distributed.py's job: only rank 0 writes.)
    alone = run_cli("train", "--config", str(tmp_path / "etc" / "config.yaml"), "--run-dir", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    reference = torch.load(tmp_path / "alone" / "checkpoints" / "last.pt", weights_only=True)
    assert reference["step"] == state["step"] and reference["world_size"] == 1
    assert state["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-5, atol=1e-5, msg=name)
