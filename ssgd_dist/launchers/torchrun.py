"""Relaunch an ``ssgd-dist`` command on N local ranks through torchrun (a real process group)."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_command(nproc: int, cli_args: list[str]) -> list[str]:
    """``ssgd-dist CLI_ARGS`` on ``nproc`` local workers (``--standalone``: a rendezvous of its own)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "ssgd_dist.cli", *cli_args,
    ]  # fmt: skip


def run_torchrun(nproc: int, cli_args: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``torchrun_command`` with one thread per rank (ranks share the cores); returns the exit code."""
    return subprocess.run(
        torchrun_command(nproc, cli_args), env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    ).returncode
