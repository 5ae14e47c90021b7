"""A real, token-authenticated, single-node Ray cluster for tests (no mocks).

Used by ``tests/ray/conftest.py`` and reusable by any other test (e.g. the Kubernetes RayJob
entrypoint tests)::

    from tests.ray_cluster import start_cluster
    cluster = start_cluster(num_cpus=2)
    try:
        proc = cluster.submit(["python", "launch/ray_job.py", ...], working_dir=REPO)
    finally:
        cluster.stop()

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
    def _our_processes(self):
        """Live processes of this cluster: the head's descendants and anything naming our temp dir."""
        import psutil

        found = {}
        if self.proc is not None:
            try:
                head = psutil.Process(self.proc.pid)
                found[head.pid] = head
                for child in head.children(recursive=True):
                    found[child.pid] = child
            except psutil.NoSuchProcess:
                pass
        marker = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != os.getpid() and any(marker in arg for arg in (p.info["cmdline"] or [])):
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def stop(self, grace: float = 8) -> None:
        """Shut the node down (SIGTERM to ``ray start --block``), then SIGKILL leftovers by PID."""
        import psutil

        procs = self._our_processes()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        procs = {p.pid: p for p in procs + self._our_processes()}.values()
        for p in procs:
            try:
                p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        psutil.wait_procs(list(procs), timeout=5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


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
