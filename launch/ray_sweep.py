"""Run an ssgd-dist grid on a Ray cluster: the entrypoint for ``ray job submit``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/ray_sweep.py mnist1d-large-batch --out /shared/runs/mnist1d-large-batch \\
        [--workers 2] [--use-gpu] [--max-concurrent 4] [--set key=value ...] [--seeds 0,1,2]

Every pending cell of the grid becomes one Ray Train ``TorchTrainer`` job with ``--workers`` DDP
workers; up to ``--max-concurrent`` run at once (default: the cluster's CPUs / workers). Each worker
runs ``ssgd_dist.train.train`` (the same loop and step as torchrun), reports its checkpoints to Ray,
and after training the same workers measure the run's flatness, each on a shard of the samples.
Finished runs are skipped, so re-submitting the same command resumes the grid. ``--out`` must be a
directory every node sees (NFS or similar); the report is written to ``OUT/report``.

This is ``ssgd-dist sweep GRID --ray auto ...`` with the cluster address taken from the job's
environment; every ``ssgd-dist sweep`` flag is accepted.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "ssgd_dist").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(1, str(_REPO))

from ssgd_dist.cli import main  # noqa: E402


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
