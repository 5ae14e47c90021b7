"""A real, token-authenticated Ray cluster for tests (no mocks): a head, plus nodes on this machine.

Used by ``tests/ray/conftest.py`` and reusable by any other test (e.g. the Kubernetes RayJob
entrypoint tests)::

    from tests.ray_cluster import start_cluster
    cluster = start_cluster(num_cpus=2)
    try:
        proc = cluster.submit(["python", "launch/ray_job.py", ...], working_dir=REPO)
    finally:
        cluster.stop()

``cluster.add_node(num_cpus=1)`` starts a second raylet on this machine that joins the head (a
multi-node cluster, e.g. to lose a node mid-run with ``node.stop()``).

Why not ``ray start`` + ``ray stop --force``: ``ray stop`` kills every Ray process of this user on
the machine by name, including other people's clusters. Here the head runs under ``ray start
--block`` in its own session; stopping it shuts the node down, and whatever survives is killed by
PID: processes that are descendants of the head or that name this cluster's private temp dir on
their command line. Every port is chosen free, and the temp dir is private, so several clusters
(and other Ray users) can share one machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def ray_cli() -> str:
    """The ``ray`` executable of the interpreter running the tests (the venv's, not another)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now (bound together, so never the same one twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def scrubbed_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without any Ray address or auth setting."""
    env = dict(os.environ if base is None else base)
    for var in (*RAY_AUTH_VARS, "RAY_ADDRESS"):
        env.pop(var, None)
    return env


@dataclass
class RayCluster:
    """A running head node. ``env`` is a complete client environment holding the token."""

    gcs_address: str  # host:port, for ``ray.init(address=...)`` and ``ray start --address``
    dashboard_url: str  # http://127.0.0.1:PORT, for ``ray job submit --address``
    token: str
    temp_dir: Path
    log_path: Path
    env: dict[str, str] = field(repr=False)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    nodes: list[RayNode] = field(default_factory=list, repr=False)

    # -- clients -----------------------------------------------------------------------------------
    def client_env(self, token: bool = True, home: str | Path | None = None) -> dict[str, str]:
        """Environment for a client process. ``token=False`` gives one without any token (and with
        ``home`` as HOME, so a token in ``~/.ray/auth_token`` is not picked up either)."""
        if token:
            return dict(self.env)
        env = scrubbed_env(self.env)
        if home is not None:
            env["HOME"] = str(home)
        return env

    def submit(
        self,
        entrypoint: list[str],
        working_dir: str | Path = REPO,
        submit_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        """``ray job submit --address URL --working-dir DIR [ARGS] -- ENTRYPOINT``; waits for the job.

        ``ray job submit`` exits 0 only if the job SUCCEEDED; its output holds the job's logs.
        """
        cmd = [
            ray_cli(),
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--working-dir",
            str(working_dir),
            *(submit_args or []),
            "--",
            *entrypoint,
        ]
        return subprocess.run(
            cmd, env=self.env if env is None else env, capture_output=True, text=True, timeout=timeout, cwd=working_dir
        )

    def api_get(self, path: str, token: str | None = None, timeout: float = 5) -> tuple[int, str]:
        """GET on the dashboard's REST API with ``Authorization: Bearer`` (``token=""``: none)."""
        req = urllib.request.Request(self.dashboard_url + path)
        tok = self.token if token is None else token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- lifecycle ---------------------------------------------------------------------------------
    def add_node(self, num_cpus: int = 1, timeout: float = 120) -> RayNode:
        """Start another raylet on this machine (free ports, the cluster's token) and wait until the head
        lists it as alive; ``node.stop()`` takes it away again, as a lost machine would."""
        (node_mgr, obj_mgr, agent_http, agent_grpc, runtime_env, metrics) = free_ports(6)
        cmd = [
            ray_cli(),
            "start",
            f"--address={self.gcs_address}",
            "--block",
            "--disable-usage-stats",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--node-ip-address=127.0.0.1",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--object-store-memory=100000000",
        ]
        log_path = self.log_path.with_name(f"ray-node-{len(self.nodes) + 1}.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = RayNode(proc, log_path)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout
        while node_mgr not in self.alive_node_ports():
            if proc.poll() is not None or time.monotonic() > deadline:
                node.stop()
                raise RuntimeError(f"the node did not join within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        return node

    def alive_node_ports(self) -> set[int]:
        """The node-manager ports of the nodes the head's REST API lists as alive (one per raylet)."""
        status, body = self.api_get("/nodes?view=summary")
        nodes = json.loads(body).get("data", {}).get("summary", []) if status == 200 else []
        return {n["raylet"]["nodeManagerPort"] for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"}

    def stop(self, grace: float = 8) -> None:
        """Stop the added nodes, then shut the head down (SIGTERM to ``ray start --block``) and SIGKILL
        leftovers by PID."""
        for node in self.nodes:
            node.stop(grace)
        stop_processes(self.proc, str(self.temp_dir), grace)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class RayNode:
    """A raylet added to a cluster (``RayCluster.add_node``)."""

    proc: subprocess.Popen = field(repr=False)
    log_path: Path

    def stop(self, grace: float = 8) -> None:
        """SIGTERM to its ``ray start --block`` (the node leaves the cluster), then SIGKILL what is left."""
        stop_processes(self.proc, None, grace)


def processes(proc: subprocess.Popen | None, marker: str | None) -> list:
    """Live processes: ``proc`` and its descendants, and anything naming ``marker`` on its command line."""
    import psutil

    found = {}
    if proc is not None:
        try:
            root = psutil.Process(proc.pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    if marker is not None:
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != os.getpid() and any(marker in arg for arg in (p.info["cmdline"] or [])):
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return list(found.values())


def stop_processes(proc: subprocess.Popen | None, marker: str | None, grace: float) -> None:
    """SIGTERM to ``proc`` (a ``ray start --block``: it shuts its node down), then SIGKILL by PID whatever
    of it (descendants, and processes naming ``marker``) is left."""
    import psutil

    procs = processes(proc, marker)
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    procs = {p.pid: p for p in procs + processes(proc, marker)}.values()
    for p in procs:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(list(procs), timeout=5)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def start_cluster(
    num_cpus: int = 2,
    num_gpus: int = 0,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    log_dir: str | Path | None = None,
) -> RayCluster:
    """Start a local head with token auth on free ports; returns once the job API answers.

    ``env``: the environment the head (and so every Ray worker and job driver) runs with; default
    this process's, minus any Ray address/auth settings (a fresh token is generated). The cluster
    is stopped again if it does not come up.
    """
    token = secrets.token_hex(32)
    # Short path: Ray puts unix sockets under it (limit ~107 characters).
    temp_dir = Path(tempfile.mkdtemp(prefix="ssgd-ray-", dir="/tmp"))
    base = scrubbed_env(env)
    base.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    # Ray workers must use the same interpreter as the tests (the venv).
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    (gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr) = free_ports(9)
    cmd = [
        ray_cli(),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=200000000",
    ]
    log_path = Path(log_dir or temp_dir) / "ray-start.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=base, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = RayCluster(
        gcs_address=f"127.0.0.1:{gcs}",
        dashboard_url=f"http://127.0.0.1:{dash}",
        token=token,
        temp_dir=temp_dir,
        log_path=log_path,
        env={**base, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"},
        proc=proc,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{cluster.log_tail()}")
            try:
                status, body = cluster.api_get("/api/jobs/")
                if status == 200:
                    json.loads(body)
                    return cluster
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not answer within {timeout:.0f} s:\n{cluster.log_tail()}")
            time.sleep(1)
    except BaseException:
        cluster.stop()
        raise


def sweep_on_ray_command(grid: Path, out: Path, *options: str) -> list[str]:
    """``ssgd-dist sweep GRID --out OUT --ray auto OPTIONS``, as a subprocess's argv."""
    return [sys.executable, "-m", "ssgd_dist.cli", "sweep", str(grid), "--out", str(out), "--ray", "auto", *options]


def sweep_env(cluster) -> dict[str, str]:
    """The environment of a sweep driver that joins ``cluster`` (``--ray auto``)."""
    return {**cluster.env, "RAY_ADDRESS": cluster.gcs_address, "OMP_NUM_THREADS": "1"}
