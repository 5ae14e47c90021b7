"""``ssgd-dist bench``: what S-SGD costs over SGD, measured in one run, and projected to many GPUs.

    ssgd-dist bench --model resnet20 --batch-size 256 --world-size 2 --device cpu --json bench.json
    ssgd-dist bench --model resnet20 --batch-size 1024 --world-size 1 --device cuda --precision bf16 --project

W ranks (gloo on CPU, NCCL on GPU) each build the same model once per variant and run the *product*
step (``Backend.train_step`` with the real methods and DDP backend); the variants' steps are
interleaved, so a slow moment of a shared machine hits them all alike. Per variant it reports the
median step time, the gradient bytes all-reduced per step (counted by a DDP comm hook), the peak
memory of the step, and the time spent drawing noise, perturbing and restoring. Two baselines make
the comparison fair: ``sgd`` and ``sgd-ga2`` (two half-size micro-batches, no noise: the same kernel
shapes as S-SGD ``halves``). ``ssgd-naive`` is S-SGD as a user writes it by hand: both passes
all-reduce.

``--project`` turns the measured compute time and gradient bytes into step times and scaling
efficiencies for 8 to 1024 GPUs under a ring all-reduce cost model. It is a model, labelled as such.

Modules: ``variants`` (what runs), ``harness`` (ranks and timing), ``memory``, ``projection``, ``table``.
Options: ``ssgd_dist.config.BenchOptions``.
"""

from __future__ import annotations

from ..config import BenchOptions
from .harness import run_bench
from .table import format_table

__all__ = ["main", "run_bench"]


def main(opts: BenchOptions) -> int:
    """Run the bench and print its table; the exit code of ``ssgd-dist bench``."""
    report = run_bench(opts)
    print(format_table(report))
    if opts.json_path:
        print(f"\njson: {opts.json_path}")
    return 0
