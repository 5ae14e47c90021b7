"""Local stand-ins for the nodes of an elastic torchrun job: real agents, each in a session of its own.

A node is lost by killing its torchrun agent together with every process under it: torchrun starts each
worker in a new session (``start_new_session``), so killing the agent's process group would leave the
workers running, which a lost machine never does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Rendezvous settings for tests, short so that a hang fails fast and a re-formation costs seconds:
# join_timeout=60 bounds every (re)rendezvous; last_call_timeout=10 is how long a group that has its
# minimum waits for more nodes: long enough for a second agent (started once the first one's store
# listens) to join the first round on a loaded 2-core machine, and the delay of every re-formation;
# keep_alive_interval=2 x keep_alive_max_attempt=3 declares a killed node dead after 6 s instead of the
# default 15 s; read_timeout=60 bounds each store operation.
RDZV_CONF = "join_timeout=60,last_call_timeout=10,keep_alive_interval=2,keep_alive_max_attempt=3,read_timeout=60"

# Set by torchrun or a parent job; a "node" must see only what its own command gives it.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def listening(port: int) -> bool:
    """Whether something (a rendezvous store) accepts connections on 127.0.0.1:PORT."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start(cmd: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """One node: ``cmd`` (a torchrun agent) with its output in ``log``, one thread per rank."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
        )


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process ended meanwhile
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def kill_node(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the agent and all its descendants (found first, so none is re-parented away); their pids."""
    tree, pids, todo = _children(), [], [proc.pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += tree.get(pid, [])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    return pids


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Whatever a failed test left running: every node, with its workers."""
    for proc in procs:
        if proc.poll() is None:
            kill_node(proc)


def wait_until(done: Callable[[], bool], timeout: float, procs: list[subprocess.Popen], what: str) -> None:
    """Poll ``done`` every 50 ms; fail if ``timeout`` passes or a node exits first."""
    deadline = time.monotonic() + timeout
    while not done():
        exited = [p.args for p in procs if p.poll() is not None]
        assert not exited, f"a node exited before {what}: {exited}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def checkpoint(run_dir: Path) -> dict | None:
    """The newest checkpoint's contents (written atomically, so never half a file), or None."""
    path = Path(run_dir) / "checkpoints" / "last.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None
