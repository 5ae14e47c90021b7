"""The training loop: backend-agnostic, resumable, the same under torchrun, Ray and alone.

Single node, 2 workers:   torchrun --nproc_per_node=2 -m ssgd_dist.cli train --config quickstart
Two nodes, 8 GPUs each:   torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \
                              --master_addr=$HEAD --master_port=29500 -m ssgd_dist.cli train --config X

Everything that varies per step (data order, noise, learning rate) is a pure function of
(seed, step), so the state to checkpoint is the weights, the optimizer and the step counter.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import distributed
from .backends import build_backend, check_launch
from .bn import convert_batchnorm, recalibrate_bn, synchronize_running_stats
from .checkpoint import (
    find_latest,
    prepare_staging,
    publish_sharded,
    read_sharded_meta,
    save_checkpoint,
    staging_path,
    try_candidate,
)
from .config import Config, dump_config
from .data import Dataset, GlobalBatches, augment_images, load_dataset
from .errors import ConfigError, NonFiniteError, Stopped
from .files import atomic_write_text
from .methods import build_method
from .metrics import MetricsWriter
from .models import build_loss, build_model
from .noise import held
from .optimizers import build_optimizer, lr_at
from .rundir import RunLock, check_run_dir, checkpoint_problem
from .seeding import seed_initial_weights
from .signals import StopOnSignals

# Called on every rank at each checkpoint: (metrics, checkpoint path on rank 0 else None).
CheckpointHook = Callable[[dict[str, Any], "Path | None"], None]
# Called on every rank once per written log window: (its records, whether a checkpoint follows at its last step).
LogHook = Callable[[list[dict[str, Any]], bool], None]


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, ctx: distributed.DistContext, resume_from: Path | None = None):
        self.cfg, self.run_dir, self.ctx = cfg, Path(run_dir), ctx
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        check_launch(cfg, ctx.world_size, process_group=torch.distributed.is_initialized())
        check_run_dir(cfg, self.run_dir)
        self.data: Dataset = load_dataset(cfg.data)
        self.batches = GlobalBatches(
            len(self.data.y_train),
            cfg.data.batch_size,
            cfg.seed,
            ctx.rank,
            ctx.world_size,
            micro_steps=cfg.train.accumulation_steps,
            micro_major=cfg.model.bn_mode == "sync",
        )
        steps = cfg.train.epochs * self.batches.steps_per_epoch
        self.total_steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps

        seed_initial_weights(cfg.seed)  # identical initial weights on every rank and for every world size
        model = build_model(cfg.model, self.data.input_shape, self.data.num_classes)
        self.loss_fn = build_loss(cfg.train.loss)
        self.model = convert_batchnorm(model, cfg.model.bn_mode, cfg.model.bn_ghost_batch).to(ctx.device)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.backend = build_backend(cfg, self.model, self.optimizer, ctx.world_size)
        self.method = build_method(cfg, self.backend.model, ctx.rank, ctx.world_size, self.total_steps)
        self.step = 0
        self.skipped = 0
        self._resume(resume_from)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**self.backend.state_dict(), **self.run_state()}

    def run_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the model and the optimizer."""
        return {
            "step": self.step,
            "skipped": self.skipped,
            "world_size": self.ctx.world_size,
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(self.cfg.to_dict()),
        }

    def _read_sharded(self, path: Path) -> dict[str, Any]:
        meta = read_sharded_meta(path)
        return {**meta, **self.backend.load_sharded(path, meta)}

    def _resume(self, resume_from: Path | None) -> None:
        """Resume from the newest checkpoint of this run (``rundir.checkpoint_problem`` turns down the
        others), else from ``resume_from`` (a launcher's copy); refuse if there were checkpoints but none of
        them can be resumed (starting over would drop the run's metrics)."""
        model_state = self.backend.model.state_dict()

        def accept(state: dict[str, Any]) -> str | None:
            return checkpoint_problem(state, self.cfg, model_state)

        found = find_latest(self.run_dir, self.ctx.device, accept, self._read_sharded)
        state, path = found.state, found.path
        if state is None and resume_from is not None:
            state, reason = try_candidate(Path(resume_from), None, self.ctx.device, accept, self._read_sharded)
            if state is None:
                found.skipped.append((Path(resume_from), reason))
            path = resume_from
        if state is None:
            if found.skipped:
                why = "; ".join(f"{p.name}: {reason[:200]}" for p, reason in found.skipped)
                raise ConfigError(
                    f"--run-dir {self.run_dir}: it holds checkpoints but none can be resumed ({why}); to start "
                    f"over, move {self.run_dir / 'checkpoints'} and {self.run_dir / 'metrics.jsonl'} away, "
                    "or use another --run-dir"
                )
            return
        self.backend.load_state_dict(state)
        self.step, self.skipped = int(state["step"]), int(state.get("skipped", 0))
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.ctx.is_main:
            print(f"ssgd-dist: resumed from {path} at step {self.step}/{self.total_steps}", flush=True)

    # -- pieces of a step ----------------------------------------------------------------------------
    def local_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batches.local_indices(step)
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if self.data.augment:
            x = augment_images(x, self.cfg.seed, step, self.batches.positions, self.batches.global_batch)
        return x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Each rank scores a strided shard of the test set; sums are all-reduced. The running statistics are
        made to cover every rank's samples first, so every world size scores the model a checkpoint holds."""
        model = self.backend.model
        was_training = model.training
        synchronize_running_stats(model)
        if self.cfg.train.bn_recalibrate:
            recalibrate_bn(
                model,
                self.data.x_train,
                self.cfg.train.bn_recalibrate_samples,
                self.cfg.data.eval_batch_size,
                self.cfg.seed,
            )
        model.eval()
        x_all, y_all = (
            self.data.x_test[self.ctx.rank :: self.ctx.world_size],
            self.data.y_test[self.ctx.rank :: self.ctx.world_size],
        )
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        # The same number of forwards on every rank (a short slice ends with empty batches): a sharded
        # model gathers its weights collectively at every forward.
        longest = math.ceil(len(self.data.y_test) / self.ctx.world_size)
        for start in range(0, longest, self.cfg.data.eval_batch_size):
            x = x_all[start : start + self.cfg.data.eval_batch_size].to(self.ctx.device)
            y = y_all[start : start + self.cfg.data.eval_batch_size].to(self.ctx.device)
            with self.backend.autocast():
                logits = model(self.backend.cast_input(x))
            if len(y):  # an empty batch only keeps the forwards in step; its mean loss would be NaN
                totals[0] += self.loss_fn(logits.float(), y).double() * len(y)
                totals[1] += (logits.argmax(1) == y).sum()
                totals[2] += len(y)
        distributed.all_reduce_sum(totals)
        model.train(was_training)
        return {"test_loss": float(totals[0] / totals[2]), "test_acc": float(totals[1] / totals[2])}

    def _maybe_crash(self) -> None:
        """Testing only: one rank dies abruptly, once, to exercise restarts."""
        at = self.cfg.train.crash_at_step
        if at is None or self.step + 1 != at or self.ctx.rank != self.ctx.world_size - 1:
            return
        marker = self.run_dir / f".crash-injected-{at}"
        if marker.exists():
            return
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, on_checkpoint: CheckpointHook | None = None, on_log: LogHook | None = None) -> dict[str, Any]:
        cfg, main = self.cfg, self.ctx.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
        log = StepLog(MetricsWriter(self.run_dir, self.step) if main else None)
        spe = self.batches.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (main and cfg.train.progress), unit="step")
        record: dict[str, Any] = {}
        streak = 0  # consecutive skipped steps
        start, start_step = time.perf_counter(), self.step
        try:
            while self.step < self.total_steps:
                self._maybe_crash()
                lr = lr_at(cfg.optim, cfg.data.batch_size, self.step, self.total_steps)
                self.backend.set_lr(lr)
                x, y = self.local_batch(self.step)
                if cfg.train.nan_at_step == self.step + 1 and main:
                    x = torch.full_like(x, float("nan"))
                self.model.train()
                result = self.backend.train_step(self.method, x, y, self.step, loss_fn=self.loss_fn)
                if result.skipped:
                    self.skipped += 1
                    streak += 1
                    # GradScaler overflows are part of normal fp16 training; there only a run of them means divergence.
                    counted = streak if self.backend.scaler is not None else self.skipped
                    if counted > cfg.train.max_skips:
                        raise NonFiniteError(
                            f"{counted} steps skipped for non-finite gradients "
                            f"(train.max_skips = {cfg.train.max_skips})"
                        )
                else:
                    streak = 0
                self.step += 1
                record = {
                    "step": self.step,
                    "epoch": self.step / spe,
                    "train_loss": result.loss,
                    "lr": lr,
                    "alpha": self.method.alpha(self.step - 1),
                    "grad_norm": result.grad_norm,
                    "skipped": self.skipped,
                    "time": time.perf_counter() - start,
                }
                log.add(record, result.skipped)
                epoch_end = self.step % spe == 0
                evaluate = (
                    epoch_end and (self.step // spe) % cfg.train.eval_every == 0
                ) or self.step == self.total_steps
                every = cfg.train.checkpoint_every
                checkpoint = (self.step % every == 0 if every else epoch_end) or self.step == self.total_steps
                if evaluate or checkpoint or len(log) >= cfg.train.log_every:
                    # Raises on a non-finite gradient or weights: before an evaluation or a checkpoint sees them.
                    log.read(self.weights_finite())
                    if evaluate:
                        record.update(self.evaluate())
                    written = log.write()
                    if on_log is not None:
                        on_log(written, checkpoint)
                if evaluate:
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['test_acc']:.3f}")
                bar.update(1)
                if checkpoint:
                    self._checkpoint(record, on_checkpoint)
        except NonFiniteError as exc:
            log.drain()  # the steps before the failure still reach metrics.jsonl
            if main:
                step = exc.step if exc.step is not None else self.step
                atomic_write_text(self.run_dir / "nonfinite.json", json.dumps({"step": step, "last": log.last}) + "\n")
            # Every rank stops at the same step (the decision rests on synchronised values). Leave
            # together: a launcher stops the other ranks as soon as one exits, rank 0's diagnostic unwritten.
            distributed.barrier()
            raise
        finally:
            bar.close()
            log.close()
        if "test_acc" not in record:  # resumed a finished run: nothing trained, so score it now
            record = {"step": self.step, **self.evaluate()}
        final = {k: v for k, v in record.items() if k in ("step", "train_loss", "test_loss", "test_acc")}
        return {"run_dir": str(self.run_dir), "step": self.step, "start_step": start_step, **final}

    def weights_finite(self) -> torch.Tensor:
        """One device flag: whether every floating-point tensor of the model is finite on every rank (queued,
        not read: ``StepLog.read`` reads it with the window's scalars). Ranks can differ (per-rank BatchNorm
        statistics), so the flag is all-reduced: every rank stops together."""
        model = self.backend.model
        # The elements each rank holds (a shard under FSDP2 and ZeRO-3): nothing is gathered.
        tensors = [t for t in (*(held(p).local for p in model.parameters()), *model.buffers()) if t.is_floating_point()]
        bad = (~torch.stack([torch.isfinite(t).all() for t in tensors]).all()).float().reshape(1)
        distributed.all_reduce_sum(bad)
        return bad[0] == 0

    def _checkpoint(self, record: dict[str, Any], hook: CheckpointHook | None) -> None:
        path = None
        synchronize_running_stats(self.backend.model)  # a collective: the checkpoint holds every rank's statistics
        keep = self.cfg.train.keep_checkpoints
        if self.backend.sharded_checkpoints and self.step < self.total_steps:
            # Every rank writes its own shards; the run's last checkpoint is the plain file (below).
            staging = prepare_staging(self.run_dir, self.step) if self.ctx.is_main else None
            distributed.barrier()  # the staging directory exists, emptied, before anyone writes into it
            rest = self.backend.save_sharded(staging_path(self.run_dir, self.step))
            if self.ctx.is_main:
                path = publish_sharded(staging, {**self.run_state(), **rest}, keep)
        else:
            # A backend with sharded state (ZeRO 1/2, FSDP2) gathers it collectively: every rank calls in.
            state = self.state_dict() if self.ctx.is_main or self.backend.collective_state_dict else None
            if self.ctx.is_main:
                path = save_checkpoint(self.run_dir, state, self.step, keep)
        distributed.barrier()
        if hook is not None:
            hook(record, path)


