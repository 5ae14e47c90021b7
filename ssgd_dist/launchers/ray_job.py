"""One training run on a Ray cluster: the driver behind ``launch/ray_job.py`` (``ray job submit``).

A Ray Train ``TorchTrainer`` starts ``--num-workers`` workers (``MIN-MAX``: elastic, see
``launchers.elastic``); Ray creates the process group (gloo on CPU, NCCL on GPU) and each worker runs
the very same loop and DDP S-SGD step as ``torchrun -m ssgd_dist.cli train`` (see ``launchers.ray``).
Everything that can be checked here (config, launch rules for every worker count, storage path, run
directory) is, so that a mistake costs one line and exit code 2, not a cluster.

The run directory is ``<storage-path>/<name>``, the same contract as the CLI's ``--run-dir``; Ray's own
files (``checkpoint-step-N/``, ``checkpoint_manager_snapshot.json``) sit beside ours. With an object
store (``s3://...``) or ``--local-dir`` the workers train locally and rank 0 mirrors the run directory
there. ``--max-failures N`` lets Ray restart the worker group, which resumes at the same step, noise and
data position; re-submitting with the same ``--name`` and ``--storage-path`` resumes too.

Exit codes: 0 done, 2 a configuration or launch error (one line), 1 training failed (a non-finite loss
included: Ray reports it as a failed run, after its restarts).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import ray

from ..config import Config, load_config
from ..errors import EXIT_CONFIG, EXIT_FAILED, ConfigError
from ..rundir import check_run_dir
from .elastic import check_workers, parse_workers
from .ray import RunLocation, build_trainer, connect, is_uri

DEFAULT_STORAGE = "~/ray_results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/ray_job.py",
        description="Train one ssgd-dist run with Ray Train (TorchTrainer); submit with `ray job submit`.",
    )
    p.add_argument("--config", required=True, help="packaged config name or YAML path (relative to --working-dir)")
    p.add_argument(
        "--num-workers",
        required=True,
        help="training workers (= DDP ranks): N, or MIN-MAX for an elastic run that continues on fewer workers "
        "when some are lost (only for world-size-invariant configs)",
    )
    p.add_argument(
        "--resize-interval",
        type=float,
        default=60.0,
        help="elastic runs: seconds between Ray's checks whether the worker group can grow (default 60)",
    )
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (implies device=cuda, NCCL)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per worker with --use-gpu (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument(
        "--storage-path",
        default=DEFAULT_STORAGE,
        help=f"absolute path (shared by all nodes) or URI (s3://...) for the run; "
        f"default {DEFAULT_STORAGE} on the head",
    )
    p.add_argument(
        "--name", help="run name; the run directory is <storage-path>/<name> (default <config>-<method>-s<seed>)"
    )
    p.add_argument(
        "--local-dir",
        help="where workers train when the storage is an object store (default: <tmp>/ssgd-dist/<name>); "
        "given with a local storage path, train there and copy to the storage path at each checkpoint",
    )
    p.add_argument(
        "--max-failures", type=int, default=2, help="worker-group restarts Ray may make (-1: unlimited; default 2)"
    )
    p.add_argument("--num-to-keep", type=int, default=2, help="Ray checkpoints kept in the storage (default 2)")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's config. Defaults that suit Ray come first, so the user's ``--set`` still wins."""
    defaults = ["train.progress=false"]  # tqdm's carriage returns garble Ray's log streaming
    defaults.append("device=cuda" if args.use_gpu else "device=cpu")
    cfg = load_config(args.config, defaults + list(args.set))
    if cfg.device == "cuda" and not args.use_gpu:
        raise ConfigError("device = cuda: pass --use-gpu so that Ray gives each worker a GPU")
    return cfg


def resolve_storage(args: argparse.Namespace, cfg: Config) -> RunLocation:
    """Where the run lives: the run directory workers write, and where it is mirrored (if anywhere)."""
    name = args.name or f"{Path(args.config).stem}-{cfg.method}-s{cfg.seed}"
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"--name {name}: must be a plain directory name (no '/')")
    storage = args.storage_path
    if storage.startswith("file://"):
        storage = storage[len("file://") :]
    if not is_uri(storage):
        storage = os.path.expanduser(storage)
        if not os.path.isabs(storage):
            raise ConfigError(
                f"--storage-path {args.storage_path}: must be absolute (or a URI such as s3://bucket/runs); "
                "a job's working directory is a temporary copy that is not kept"
            )
    if is_uri(storage) or args.local_dir:
        local = Path(os.path.expanduser(args.local_dir or os.path.join(tempfile.gettempdir(), "ssgd-dist"))) / name
        return RunLocation(name, storage, str(local), mirror=True)
    return RunLocation(name, storage, os.path.join(storage, name))


def check_args(args: argparse.Namespace) -> None:
    """The flags' own rules, before Ray (or anything else) starts."""
    if not args.resize_interval >= 0:
        raise ConfigError(f"--resize-interval {args.resize_interval}: seconds, >= 0")
    for flag, value in (("--cpus-per-worker", args.cpus_per_worker), ("--gpus-per-worker", args.gpus_per_worker)):
        if not value >= 0:  # also refuses nan
            raise ConfigError(f"{flag} {value}: must be >= 0 (the share of a CPU or GPU Ray reserves per worker)")
    if args.num_to_keep < 1:
        raise ConfigError(f"--num-to-keep {args.num_to_keep}: keep at least 1 checkpoint, or resuming is impossible")
    if args.max_failures < -1:
        raise ConfigError(f"--max-failures {args.max_failures}: a count >= 0, or -1 for unlimited restarts")
    storage = args.storage_path.removeprefix("file://")
    if not is_uri(storage) and os.path.isfile(os.path.expanduser(storage)):
        raise ConfigError(
            f"--storage-path {args.storage_path}: is an existing file; pass a directory (or a URI such as s3://...)"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        low, high = parse_workers(args.num_workers)
        cfg = resolve_config(args)
        check_workers(cfg, low, high)
        where = resolve_storage(args, cfg)
        if not where.mirror:
            check_run_dir(cfg, Path(where.run_dir))  # fail here, not in every worker
    except ConfigError as exc:
        print(f"ssgd-dist: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    resources = {"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if args.use_gpu else {})}
    trainer = build_trainer(
        cfg,
        where,
        num_workers=low if low == high else (low, high),
        use_gpu=args.use_gpu,
        resources_per_worker=resources,
        max_failures=args.max_failures,
        num_to_keep=args.num_to_keep,
        resize_interval_s=args.resize_interval,
    )
    print(
        f"ssgd-dist: {cfg.method} on {args.num_workers} Ray workers ({'GPU' if args.use_gpu else 'CPU'}), "
        f"run dir {where.shown_dir}",
        flush=True,
    )
    try:
        connect()
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends; the workers' tracebacks are in the log
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        print(
            f"ssgd-dist: training failed ({type(exc).__name__}: {first}); the workers' errors are in the log "
            f"above; re-submit with the same --name and --storage-path to resume from the last checkpoint",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        if ray.is_initialized():
            ray.shutdown()
    summary = result.return_value or {}
    acc = summary.get("test_acc")
    # Re-submitting a finished run trains nothing; the workers only score the final checkpoint again.
    done = "already finished (nothing to train)" if summary.get("start_step") == summary.get("step") else "done"
    print(
        f"ssgd-dist: {done} at step {summary.get('step')}: "
        + (f"test_acc={acc:.4f} " if acc is not None else "")
        + f"run_dir={where.shown_dir} ray_checkpoint={result.checkpoint.path if result.checkpoint else None}",
        flush=True,
    )
    return 0
