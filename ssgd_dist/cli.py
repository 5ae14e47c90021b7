"""``ssgd-dist``: train, quickstart, sweep, report, flatness and bench.

User mistakes (bad config values, missing data, impossible launch settings, a run directory in use or
holding another run) exit with code 2 and one line naming the input and the fix; a non-finite loss or
weights under ``on_nonfinite: stop`` exit with 3; a full disk with 4; SIGINT/SIGTERM with 128 + signal.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .config import load_config, packaged_names
from .errors import EXPECTED, ConfigError, explain
from .launchers.torchrun import run_torchrun


def _is_rank0() -> bool:
    """Rank 0 prints; so does a process whose RANK/WORLD_SIZE are themselves the mistake (none else would)."""
    try:
        rank, world_size = int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return True
    return rank == 0 or not 0 <= rank < world_size


def _default_run_dir(config: str, method: str, seed: int) -> Path:
    return Path("runs") / f"{Path(config).stem}-{method}-s{seed}"


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(args.config, cfg.method, cfg.seed)
    summary = train(cfg, run_dir)
    if _is_rank0():
        acc = summary.get("test_acc")
        print(
            f"ssgd-dist: done at step {summary['step']}: test_acc={acc:.4f} run_dir={run_dir}"
            if acc is not None
            else f"ssgd-dist: done: {summary}"
        )
    return 0


# The quickstart's sharpness columns: the measures of ``ssgd-dist flatness`` with fewer draws and probes,
# no landscapes and no per-run figures (the report draws both runs): seconds instead of over a minute.
QUICK_FLATNESS = {"draws": 4, "power_iters": 20, "hutchinson": 10, "landscape_1d": 0, "landscape_2d": 0}
QUICKSTART_METHODS = ("sgd", "ssgd")


def cmd_quickstart(args: argparse.Namespace) -> int:
    """SGD vs S-SGD at batch 2000 on MNIST-1D: one torchrun launch trains both runs (the ranks start and
    import torch once, not once per run), then this process measures their sharpness, prints the table
    and writes the report."""
    if "WORLD_SIZE" in os.environ:
        return _quickstart_on_each_rank(args)
    from .analysis.report import comparison_table, summarize_run, write_report

    base = Path(args.run_dir)
    load_config("quickstart", args.set)  # fail fast, before launching workers
    forward = ["quickstart", "--run-dir", str(base), *sum((["--set", s] for s in args.set), [])]
    rc = run_torchrun(args.workers, forward)
    if rc != 0:
        print(f"ssgd-dist: the quickstart runs failed with exit code {rc}", file=sys.stderr)
        return rc
    runs = [base / method for method in QUICKSTART_METHODS]
    if args.flatness:
        from .analysis.flatness_run import measure_run
        from .config import FlatnessOptions

        for run_dir in runs:
            measure_run(run_dir, FlatnessOptions.from_dict(QUICK_FLATNESS), figures=False)
    report = write_report(runs, base / "report")
    print()
    print(comparison_table([summarize_run(r) for r in runs]))
    print(f"\nreport: {report}")
    return 0


def _quickstart_on_each_rank(args: argparse.Namespace) -> int:
    """Under torchrun: the runs one after the other on one process group (``train`` joins it, and leaves
    it to its owner here)."""
    from . import distributed
    from .train import train

    configs = [load_config("quickstart", [f"method={method}", *args.set]) for method in QUICKSTART_METHODS]
    ctx = distributed.setup(configs[0].device)
    try:
        for method, cfg in zip(QUICKSTART_METHODS, configs):
            run_dir = Path(args.run_dir) / method
            if ctx.is_main:
                print(f"== {method}: {ctx.world_size} workers, run dir {run_dir}", flush=True)
            summary = train(cfg, run_dir)
            if ctx.is_main:
                print(f"ssgd-dist: done at step {summary['step']}: test_acc={summary['test_acc']:.4f}", flush=True)
    finally:
        distributed.teardown(ctx)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis.report import collect_run_dirs, write_report

    missing = [d for d in args.runs if not Path(d).is_dir()]
    if missing:
        raise ConfigError(
            f"report: {missing[0]} is not a directory (pass run directories or a sweep's output directory)"
        )
    runs = collect_run_dirs(args.runs)
    if not runs:
        raise ConfigError(f"report: no run directory (with a config.yaml) in {', '.join(args.runs)}")
    out = Path(args.out) if args.out else default_report_dir(args.runs)
    print(f"report: {write_report(runs, out, title=args.title, radius=args.radius, reference=args.reference)}")
    return 0


def default_report_dir(paths: list[str]) -> Path:
    """``DIR/report`` for one directory; for several, ``report`` in the deepest folder holding them all."""
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0]
    return Path(os.path.relpath(common / "report")) if common.is_relative_to(Path.cwd()) else common / "report"


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
        ray_kwargs = dict(
            max_concurrent=args.max_concurrent,
            use_gpu=args.use_gpu,
            storage_path=args.storage_path,
            max_failures=args.max_failures,
        )
    statuses, report = run_sweep(
        grid,
        out,
        workers=args.workers,
        ray_address=args.ray,
        flatness=not args.no_flatness,
        report=not args.no_report,
        **ray_kwargs,
    )
    bad = {name: status for name, status in statuses.items() if status not in ("done", "diverged")}
    done = sum(s == "done" for s in statuses.values())
    diverged = sum(s == "diverged" for s in statuses.values())
    print(
        f"sweep {grid.name}: {done} done, {diverged} diverged, {len(bad)} failed or not run"
        + (f"; report: {report}" if report else "")
    )
    if report is not None:
        from .analysis.report import collect_run_dirs, comparison_table, summarize_run

        print()
        print(
            comparison_table(
                [
                    summarize_run(d)
                    for d in collect_run_dirs(
                        [out / c.name for c in grid.cells if statuses.get(c.name) in ("done", "diverged")]
                    )
                ]
            )
        )
    for name, status in bad.items():
        print(f"  {name}: {status}", file=sys.stderr)
    return 1 if bad else 0


def cmd_flatness(args: argparse.Namespace) -> int:
    """Sharpness and loss landscapes of a run's checkpoint; --workers N shards the samples over N ranks."""
    from .analysis.flatness_run import FLATNESS_DIR, measure_run, summary_line
    from .config import FlatnessOptions

    given = {name: value for name in FlatnessOptions.model_fields if (value := getattr(args, name, None)) is not None}
    opts = FlatnessOptions.from_dict(given)  # a bad value fails here, before any worker starts
    if args.workers > 1 and "WORLD_SIZE" not in os.environ:
        forward = ["flatness", args.run_dir]
        for flag in ("checkpoint", "out", *given):
            value = getattr(args, flag)
            if value is not None:
                forward += [f"--{flag.replace('_', '-')}", ",".join(map(str, value)) if flag == "radii" else str(value)]
        return run_torchrun(args.workers, forward)
    out = Path(args.out) if args.out else None
    result = measure_run(Path(args.run_dir), opts, Path(args.checkpoint) if args.checkpoint else None, out)
    if _is_rank0():
        print(f"ssgd-dist: {summary_line(result)}\nwritten to {out or Path(args.run_dir) / FLATNESS_DIR}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssgd-dist", description="Distributed large-batch training with S-SGD")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # The `deepspeed` launcher inserts --local_rank=N right after the program; ranks come from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    configs = ", ".join(packaged_names())
    p = sub.add_parser("train", help="train one run (DDP under torchrun when WORLD_SIZE > 1)")
    p.add_argument("--config", required=True, help=f"a packaged config ({configs}) or the path of a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--run-dir", help="run directory (default runs/<config>-<method>-s<seed>); reused to resume")
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quickstart", help="SGD vs S-SGD at a large batch on MNIST-1D, 2 CPU workers")
    p.add_argument(
        "--run-dir",
        default="runs/quickstart",
        help="holds the runs (sgd/, ssgd/) and report/ (default runs/quickstart); rerun with it to resume",
    )
    p.add_argument("--workers", type=int, default=2, help="ranks per run, launched with torchrun (default 2)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the quickstart config"
    )
    p.add_argument(
        "--no-flatness",
        dest="flatness",
        action="store_false",
        help="skip the quick sharpness measurement (the table's last three columns)",
    )
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("report", help="comparison table and plots from run directories")
    p.add_argument("runs", nargs="+", help="run directories, or folders holding them (a sweep's output directory)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report; for several, report/ beside them)")
    p.add_argument("--title", help="report heading")
    p.add_argument(
        "--radius", type=float, help="perturbation radius of the table's sharpness column (default: median measured)"
    )
    p.add_argument(
        "--reference", help="method label the paired gains are taken against (default: SGD's), e.g. ssgd-halves"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="a grid of methods x batch sizes x seeds x config keys, resumable, then a report")
    p.add_argument("grid", help="packaged grid name (e.g. mnist1d-large-batch) or a grid YAML path")
    p.add_argument("--out", help="output directory (default runs/<grid name>); rerun with the same one to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key in every run")
    p.add_argument(
        "--workers", type=int, default=1, help="ranks per run (torchrun locally, Ray Train workers with --ray)"
    )
    p.add_argument(
        "--methods", type=_csv(str), help="only these method labels or names (comma-separated, shell patterns)"
    )
    p.add_argument("--batch-sizes", type=_csv(int), help="only these batch sizes (comma-separated)")
    p.add_argument("--seeds", type=_csv(int), help="replace the grid's seeds (comma-separated)")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the cells as Ray Tune trials, each a Ray Train run: 'auto', 'local' or ray://HOST:10001",
    )
    p.add_argument("--max-concurrent", type=int, help="with --ray: runs at once (default: cluster CPUs / workers)")
    p.add_argument("--use-gpu", action="store_true", help="with --ray: one GPU per worker")
    p.add_argument("--storage-path", help="with --ray: Ray Train storage (shared FS or s3://...; default OUT/.ray)")
    p.add_argument("--max-failures", type=int, default=1, help="with --ray: worker-group restarts per run")
    p.add_argument("--no-flatness", action="store_true", help="do not measure sharpness after each run")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "flatness", help="sharpness (perturbation, Hessian eigenvalue and trace) and loss landscapes of a run"
    )
    # No defaults here: a flag left out stays None, and FlatnessOptions holds every default.
    from .config import FlatnessOptions

    p.add_argument("run_dir", help="a run directory (what train --run-dir names)")
    p.add_argument("--checkpoint", help="a checkpoint file (default: the run's latest)")
    p.add_argument("--out", help="output directory (default RUN_DIR/flatness)")
    p.add_argument("--samples", type=int, help="training examples used (0: all), sharded over ranks")
    p.add_argument("--batch-size", type=int, help="evaluation chunk per rank")
    p.add_argument("--radii", type=_csv(float), help="relative radii, comma-separated")
    p.add_argument("--draws", type=int, help="random +-n pairs per radius")
    p.add_argument(
        "--distribution",
        choices=FlatnessOptions.model_fields["distribution"].annotation.__args__,
        help="of the perturbation direction (default sphere)",
    )
    p.add_argument(
        "--targets",
        choices=FlatnessOptions.model_fields["targets"].annotation.__args__,
        help="perturbed tensors: weights (ndim >= 2) or all (default weights)",
    )
    p.add_argument("--power-iters", type=int, help="power-iteration steps for the top eigenvalue (0: skip)")
    p.add_argument("--hutchinson", type=int, help="Rademacher probes for the trace (0: skip)")
    p.add_argument("--landscape-1d", type=int, help="points of the 1-D landscape (0: skip)")
    p.add_argument("--landscape-2d", type=int, help="points per axis of the 2-D landscape (0: skip)")
    p.add_argument("--span", type=float, help="landscape coordinates in [-span, span]")
    p.add_argument("--seed", type=int, help="seed of the random directions")
    p.add_argument("--workers", type=int, default=1, help="shard over N local ranks (relaunches under torchrun)")
    p.set_defaults(func=cmd_flatness)

    p = sub.add_parser(
        "bench", help="step time, gradient bytes, memory and noise cost of S-SGD against SGD, in one run"
    )
    # No defaults here: a flag left out stays None, and BenchOptions holds every default and help text.
    from .config import BenchOptions

    def bench_help(name: str, show_default: bool = False) -> str:
        field = BenchOptions.model_fields[name]
        shown = f"{field.default:g}" if isinstance(field.default, float) else field.default
        return f"{field.description} (default {shown})" if show_default else field.description

    p.add_argument("--model", help=bench_help("model", show_default=True))
    p.add_argument("--batch-size", type=int, help=bench_help("batch_size"))
    p.add_argument("--world-size", type=int, help=bench_help("world_size"))
    p.add_argument("--accumulation-steps", type=int, help=bench_help("accumulation_steps"))
    p.add_argument("--backend", choices=["ddp", "fsdp"], help=bench_help("backend", show_default=True))
    p.add_argument("--steps", type=int, help=bench_help("steps"))
    p.add_argument("--warmup", type=int, help=bench_help("warmup"))
    p.add_argument("--burst", type=int, help=bench_help("burst"))
    p.add_argument(
        "--device", choices=BenchOptions.model_fields["device"].annotation.__args__, help=bench_help("device", True)
    )
    p.add_argument(
        "--precision",
        choices=BenchOptions.model_fields["precision"].annotation.__args__,
        help=bench_help("precision", True),
    )
    p.add_argument("--threads", type=int, help=bench_help("threads"))
    p.add_argument("--variants", type=_csv(str), help=bench_help("variants"))
    p.add_argument("--seed", type=int, help=bench_help("seed"))
    p.add_argument("--no-memory", dest="memory", action="store_false", default=None, help="skip the memory measurement")
    p.add_argument("--json", dest="json_path", metavar="PATH", help=bench_help("json_path"))
    p.add_argument("--project", action="store_true", default=None, help=bench_help("project"))
    p.add_argument("--bandwidth", type=float, help=bench_help("bandwidth", show_default=True))
    p.add_argument("--latency-us", type=float, help=bench_help("latency_us", show_default=True))
    p.add_argument("--overlap", type=float, help=bench_help("overlap", show_default=True))
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "k8s", help="render a Kubernetes overlay with your image and a validated config (kubectl apply -f)"
    )
    p.add_argument("overlay", help="rayjob, pytorchjob, torchrun-job or cpu-smoke (the folders of k8s/overlays)")
    p.add_argument("--image", help="the training image, REGISTRY/NAME[:TAG][@DIGEST] (default: the overlay's)")
    p.add_argument("--config", help="training config, packaged name or YAML path (default: the overlay's ConfigMap)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="write the manifests here instead of standard output")
    p.add_argument(
        "--k8s-dir", type=Path, help="the k8s/ folder holding base/ and overlays/ (default: the one beside the package)"
    )
    p.set_defaults(func=cmd_k8s)
    return parser


def cmd_k8s(args: argparse.Namespace) -> int:
    from .launchers.k8s import render

    manifests = render(args.overlay, image=args.image, config=args.config, overrides=args.set, k8s_dir=args.k8s_dir)
    if args.out:
        Path(args.out).write_text(manifests)
        print(f"ssgd-dist: wrote {args.out}; apply with: kubectl apply -f {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(manifests)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The flags given (argparse leaves the others None) over BenchOptions' defaults."""
    from .bench import main as bench_main
    from .config import BenchOptions

    given = {k: v for k, v in vars(args).items() if k in BenchOptions.model_fields and v is not None}
    return bench_main(BenchOptions.checked(**given))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED as exc:
        code, line = explain(exc)
        if _is_rank0():
            print(f"ssgd-dist: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