class StepLog:
    """Per-step records whose loss and gradient norm are still on the device, read a window at a time.

    Reading a device scalar waits for the accelerator to finish everything queued so far; once per
    ``train.log_every`` steps (and before every evaluation and checkpoint) keeps the queue full.
    The same read finds a non-finite gradient under ``on_nonfinite: stop`` (the gradient is
    synchronised, so every rank finds it at the same step).
    """

    def __init__(self, writer: MetricsWriter | None):
        self.writer = writer
        self.pending: list[tuple[dict[str, Any], bool]] = []  # (record, whether its step was skipped)
        self.last: dict[str, Any] = {}  # the newest record written

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, record: dict[str, Any], skipped: bool) -> None:
        self.pending.append((record, skipped))

    def read(self, weights_finite: torch.Tensor | None = None) -> None:
        """Floats for every pending record, and the ``weights_finite`` flag, in one host sync. At a non-finite
        gradient norm of a step that was not skipped, write the records before it and raise. If the weights
        are not finite (an update overflowed although its gradient was finite), whatever the gradient
        policy: write the records before the window's last update and raise."""
        scalars = [v for record, _ in self.pending for v in (record["train_loss"], record["grad_norm"])]
        values = iter(read_scalars([*scalars, weights_finite]))
        for i, (record, skipped) in enumerate(self.pending):
            record["train_loss"], record["grad_norm"] = next(values), next(values)
            norm = record["grad_norm"]
            if not skipped and norm is not None and not math.isfinite(norm):
                self.pending = self.pending[:i]
                self.write()
                step = record["step"] - 1
                raise NonFiniteError(f"non-finite gradient norm ({norm}) at step {step}", step=step)
        finite = next(values)
        if finite is not None and not finite:
            updates = [i for i, (_, skipped) in enumerate(self.pending) if not skipped]
            i = updates[-1] if updates else len(self.pending) - 1
            step = self.pending[i][0]["step"] - 1
            self.pending = self.pending[:i]
            self.write()
            raise NonFiniteError(
                f"non-finite weights after the update of step {step} (its gradient norm was finite: the update "
                "itself overflowed)",
                step=step,
                hint="lower optim.lr (skipping steps cannot help here)",
            )

    def write(self) -> list[dict[str, Any]]:
        """Write the pending records (after ``read``); returns them."""
        written, self.pending = [record for record, _ in self.pending], []
        if written:
            if self.writer is not None:
                self.writer.write(written)
            self.last = written[-1]
        return written

    def drain(self) -> None:
        """After a failure elsewhere: write what can still be read."""
        try:
            self.read()
        except NonFiniteError:
            return
        self.write()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_scalars(values: list[torch.Tensor | float | None]) -> list[float | None]:
    """Floats from 0-dim tensors, floats and None (unknown), with one device-to-host copy for all the tensors."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        device = tensors[0].device
        read = iter(torch.stack([t.detach().double().reshape(()).to(device) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else None if v is None else float(v) for v in values]


def hold_run_dir(run_dir: Path, ctx: distributed.DistContext) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank learns whether it did (one all-reduce), so all of
    them refuse together (``ConfigError``, exit 2) when another run holds it. Returns rank 0's lock."""
    lock = RunLock(run_dir) if ctx.is_main else None
    refusal = lock.acquire() if lock is not None else None
    refused = torch.tensor([1.0 if refusal else 0.0], device=ctx.device)
    distributed.all_reduce_sum(refused)
    if float(refused) > 0:
        raise ConfigError(refusal or f"--run-dir {run_dir}: another run is using it (rank 0 found it locked)")
    return lock


def train(
    cfg: Config,
    run_dir: Path,
    on_checkpoint: CheckpointHook | None = None,
    resume_from: Path | None = None,
    on_log: LogHook | None = None,
) -> dict[str, Any]:
    """Set up the process group (unless the launcher did), hold the run directory, train, and always release
    and tear down. SIGINT/SIGTERM raise ``Stopped`` (exit 128 + signal); the run resumes from its last
    checkpoint."""
    with StopOnSignals() as stop:
        try:
            ctx = distributed.setup(cfg.device)
            try:
                check_launch(
                    cfg, ctx.world_size, process_group=torch.distributed.is_initialized()
                )  # a launch mistake is refused before the lock touches the disk
                lock = hold_run_dir(Path(run_dir), ctx)
                try:
                    return Trainer(cfg, run_dir, ctx, resume_from).fit(on_checkpoint, on_log)
                finally:
                    if lock is not None:
                        lock.release()
            finally:
                distributed.teardown(ctx)
        except BaseException as exc:
            # A signal can surface as another error first (a peer that stopped breaks a collective).
            if stop.signum is not None and not isinstance(exc, Stopped):
                raise Stopped(stop.signum) from None
            raise
