"""Train one ssgd-dist run on a Ray cluster: the entrypoint for ``ray job submit``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/ray_job.py --config quickstart --num-workers 2 \\
        [--use-gpu] [--set key=value ...] [--storage-path PATH_OR_URI] [--name RUN]

A Ray Train ``TorchTrainer`` (Train V2) starts ``--num-workers`` workers; Ray creates the process
group (gloo on CPU, NCCL on GPU) and each worker calls ``ssgd_dist.train.train``: the very same loop
and DDP S-SGD step as ``torchrun -m ssgd_dist.cli train``. At every checkpoint of that loop (each
epoch end, or every ``train.checkpoint_every`` steps) all workers call ``ray.train.report``; rank 0
attaches a checkpoint that is itself a small run directory (``config.yaml``, ``metrics.jsonl``,
``checkpoints/last.pt``).

Outputs: the run directory is ``<storage-path>/<name>``, the same contract as the CLI's
``--run-dir`` (``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``), so ``ssgd-dist report``
reads it; Ray's own files (``checkpoint-step-N/``, ``checkpoint_manager_snapshot.json``) sit beside
ours. On a multi-node cluster the storage path must be shared by all nodes (NFS, ...). For an object
store (``s3://...``) the workers train in a local ``--local-dir`` and rank 0 copies the run directory
files to ``<storage-path>/<name>`` at every checkpoint.

Fault tolerance: ``--max-failures N`` lets Ray restart the worker group; the new group resumes from
the run directory's newest checkpoint, else from ``ray.train.get_checkpoint()``: same step, same
noise, same data position. Re-submitting with the same ``--name`` and ``--storage-path`` resumes too.

Exit codes: 0 done, 2 a configuration or launch error (one line), 1 training failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

# `python launch/ray_job.py` puts launch/ first on sys.path; the package is one level up (Ray's
# --working-dir also puts it on PYTHONPATH, but a plain checkout should work too).
_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "ssgd_dist").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(1, str(_REPO))

from ssgd_dist.config import Config, load_config  # noqa: E402
from ssgd_dist.errors import EXIT_CONFIG, EXIT_FAILED, ConfigError  # noqa: E402

DEFAULT_STORAGE = "~/ray_results"
# What a Ray checkpoint holds: a run directory with only the newest checkpoint.
SNAPSHOT_FILES = ("config.yaml", "metrics.jsonl")


# -- arguments -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/ray_job.py",
        description="Train one ssgd-dist run with Ray Train (TorchTrainer); submit with `ray job submit`.",
    )
    p.add_argument("--config", required=True, help="packaged config name or YAML path (relative to --working-dir)")
    p.add_argument("--num-workers", type=int, required=True, help="training workers (= DDP ranks)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (implies device=cuda, NCCL)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per worker with --use-gpu (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument(
        "--storage-path",
        default=DEFAULT_STORAGE,
        help=f"absolute path (shared by all nodes) or URI (s3://...) for the run; default {DEFAULT_STORAGE} on the head",
    )
    p.add_argument("--name", help="run name; the run directory is <storage-path>/<name> (default <config>-<method>-s<seed>)")
    p.add_argument(
        "--local-dir",
        help="where workers train when the storage is an object store (default: <tmp>/ssgd-dist/<name>); "
        "given with a local storage path, train there and copy to the storage path at each checkpoint",
    )
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts Ray may make (-1: unlimited; default 2)")
    p.add_argument("--num-to-keep", type=int, default=2, help="Ray checkpoints kept in the storage (default 2)")
    return p


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's config. Defaults that suit Ray come first, so the user's ``--set`` still wins."""
    defaults = ["train.progress=false"]  # tqdm's carriage returns garble Ray's log streaming
    defaults.append("device=cuda" if args.use_gpu else "device=cpu")
    cfg = load_config(args.config, defaults + list(args.set))
    if cfg.device == "cuda" and not args.use_gpu:
        raise ConfigError("device = cuda: pass --use-gpu so that Ray gives each worker a GPU")
    return cfg


