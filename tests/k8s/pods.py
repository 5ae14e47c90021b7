"""A rendered pod's container command as a local process: what the kubelet and the volumes would make of it.

Changed, as a cluster would change them: the kubelet expands $(VAR) from the container's env plus what
the controller adds (JOB_COMPLETION_INDEX for an Indexed Job); the rendezvous host's DNS name becomes
127.0.0.1 with a free port (this machine is shared); the ConfigMap and the shared volume become
temporary directories shared by every "pod" (the volume is ReadWriteMany: a re-formed group's rank 0
may be on another pod and must find the checkpoints); /tmp is each pod's own. The rendezvous timeouts
are shortened (``RDZV_CONF``) so that a hang fails a test fast instead of waiting 15 minutes.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import k8s_checks as kc
import yaml

from tests.nodes import RDZV_CONF


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def local_path(path: str, tmp: Path, pod: Path) -> str:
    """Where a container path lives here: the config and the volume shared, /tmp per pod."""
    for prefix, target in (("/etc/ssgd/", tmp / "etc"), ("/data/", tmp / "data"), ("/tmp", pod / "tmp")):
        if path == prefix.rstrip("/") or path.startswith(prefix):
            return str(target / path[len(prefix) :].lstrip("/"))
    return path


def mount_config(config: dict, tmp: Path) -> Path:
    """The ConfigMap as mounted at /etc/ssgd/config.yaml, with its /data paths moved into ``tmp``."""
    for key, value in config.get("data", {}).items():
        if isinstance(value, str):
            config["data"][key] = local_path(value, tmp, tmp)
    (tmp / "etc").mkdir(exist_ok=True)
    path = tmp / "etc" / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pod_command(
    container: dict, tmp: Path, pod: Path, rdzv_host: str, port: int, extra_env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the container's ``torchrun`` as this machine runs it (``python -m torch.distributed.run``)."""
    assert container["command"] == ["torchrun"]
    (pod / "tmp").mkdir(parents=True, exist_ok=True)
    env = {v["name"]: v["value"] for v in container.get("env", []) if "value" in v} | (extra_env or {})
    args = []
    for arg in container["args"]:
        arg = expand(arg, env)
        if arg.startswith("--rdzv-endpoint="):
            assert arg.split("=", 1)[1].rsplit(":", 1)[0] == rdzv_host, arg
            arg = f"--rdzv-endpoint=127.0.0.1:{port}"
        elif arg.startswith("--rdzv-conf="):
            arg = f"--rdzv-conf={RDZV_CONF}"
        args.append(local_path(arg, tmp, pod))
    proc_env = {k: local_path(v, tmp, pod) for k, v in env.items()}
    proc_env["PYTHONPATH"] = os.pathsep.join([str(kc.REPO), os.environ.get("PYTHONPATH", "")])
    return [sys.executable, "-m", "torch.distributed.run", *args], proc_env
