"""Shared fixtures: a per-session data cache, helpers to run the real CLI, and ``require``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ssgd_dist.launchers.torchrun import torchrun_command

REPO = Path(__file__).resolve().parents[1]

# How to install what some tests need (the messages of ``require``).
INSTALL = {
    "ray": "pip install -e '.[ray]'",
    "deepspeed": "pip install -e '.[deepspeed]'",
    "k8s": "pip install -e '.[k8s]'",
    "kubectl": "kubectl 1.32 or newer, https://kubernetes.io/docs/tasks/tools/ (tests run `kubectl kustomize` only)",
}
# Markers whose tests need a module: such a test runs only where ``require`` finds it.
MARKER_NEEDS = {"ray": "ray", "deepspeed": "deepspeed"}


def in_ci() -> bool:
    """``CI=true`` (set by ``.ci/run`` and by CI services): a missing requirement fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(*, module: str | None = None, tool: str | None = None, install: str):
    """The one gate for tests that need an optional module or an external tool.

    ``require(module="ray", install="pip install -e '.[ray]'")`` checks that the module is
    installed (without importing it: the caller imports what it uses); ``require(tool="kubectl",
    install=...)`` returns the executable's path (looked up beside the interpreter first, where a
    virtual environment puts its scripts, then on ``PATH``). When it is missing the test is skipped
    with a message saying what to install, except under ``CI=true``, where it fails: a suite that
    silently skips what it cannot run must not pass in CI.
    """
    if (module is None) == (tool is None):
        raise TypeError("require() takes exactly one of module= or tool=")
    if module is not None:
        if importlib.util.find_spec(module) is not None:
            return None
        what = f"the Python module {module!r} is not installed"
    else:
        beside = Path(sys.executable).with_name(tool)
        found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(tool)
        if found:
            return found
        what = f"{tool} is not on PATH"
    if in_ci():
        pytest.fail(f"{what} and CI=true, where tests that need it must run, not skip; install it: {install}")
    pytest.skip(f"{what}; install it to run this test: {install}")


def pytest_runtest_setup(item):
    for marker, module in MARKER_NEEDS.items():
        if item.get_closest_marker(marker) is not None:
            require(module=module, install=INSTALL[module])


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Generated data sets (MNIST-1D) are cached once per test session, never in the user's home."""
    cache = os.environ.get("SSGD_TEST_CACHE") or str(tmp_path_factory.mktemp("data-cache"))
    os.environ["SSGD_CACHE_DIR"] = cache
    return Path(cache)


def sets(*assignments: str) -> list[str]:
    """``--set`` flags for the CLI: ``sets("a=1", "b=2")`` is ``["--set", "a=1", "--set", "b=2"]``."""
    return [arg for assignment in assignments for arg in ("--set", assignment)]


# A run small enough for a test: a 40-32-32-10 MLP on 2000 generated examples, batch 200.
TINY = sets(
    "data.num_samples=2000",
    "data.batch_size=200",
    "model.hidden=[32,32]",
    "train.progress=false",
    "train.num_threads=1",
)


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssgd_dist.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_torchrun(nproc: int, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The product's own torchrun command, with its output captured."""
    return subprocess.run(
        torchrun_command(nproc, list(args)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def final_params(run_dir: Path) -> dict:
    import torch

    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray head per test session: 2 CPUs, free ports, token auth, always stopped.

    ``ray_cluster.env`` is a client environment holding the token; ``ray_cluster.submit([...])``
    runs ``ray job submit --working-dir <repo>`` and waits. Shared by the Ray and Kubernetes tests.
    """
    require(module="ray", install=INSTALL["ray"])
    from tests.ray_cluster import start_cluster

    cluster = start_cluster(num_cpus=2, log_dir=tmp_path_factory.mktemp("ray-head"))
    try:
        yield cluster
    finally:
        cluster.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_per_world_size(worker, world_sizes, variants_for, steps: int, tmp_path_factory, prefix: str) -> dict:
    """One gloo process group per world size running ``worker(rank, world_size, port, out, variants, steps)``
    over all of ``variants_for(world_size)``; rank 0's saved results, by world size."""
    import torch
    import torch.multiprocessing as mp

    results = {}
    for world_size in world_sizes:
        out = tmp_path_factory.mktemp(f"{prefix}{world_size}") / "results.pt"
        args = (world_size, free_port(), str(out), variants_for(world_size), steps)
        mp.spawn(worker, args=args, nprocs=world_size, join=True)
        results[world_size] = torch.load(out, weights_only=True)
    return results