def resolve_storage(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
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
        return {"name": name, "storage_path": storage, "run_dir": str(local), "mirror": True}
    return {"name": name, "storage_path": storage, "run_dir": os.path.join(storage, name), "mirror": False}


def storage_location(storage_path: str, name: str):
    """(pyarrow file system, path of ``<storage>/<name>`` on it)."""
    import pyarrow.fs

    if is_uri(storage_path):
        fs, base = pyarrow.fs.FileSystem.from_uri(storage_path)
    else:
        fs, base = pyarrow.fs.LocalFileSystem(), storage_path
    return fs, f"{base.rstrip('/')}/{name}"


def write_snapshot(run_dir: Path, ckpt_path: Path, dest: Path) -> None:
    """A run directory holding only the newest checkpoint: what a Ray checkpoint contains."""
    (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
    for fname in SNAPSHOT_FILES:
        if (run_dir / fname).exists():
            shutil.copyfile(run_dir / fname, dest / fname)
    target = dest / "checkpoints" / "last.pt"
    try:
        os.link(ckpt_path, target)  # same file system: free
    except OSError:
        shutil.copyfile(ckpt_path, target)


def download_run_dir(storage_path: str, name: str, dest: Path) -> Path:
    """Copy ``<storage>/<name>``'s snapshot files (those that exist) into ``dest``."""
    import pyarrow.fs

    fs, base = storage_location(storage_path, name)
    dest.mkdir(parents=True, exist_ok=True)
    for rel in (*SNAPSHOT_FILES, "checkpoints/last.pt"):
        if fs.get_file_info(f"{base}/{rel}").type == pyarrow.fs.FileType.File:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(f"{base}/{rel}", str(dest / rel), source_filesystem=fs)
    return dest


def checkpoint_step(snapshot: Path) -> int | None:
    """The step of a snapshot's ``checkpoints/last.pt``; None if missing or unreadable."""
    from ssgd_dist.checkpoint import load_checkpoint_file

    path = snapshot / "checkpoints" / "last.pt"
    try:
        return int(load_checkpoint_file(path)["step"]) if path.is_file() else None
    except Exception:  # noqa: BLE001 - truncated or corrupt: not a candidate
        return None


def choose_snapshot(candidates: list[tuple[str, Path]]) -> tuple[str, Path, int] | None:
    """The newest loadable snapshot; on a tie the earlier candidate wins."""
    best = None
    for label, snap in candidates:
        step = checkpoint_step(snap)
        if step is not None and (best is None or step > best[2]):
            best = (label, snap, step)
    return best


def prepare_resume(loop: dict[str, Any], run_dir: Path, rank: int, stack: ExitStack) -> Path | None:
    """The checkpoint ``train(resume_from=...)`` falls back to; resets a stale local working copy.

    ``train`` itself prefers the run directory's newest checkpoint. On a shared file system (the
    default) that directory is the storage, and it is never older than Ray's latest checkpoint:
    rank 0 saves before it reports, and Ray registers a checkpoint only once its controller has
    collected every rank's report, so a crash right after a report can lose the registration but
    not the file. With ``--local-dir`` the local copy may be stale or on another node, so it is
    cleared and every rank resumes from the newer of Ray's checkpoint and the run directory copied
    to the storage; all ranks see the same storage, so they all pick the same checkpoint.
    """
    import ray.train
    import torch.distributed as dist

    candidates = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        candidates.append(("Ray checkpoint", Path(stack.enter_context(checkpoint.as_directory()))))
    if loop["mirror"]:
        # A fixed name per rank, so a copy left by a killed worker is replaced, not accumulated.
        tmp = run_dir.parent / f".{run_dir.name}.resume-rank{rank}"
        shutil.rmtree(tmp, ignore_errors=True)
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        candidates.append(("run directory in the storage", download_run_dir(loop["storage_path"], loop["name"], tmp)))
        if rank == 0 and run_dir.exists():
            for entry in run_dir.iterdir():
                if not entry.name.startswith(".crash-injected-"):  # test-only fault marker: keep it
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if rank == 0:  # snapshots a killed rank 0 left behind
        for stale in run_dir.glob(".ray-snapshot-*"):
            shutil.rmtree(stale, ignore_errors=True)
    chosen = choose_snapshot(candidates)
    if chosen is not None and rank == 0:
        label, snap, step = chosen
        run_dir.mkdir(parents=True, exist_ok=True)
        for fname in SNAPSHOT_FILES:  # a run directory without its files gets its history back
            if (snap / fname).exists() and not (run_dir / fname).exists():
                shutil.copyfile(snap / fname, run_dir / fname)
        print(f"ssgd-dist: if the run directory has no checkpoint: resume from the {label} at step {step} ({snap})", flush=True)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the run directory before rank 0 has reset and restored it
    return chosen[1] / "checkpoints" / "last.pt" if chosen is not None else None


def train_worker(loop: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker; Ray has already initialized the process group."""
    import ray.train
    from ray.train import Checkpoint

    from ssgd_dist.config import validate
    from ssgd_dist.metrics import scalars
    from ssgd_dist.train import train

    cfg = validate(loop["config"])
    run_dir = Path(loop["run_dir"])
    rank = ray.train.get_context().get_world_rank()

    def on_checkpoint(record: dict[str, Any], path: Path | None) -> None:
        # Every rank reports (the report is a barrier); rank 0 attaches the checkpoint.
        metrics = scalars(record)
        if path is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix=".ray-snapshot-", dir=run_dir, ignore_cleanup_errors=True) as snap:
            write_snapshot(run_dir, Path(path), Path(snap))
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(snap),
                checkpoint_dir_name=f"checkpoint-step-{record['step']:08d}",
            )
            if loop["mirror"]:  # keep <storage>/<name> a run directory whatever the storage
                import pyarrow.fs

                fs, dest = storage_location(loop["storage_path"], loop["name"])
                fs.create_dir(dest)
                pyarrow.fs.copy_files(snap, dest, destination_filesystem=fs)

    with ExitStack() as stack:
        resume_from = prepare_resume(loop, run_dir, rank, stack)
        return train(cfg, run_dir, on_checkpoint=on_checkpoint, resume_from=resume_from)


# -- on the driver -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ssgd_dist.train import check_launch, check_run_dir

        if args.num_workers < 1:
            raise ConfigError(f"--num-workers {args.num_workers}: needs at least 1 worker")
        cfg = resolve_config(args)
        check_launch(cfg, args.num_workers)
        where = resolve_storage(args, cfg)
        if not where["mirror"]:
            check_run_dir(cfg, Path(where["run_dir"]))  # fail here, not in every worker
    except ConfigError as exc:
        print(f"ssgd-dist: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    resources = {"CPU": args.cpus_per_worker}
    if args.use_gpu:
        resources["GPU"] = args.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), **where},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=where["name"],
            storage_path=where["storage_path"],
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=args.num_to_keep),
        ),
    )
    run_dir = where["run_dir"] if not where["mirror"] else f"{where['storage_path'].rstrip('/')}/{where['name']}"
    print(
        f"ssgd-dist: {cfg.method} on {args.num_workers} Ray workers ({'GPU' if args.use_gpu else 'CPU'}), "
        f"run dir {run_dir}",
        flush=True,
    )
    try:
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
    print(
        f"ssgd-dist: done at step {summary.get('step')}: "
        + (f"test_acc={acc:.4f} " if acc is not None else "")
        + f"run_dir={run_dir} ray_checkpoint={result.checkpoint.path if result.checkpoint else None}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
