"""``ssgd-dist``: train, quickstart and report.

User mistakes (bad config values, missing data, impossible launch settings) exit with code 2 and one
line naming the input and the fix; a non-finite loss under ``on_nonfinite: stop`` exits with 3.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, load_config

EXIT_CONFIG = 2
EXIT_NONFINITE = 3


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _default_run_dir(config: str, method: str, seed: int) -> Path:
    return Path("runs") / f"{Path(config).stem}-{method}-s{seed}"


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(args.config, cfg.method, cfg.seed)
    summary = train(cfg, run_dir)
    if _is_rank0():
        acc = summary.get("test_acc")
        print(f"ssgd-dist: done at step {summary['step']}: test_acc={acc:.4f} run_dir={run_dir}" if acc is not None else f"ssgd-dist: done: {summary}")
    return 0


def run_torchrun(nproc: int, train_args: list[str], env: dict[str, str] | None = None) -> int:
    """Launch ``ssgd-dist train`` on ``nproc`` local workers through torchrun (a real process group)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "ssgd_dist.cli", "train", *train_args,
    ]  # fmt: skip
    return subprocess.run(cmd, env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}).returncode


def cmd_quickstart(args: argparse.Namespace) -> int:
    """SGD vs S-SGD at batch 2000 on MNIST-1D, 2 CPU workers each, then a table and a report."""
    from .report import comparison_table, summarize_run, write_report

    base = Path(args.run_dir)
    load_config("quickstart", args.set)  # fail fast, before launching workers
    runs = []
    for method in ("sgd", "ssgd"):
        run_dir = base / method
        print(f"== {method}: {args.workers} workers, run dir {run_dir}", flush=True)
        rc = run_torchrun(args.workers, ["--config", "quickstart", "--set", f"method={method}", *sum((["--set", s] for s in args.set), []), "--run-dir", str(run_dir)])
        if rc != 0:
            print(f"ssgd-dist: the {method} run failed with exit code {rc}", file=sys.stderr)
            return rc
        runs.append(run_dir)
    report = write_report(runs, base / "report")
    print()
    print(comparison_table([summarize_run(r) for r in runs]))
    print(f"\nreport: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    missing = [d for d in args.runs if not (Path(d) / "config.yaml").is_file()]
    if missing:
        raise ConfigError(f"report: {missing[0]} is not a run directory (no config.yaml)")
    print(write_report([Path(d) for d in args.runs], Path(args.out)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssgd-dist", description="Distributed large-batch training with S-SGD")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run (DDP under torchrun when WORLD_SIZE > 1)")
    p.add_argument("--config", required=True, help="packaged config name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--run-dir", help="run directory (default runs/<config>-<method>-s<seed>); reused to resume")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quickstart", help="SGD vs S-SGD at a large batch on MNIST-1D, 2 CPU workers")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("report", help="comparison table and plots from run directories")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .backends import NonFiniteError

    try:
        return args.func(args)
    except ConfigError as exc:
        if _is_rank0():
            print(f"ssgd-dist: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteError as exc:
        if _is_rank0():
            print(f"ssgd-dist: stopped: {exc}; set train.on_nonfinite=skip to skip such steps, or lower optim.lr", file=sys.stderr)
        return EXIT_NONFINITE


if __name__ == "__main__":
    sys.exit(main())
