"""Ray Train (Train V2): the one worker function and the one ``TorchTrainer`` of the package.

``launch/ray_job.py`` (one run) and ``ssgd-dist sweep --ray`` (one Ray Tune trial per grid cell, each
fitting this trainer) both come here, so a run on Ray is always the torchrun loop
(``ssgd_dist.train.train``) plus checkpoints Ray can restore. Every ``train.log_every`` window is one
``ray.train.report`` (a barrier: every rank reports each window); the window that ends at a checkpoint
carries it, so Ray's callbacks and Tune see the whole curve while checkpoints stay as frequent as the
config says. A Ray checkpoint is itself a small run directory (``config.yaml``, ``metrics.jsonl``,
``checkpoints/last.pt``, or ``checkpoints/last.dcp/`` for a sharded checkpoint): whichever copy survives
a failure, ``train`` resumes from it and ``report`` reads it. When the storage is an object store (or a
local working directory is asked for), workers train in a local run directory and rank 0 mirrors each
snapshot to ``<storage>/<name>``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import torch.distributed as dist
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from ..analysis.flatness_run import flatness_path, measure_run
from ..checkpoint import load_checkpoint_file, read_sharded_meta
from ..config import Config, FlatnessOptions, validate
from ..errors import NonFiniteError
from ..files import atomic_copy
from ..metrics import scalars
from ..rundir import LOCK
from ..train import train

# What a Ray checkpoint holds besides its checkpoint: the run directory minus older checkpoints.
SNAPSHOT_FILES = ("config.yaml", "metrics.jsonl")
# A snapshot's checkpoint: a plain file, or a sharded checkpoint's directory.
SNAPSHOT_CHECKPOINTS = ("checkpoints/last.pt", "checkpoints/last.dcp")


@dataclass(frozen=True)
class RunLocation:
    """Ray's ``RunConfig(name, storage_path)`` and the run directory the workers write.

    ``mirror``: that run directory is local to the workers; rank 0 copies it to ``<storage_path>/<name>``.
    """

    name: str
    storage_path: str
    run_dir: str
    mirror: bool = False

    @property
    def shown_dir(self) -> str:
        """The run directory a user reads afterwards: the mirror when there is one."""
        return f"{self.storage_path.rstrip('/')}/{self.name}" if self.mirror else self.run_dir


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_location(storage_path: str, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow file system, path of ``<storage>/<name>`` on it)."""
    if is_uri(storage_path):
        fs, base = pyarrow.fs.FileSystem.from_uri(storage_path)
    else:
        fs, base = pyarrow.fs.LocalFileSystem(), storage_path
    return fs, f"{base.rstrip('/')}/{name}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same file system: free
    except OSError:
        shutil.copyfile(src, dst)


