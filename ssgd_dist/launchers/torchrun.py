"""Relaunch an ``ssgd-dist`` command on N local ranks through torchrun (a real process group)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_torchrun(nproc: int, cli_args: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``ssgd-dist CLI_ARGS`` on ``nproc`` local workers (``--standalone``); returns the exit code.

    One thread per rank unless the caller's ``env`` says otherwise: ranks share the machine's cores.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ssgd_dist.cli",
        *cli_args,
    ]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}).returncode
