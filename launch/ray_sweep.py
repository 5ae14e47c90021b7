"""Run an ssgd-dist grid on a Ray cluster: the entrypoint for ``ray job submit``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/ray_sweep.py mnist1d-large-batch --out /shared/runs/mnist1d-large-batch \\
        [--workers 2] [--use-gpu] [--max-concurrent 4] [--set key=value ...] [--seeds 0,1,2]

This is ``ssgd-dist sweep GRID --ray auto ...`` (every ``sweep`` flag is accepted) with the cluster
address taken from the job's environment: each pending cell becomes one Ray Tune trial, a Ray Train run
of ``--workers`` workers, which also measure its flatness. ``--out`` must be a directory every node
sees; re-submitting trains only the unfinished runs, and the report is written to ``OUT/report``.
"""

import sys
from pathlib import Path

from ssgd_dist.cli import main


def _out(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None


def build_argv(argv: list[str]) -> list[str]:
    """``sweep ARGS --ray auto`` unless the caller named an address."""
    if any(a in ("-h", "--help") for a in argv):
        return ["sweep", "--help"]
    out = _out(argv)
    if out is None or not Path(out).expanduser().is_absolute():
        raise SystemExit(
            f"launch/ray_sweep.py: --out {out or '(missing)'}: give an absolute directory that every node sees; "
            "a job's working directory is a temporary copy that is not kept"
        )
    if any(a == "--ray" or a.startswith("--ray=") for a in argv):
        return ["sweep", *argv]
    return ["sweep", *argv, "--ray", "auto"]


if __name__ == "__main__":
    sys.exit(main(build_argv(sys.argv[1:])))