def write_snapshot(run_dir: Path, ckpt_path: Path, dest: Path) -> None:
    """A run directory holding only the newest checkpoint: what a Ray checkpoint contains."""
    (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
    for fname in SNAPSHOT_FILES:
        if (run_dir / fname).exists():
            shutil.copyfile(run_dir / fname, dest / fname)
    if ckpt_path.is_dir():
        shutil.copytree(ckpt_path, dest / SNAPSHOT_CHECKPOINTS[1], copy_function=_link_or_copy)
    else:
        _link_or_copy(str(ckpt_path), str(dest / SNAPSHOT_CHECKPOINTS[0]))


def download_run_dir(storage_path: str, name: str, dest: Path) -> Path:
    """Copy ``<storage>/<name>``'s snapshot files (those that exist) into ``dest``. Mirrored runs write plain
    checkpoints (``checkpoint_format_for``), so the checkpoint there is ``checkpoints/last.pt``."""
    fs, base = storage_location(storage_path, name)
    dest.mkdir(parents=True, exist_ok=True)
    for rel in (*SNAPSHOT_FILES, SNAPSHOT_CHECKPOINTS[0]):
        if fs.get_file_info(f"{base}/{rel}").type == pyarrow.fs.FileType.File:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(f"{base}/{rel}", str(dest / rel), source_filesystem=fs)
    return dest


def snapshot_checkpoint(snapshot: Path) -> Path | None:
    """A snapshot's checkpoint (file or sharded directory), if it has one."""
    return next((snapshot / rel for rel in SNAPSHOT_CHECKPOINTS if (snapshot / rel).exists()), None)


def checkpoint_step(snapshot: Path) -> int | None:
    """The step of a snapshot's checkpoint; None if missing or unreadable."""
    path = snapshot_checkpoint(snapshot)
    try:
        state = read_sharded_meta(path) if path.is_dir() else load_checkpoint_file(path)
        return int(state["step"])
    except Exception:  # noqa: BLE001 - missing, truncated or corrupt: not a candidate
        return None


def choose_snapshot(candidates: list[tuple[str, Path]]) -> tuple[str, Path, int] | None:
    """The newest loadable snapshot; on a tie the earlier candidate wins."""
    best = None
    for label, snap in candidates:
        step = checkpoint_step(snap)
        if step is not None and (best is None or step > best[2]):
            best = (label, snap, step)
    return best


def prepare_resume(where: RunLocation, rank: int, stack: ExitStack) -> Path | None:
    """The checkpoint ``train(resume_from=...)`` falls back to; resets a stale local working copy.

    ``train`` itself prefers the run directory's newest checkpoint. On a shared file system that
    directory is never older than Ray's latest checkpoint: rank 0 saves before it reports, and Ray
    registers a checkpoint only once its controller has every rank's report, so a crash right after
    a report can lose the registration but not the file. A mirrored (local) copy may be stale or on
    another node, so it is cleared and every rank resumes from the newer of Ray's checkpoint and the
    copy in the storage; all ranks see the same storage, so they all pick the same checkpoint.
    """
    run_dir = Path(where.run_dir)
    candidates = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        candidates.append(("Ray checkpoint", Path(stack.enter_context(checkpoint.as_directory()))))
    if where.mirror:
        # A fixed name per rank, so a copy left by a killed worker is replaced, not accumulated.
        tmp = run_dir.parent / f".{run_dir.name}.resume-rank{rank}"
        shutil.rmtree(tmp, ignore_errors=True)
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        candidates.append(("run directory in the storage", download_run_dir(where.storage_path, where.name, tmp)))
        if rank == 0 and run_dir.exists():
            for entry in run_dir.iterdir():
                # Keep the test-only fault marker, and the lock file (deleting it would unlock a live run's).
                if not entry.name.startswith(".crash-injected-") and entry.name != LOCK:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if rank == 0:  # snapshots a killed rank 0 left behind
        for stale in run_dir.glob(".ray-snapshot-*"):
            shutil.rmtree(stale, ignore_errors=True)
    chosen = choose_snapshot(candidates)
    if chosen is not None and rank == 0:  # ``train`` says which checkpoint it resumes from
        snap = chosen[1]
        run_dir.mkdir(parents=True, exist_ok=True)
        for fname in SNAPSHOT_FILES:  # a run directory without its files gets its history back
            if (snap / fname).exists() and not (run_dir / fname).exists():
                atomic_copy(snap / fname, run_dir / fname)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the run directory before rank 0 has reset and restored it
    return snapshot_checkpoint(chosen[1]) if chosen is not None else None


def checkpoint_format_for(cfg: Config, where: RunLocation, announce: bool = False) -> Config:
    """``cfg``, with plain checkpoints where the workers' run directories are not shared (mirrored: each node
    writes its own disk), since a sharded checkpoint needs every rank's files in one directory."""
    if not (where.mirror and cfg.backend == "fsdp" and cfg.fsdp.checkpoint == "sharded"):
        return cfg
    if announce:
        print(
            "ssgd-dist: fsdp.checkpoint=full: the workers' run directories are local (--local-dir or an object "
            "store), so each checkpoint is gathered to rank 0 and mirrored to the storage",
            flush=True,
        )
    return cfg.model_copy(update={"fsdp": cfg.fsdp.model_copy(update={"checkpoint": "full"})})


def train_worker(loop: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker (Ray has set up the process group); ``loop`` comes from ``build_trainer``.

    Returns ``{"status": "done", **summary}`` (Ray hands rank 0's to the driver), or ``{"status":
    "diverged", "error": ...}`` when ``diverged_as_status``: a sweep records the cell and goes on,
    while a single job lets the ``NonFiniteError`` fail the run as it fails under torchrun.
    """
    where, run_dir = loop["where"], Path(loop["where"].run_dir)
    rank = ray.train.get_context().get_world_rank()
    cfg = checkpoint_format_for(validate(loop["config"]), where, announce=rank == 0)

    def on_log(records: list[dict[str, Any]], checkpoint: bool) -> None:
        if not checkpoint:  # a window that ends at a checkpoint is reported with it (``on_checkpoint``)
            ray.train.report(scalars(records[-1]), checkpoint=None)

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
            if where.mirror:  # keep <storage>/<name> a run directory whatever the storage
                fs, dest = storage_location(where.storage_path, where.name)
                fs.create_dir(dest)
                pyarrow.fs.copy_files(snap, dest, destination_filesystem=fs)

    with ExitStack() as stack:
        resume_from = prepare_resume(where, rank, stack)
        try:
            summary = train(cfg, run_dir, on_checkpoint=on_checkpoint, resume_from=resume_from, on_log=on_log)
        except NonFiniteError as exc:
            if not loop["diverged_as_status"]:
                raise
            return {"status": "diverged", "error": str(exc)}
    if loop["flatness"] is not None and not flatness_path(run_dir).exists():
        measure_run(run_dir, loop["flatness"])  # every worker measures a shard of the samples
    return {"status": "done", **summary}


@dataclass(frozen=True)
class TuneRun:
    """One trial of a Tune sweep: the run's config and location, and ``build_trainer``'s other arguments."""

    config: Config
    where: RunLocation
    trainer: dict[str, Any]


def tune_trial(params: dict[str, Any], runs: dict[str, TuneRun]) -> None:
    """One Ray Tune trial: the run ``params["run"]``, fitted as the same Ray Train run as ``ray job submit``.

    ``TuneReportCallback`` hands every ``ray.train.report`` to Tune, so the trial's results are the run's
    log windows. Nothing is returned: Tune would record a return value as one more result.
    """
    run = runs[params["run"]]
    build_trainer(run.config, run.where, callbacks=[TuneReportCallback()], **run.trainer).fit()


class TrialLog(tune.Callback):
    """One line per trial started, finished or failed, in the process that runs the sweep."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"{trial.config['run']}: training (Tune trial {trial.trial_id})", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"{trial.config['run']}: trial finished", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"{trial.config['run']}: trial failed", flush=True)


def run_tune(runs: dict[str, TuneRun], storage_path: str, name: str, max_concurrent: int) -> dict[str, str | None]:
    """Fit every run as one Tune trial (a grid search over the names), at most ``max_concurrent`` at once.

    The caller offers only runs that are not finished: a run's own directory, not Tune's experiment
    state, says whether it is (Tune may be stopped after a run's last checkpoint but before it records
    the trial as finished). An unfinished run's Ray Train run resumes from its checkpoint. A trial's own
    process only waits for its Ray Train run, which reserves the workers, so the trial reserves no CPU
    (Tune needs some resource: 1 MiB of memory), and ``max_concurrent`` is what keeps the runs from
    queueing for the same CPUs or GPUs. Results (one per log window) go to ``<storage_path>/<name>``.
    Returns each run's error (None: the trial finished).
    """
    trainable = tune.with_resources(tune.with_parameters(tune_trial, runs=runs), {"CPU": 0, "memory": 2**20})
    tuner = tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search(sorted(runs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=[TrialLog()]),
    )
    errors: dict[str, str | None] = {}
    for result in tuner.fit():
        error = result.error
        errors[result.config["run"]] = None if error is None else f"{type(error).__name__}: {str(error)[:300]}"
    return errors


def connect(address: str | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster (the job's, or ``address``) once per process; without one Ray starts a local one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # clusters without a network: don't try to phone home
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=log_to_driver)


def build_trainer(
    cfg: Config,
    where: RunLocation,
    *,
    num_workers: int | tuple[int, int],
    use_gpu: bool = False,
    resources_per_worker: dict[str, float] | None = None,
    max_failures: int = 2,
    num_to_keep: int = 2,
    resize_interval_s: float = 60.0,
    flatness: FlatnessOptions | None = None,
    diverged_as_status: bool = False,
    callbacks: list[UserCallback] | None = None,
) -> TorchTrainer:
    """``train_worker`` on ``num_workers`` DDP workers; ``flatness``: measure the result on the same workers.

    ``num_workers`` (MIN, MAX): elastic. Ray starts with as many workers as it can place (at least MIN),
    restarts the group on fewer when a worker or node is lost, and, while the group is healthy, checks
    every ``resize_interval_s`` whether it could grow; each new group resumes from the newest checkpoint.
    The caller has checked the config for every size (``elastic.check_workers``). ``resources_per_worker``
    None: Ray's default (1 CPU, or 1 GPU with ``use_gpu``). Fitting it again with the same ``where``
    resumes the run (Train V2 has no ``Trainer.restore``). ``callbacks``: Ray Train callbacks, e.g. Tune's.
    """
    loop = {"config": cfg.to_dict(), "where": where, "flatness": flatness, "diverged_as_status": diverged_as_status}
    scaling = ScalingConfig(
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources_per_worker,
        elastic_resize_monitor_interval_s=resize_interval_s,
    )
    return TorchTrainer(
        train_worker,
        train_loop_config=loop,
        scaling_config=scaling,
        run_config=RunConfig(
            name=where.name,
            storage_path=where.storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=callbacks,
        ),
    )
