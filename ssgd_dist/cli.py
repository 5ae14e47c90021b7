"""``ssgd-dist``: train, quickstart, sweep, report, flatness and bench.

User mistakes (bad config values, missing data, impossible launch settings) exit with code 2 and one
line naming the input and the fix; a non-finite loss under ``on_nonfinite: stop`` exits with 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import load_config
from .errors import EXIT_CONFIG, EXIT_NONFINITE, ConfigError, NonFiniteError
from .launchers.torchrun import run_torchrun


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


def cmd_quickstart(args: argparse.Namespace) -> int:
    """SGD vs S-SGD at batch 2000 on MNIST-1D, 2 CPU workers each, then a table and a report."""
    from .report import comparison_table, summarize_run, write_report

    base = Path(args.run_dir)
    load_config("quickstart", args.set)  # fail fast, before launching workers
    runs = []
    for method in ("sgd", "ssgd"):
        run_dir = base / method
        print(f"== {method}: {args.workers} workers, run dir {run_dir}", flush=True)
        rc = run_torchrun(args.workers, ["train", "--config", "quickstart", "--set", f"method={method}", *sum((["--set", s] for s in args.set), []), "--run-dir", str(run_dir)])
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
    from .report import collect_run_dirs, write_report

    missing = [d for d in args.runs if not Path(d).is_dir()]
    if missing:
        raise ConfigError(f"report: {missing[0]} is not a directory (pass run directories or a sweep's output directory)")
    runs = collect_run_dirs(args.runs)
    if not runs:
        raise ConfigError(f"report: no run directory (with a config.yaml) in {', '.join(args.runs)}")
    print(write_report(runs, Path(args.out), title=args.title, radius=args.radius))
    return 0


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def cmd_sweep(args: argparse.Namespace) -> int:
    """A grid of runs, one after another here (or on Ray with --ray), then a report."""
    from .sweep import describe, load_grid, run_sweep

    grid = load_grid(args.grid, args.set, methods=args.methods, batch_sizes=args.batch_sizes, seeds=args.seeds)
    out = Path(args.out) if args.out else Path("runs") / grid.name
    if args.dry_run:
        print(describe(grid, out))
        return 0
    ray_kwargs = {}
    if args.ray:
        ray_kwargs = dict(max_concurrent=args.max_concurrent, use_gpu=args.use_gpu, storage_path=args.storage_path, max_failures=args.max_failures)
    statuses, report = run_sweep(grid, out, workers=args.workers, ray_address=args.ray, flatness=not args.no_flatness,
                                 report=not args.no_report, **ray_kwargs)  # fmt: skip
    bad = {name: status for name, status in statuses.items() if status not in ("done", "diverged")}
    done = sum(s == "done" for s in statuses.values())
    diverged = sum(s == "diverged" for s in statuses.values())
    print(f"sweep {grid.name}: {done} done, {diverged} diverged, {len(bad)} failed or not run" + (f"; report: {report}" if report else ""))
    if report is not None:
        from .report import collect_run_dirs, comparison_table, summarize_run

        print()
        print(comparison_table([summarize_run(d) for d in collect_run_dirs([out / c.name for c in grid.cells if statuses.get(c.name) in ("done", "diverged")])]))
    for name, status in bad.items():
        print(f"  {name}: {status}", file=sys.stderr)
    return 1 if bad else 0


def cmd_flatness(args: argparse.Namespace) -> int:
    """Sharpness and loss landscapes of a run's checkpoint; --workers N shards the samples over N ranks."""
    from .flatness import FlatnessOptions, measure_run, summary_line

    opts = FlatnessOptions(
        samples=args.samples, batch_size=args.batch_size, radii=tuple(args.radii), draws=args.draws, distribution=args.distribution,
        targets=args.targets, power_iters=args.power_iters, hutchinson=args.hutchinson, landscape_1d=args.landscape_1d,
        landscape_2d=args.landscape_2d, span=args.span, seed=args.seed,
    )  # fmt: skip
    if args.workers > 1 and "WORLD_SIZE" not in os.environ:
        forward = ["flatness", args.run_dir, "--radii", ",".join(map(str, args.radii))]
        for flag in ("checkpoint", "out", "samples", "batch_size", "draws", "distribution", "targets", "power_iters",
                     "hutchinson", "landscape_1d", "landscape_2d", "span", "seed"):  # fmt: skip
            if getattr(args, flag) is not None:
                forward += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        return run_torchrun(args.workers, forward)
    result = measure_run(Path(args.run_dir), opts, Path(args.checkpoint) if args.checkpoint else None, Path(args.out) if args.out else None)
    if _is_rank0():
        out = Path(args.out) if args.out else Path(args.run_dir) / "flatness"
        print(f"ssgd-dist: {summary_line(result)}\nwritten to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssgd-dist", description="Distributed large-batch training with S-SGD")
    # The `deepspeed` launcher inserts --local_rank=N right after the program; ranks come from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run (DDP under torchrun when WORLD_SIZE > 1)")
    p.add_argument("--config", required=True, help="packaged config name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--run-dir", help="run directory (default runs/<config>-<method>-s<seed>); reused to resume")
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quickstart", help="SGD vs S-SGD at a large batch on MNIST-1D, 2 CPU workers")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("report", help="comparison table and plots from run directories")
    p.add_argument("runs", nargs="+", help="run directories, or folders holding them (a sweep's output directory)")
    p.add_argument("--out", required=True)
    p.add_argument("--title", help="report heading")
    p.add_argument("--radius", type=float, help="perturbation radius of the table's sharpness column (default: median measured)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="a grid of methods x batch sizes x seeds x config keys, resumable, then a report")
    p.add_argument("grid", help="packaged grid name (e.g. mnist1d-large-batch) or a grid YAML path")
    p.add_argument("--out", help="output directory (default runs/<grid name>); rerun with the same one to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key in every run")
    p.add_argument("--workers", type=int, default=1, help="ranks per run (torchrun locally, Ray Train workers with --ray)")
    p.add_argument("--methods", type=_csv(str), help="only these method labels or names (comma-separated, shell patterns)")
    p.add_argument("--batch-sizes", type=_csv(int), help="only these batch sizes (comma-separated)")
    p.add_argument("--seeds", type=_csv(int), help="replace the grid's seeds (comma-separated)")
    p.add_argument("--ray", metavar="ADDRESS", help="run the cells as concurrent Ray Train jobs: 'auto', 'local' or ray://HOST:10001")
    p.add_argument("--max-concurrent", type=int, help="with --ray: runs at once (default: cluster CPUs / workers)")
    p.add_argument("--use-gpu", action="store_true", help="with --ray: one GPU per worker")
    p.add_argument("--storage-path", help="with --ray: Ray Train storage (shared FS or s3://...; default OUT/.ray)")
    p.add_argument("--max-failures", type=int, default=1, help="with --ray: worker-group restarts per run")
    p.add_argument("--no-flatness", action="store_true", help="do not measure sharpness after each run")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("flatness", help="sharpness (perturbation, Hessian eigenvalue and trace) and loss landscapes of a run")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="a checkpoint file (default: the run's latest)")
    p.add_argument("--out", help="output directory (default RUN_DIR/flatness)")
    p.add_argument("--samples", type=int, default=2000, help="training examples used (0: all), sharded over ranks")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--radii", type=_csv(float), default=[0.01, 0.02, 0.05, 0.1, 0.2], help="relative radii, comma-separated")
    p.add_argument("--draws", type=int, default=10, help="random +-n pairs per radius")
    p.add_argument("--distribution", default="sphere", choices=["sphere", "rademacher", "gaussian", "uniform"])
    p.add_argument("--targets", default="weights", choices=["weights", "all"])
    p.add_argument("--power-iters", type=int, default=100, help="power-iteration steps for the top eigenvalue (0: skip)")
    p.add_argument("--hutchinson", type=int, default=100, help="Rademacher probes for the trace (0: skip)")
    p.add_argument("--landscape-1d", type=int, default=41, help="points of the 1-D landscape (0: skip)")
    p.add_argument("--landscape-2d", type=int, default=21, help="points per axis of the 2-D landscape (0: skip)")
    p.add_argument("--span", type=float, default=1.0, help="landscape coordinates in [-span, span]")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--workers", type=int, default=1, help="shard over N local ranks (relaunches under torchrun)")
    p.set_defaults(func=cmd_flatness)

    p = sub.add_parser("bench", help="step time, gradient bytes, memory and noise cost of S-SGD against SGD, in one run")
    p.add_argument("--model", default="resnet20", help="a packaged model: mlp, cnn1d, resnet20, ... (default resnet20)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, summed over ranks")
    p.add_argument("--world-size", type=int, default=2, help="ranks it spawns: gloo on CPU, NCCL on GPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant, interleaved")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--burst", type=int, help="consecutive steps per timed sample (default 8 on CUDA, 1 on CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="torch threads per rank (default: CPUs / ranks on CPU)")
    p.add_argument("--variants", type=_csv(str), help="comma-separated subset (default all; sgd is always added)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--project", action="store_true", help="add a modelled projection of step time to 8..1024 GPUs")
    p.add_argument("--bandwidth", type=float, help="projection: all-reduce bus bandwidth per GPU in GB/s (default 25)")
    p.add_argument("--latency-us", type=float, help="projection: latency per all-reduce call in us (default 50)")
    p.add_argument("--overlap", type=float, help="projection: share of all-reduce time hidden behind compute (default 0)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("k8s", help="render a Kubernetes overlay with your image and a validated config (kubectl apply -f)")
    p.add_argument("overlay", help="rayjob, pytorchjob, torchrun-job or cpu-smoke (the folders of k8s/overlays)")
    p.add_argument("--image", help="the training image, REGISTRY/NAME[:TAG][@DIGEST] (default: the overlay's)")
    p.add_argument("--config", help="training config, packaged name or YAML path (default: the overlay's ConfigMap)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="write the manifests here instead of standard output")
    p.add_argument("--k8s-dir", type=Path, help="the k8s/ folder holding base/ and overlays/ (default: the one beside the package)")
    p.set_defaults(func=cmd_k8s)
    return parser


def cmd_k8s(args: argparse.Namespace) -> int:
    from .k8s import render

    manifests = render(args.overlay, image=args.image, config=args.config, overrides=args.set, k8s_dir=args.k8s_dir)
    if args.out:
        Path(args.out).write_text(manifests)
        print(f"ssgd-dist: wrote {args.out}; apply with: kubectl apply -f {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(manifests)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
