"""Shared fixtures: a per-session data cache and helpers to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssgd_dist.launchers.torchrun import torchrun_command

REPO = Path(__file__).resolve().parents[1]


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
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]'): the Ray tests need a real local cluster")
    from tests.ray_cluster import start_cluster

    cluster = start_cluster(num_cpus=2, log_dir=tmp_path_factory.mktemp("ray-head"))
    try:
        yield cluster
    finally:
        cluster.stop()
