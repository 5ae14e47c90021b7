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
import yaml
from tqdm import tqdm

from . import distributed
from .backends import build_backend, check_launch
from .bn import recalibrate_bn
from .checkpoint import load_checkpoint_file, load_latest, save_checkpoint
from .config import Config, dump_config
from .data import Dataset, GlobalBatches, augment_images, load_dataset
from .errors import ConfigError, NonFiniteError
from .methods import build_method
from .metrics import MetricsWriter
from .models import build_model
from .optimizers import build_optimizer, lr_at
from .seeding import seed_initial_weights

# Keys that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_DIFFERENCES = {
    ("train", "progress"),
    ("train", "crash_at_step"),
    ("train", "nan_at_step"),
    ("train", "num_threads"),
    ("train", "keep_checkpoints"),
    ("train", "log_every"),
}

# Called on every rank at each checkpoint: (metrics, checkpoint path on rank 0 else None).
CheckpointHook = Callable[[dict[str, Any], "Path | None"], None]


def _config_differences(saved: dict, current: dict, prefix: tuple = ()) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        path = prefix + (key,)
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, path)
        elif a != b and path not in RESUMABLE_DIFFERENCES:
            diffs.append(f"{'.'.join(path)}: {a!r} -> {b!r}")
    return diffs


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run directory that holds a different experiment."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diffs = _config_differences(saved, cfg.to_dict())
    if diffs:
        raise ConfigError(
            f"--run-dir {run_dir}: holds a run with a different configuration ({'; '.join(diffs[:3])}); "
            "use a new --run-dir, or the same settings to resume"
        )


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, ctx: distributed.DistContext, resume_from: Path | None = None):
        self.cfg, self.run_dir, self.ctx = cfg, Path(run_dir), ctx
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        check_launch(cfg, ctx.world_size)
        check_run_dir(cfg, self.run_dir)
        self.data: Dataset = load_dataset(cfg.data)
        self.batches = GlobalBatches(len(self.data.y_train), cfg.data.batch_size, cfg.seed, ctx.rank, ctx.world_size)
        steps = cfg.train.epochs * self.batches.steps_per_epoch
        self.total_steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps

        seed_initial_weights(cfg.seed)  # identical initial weights on every rank and for every world size
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes).to(ctx.device)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.backend = build_backend(cfg, self.model, self.optimizer, ctx.world_size)
        self.method = build_method(cfg, self.backend.model, ctx.rank, ctx.world_size, self.total_steps)
        self.step = 0
        self.skipped = 0
        self._resume(resume_from)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.backend.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "world_size": self.ctx.world_size,
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(self.cfg.to_dict()),
        }

    def _resume(self, resume_from: Path | None) -> None:
        found = load_latest(self.run_dir, map_location=self.ctx.device)
        if found is None and resume_from is not None:
            found = load_checkpoint_file(resume_from, map_location=self.ctx.device), resume_from
        if found is None:
            return
        state, path = found
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
            offset = self.ctx.rank * self.batches.local_batch
            x = augment_images(x, self.cfg.seed, step, offset, self.batches.global_batch)
        return x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Each rank scores a strided shard of the test set; sums are all-reduced."""
        model = self.backend.model
        was_training = model.training
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
        for start in range(0, len(y_all), self.cfg.data.eval_batch_size):
            x = x_all[start : start + self.cfg.data.eval_batch_size].to(self.ctx.device)
            y = y_all[start : start + self.cfg.data.eval_batch_size].to(self.ctx.device)
            with self.backend.autocast():
                logits = model(self.backend.cast_input(x))
            totals[0] += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
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
    def fit(self, on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
        cfg, main = self.cfg, self.ctx.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        log = StepLog(MetricsWriter(self.run_dir, self.step) if main else None)
        spe = self.batches.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (main and cfg.train.progress), unit="step")
        record: dict[str, Any] = {}
        streak = 0  # consecutive skipped steps
        start = time.perf_counter()
        try:
            while self.step < self.total_steps:
                self._maybe_crash()
                lr = lr_at(cfg.optim, cfg.data.batch_size, self.step, self.total_steps)
                self.backend.set_lr(lr)
                x, y = self.local_batch(self.step)
                if cfg.train.nan_at_step == self.step + 1 and main:
                    x = torch.full_like(x, float("nan"))
                self.model.train()
                result = self.backend.train_step(self.method, x, y, self.step)
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
                    log.read()  # raises on a non-finite gradient: before an evaluation or a checkpoint sees it
                    if evaluate:
                        record.update(self.evaluate())
                    log.write()
                if evaluate:
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['test_acc']:.3f}")
                bar.update(1)
                if checkpoint:
                    self._checkpoint(record, on_checkpoint)
        except NonFiniteError as exc:
            log.drain()  # the steps before the failure still reach metrics.jsonl
            if main:
                step = exc.step if exc.step is not None else self.step
                (self.run_dir / "nonfinite.json").write_text(json.dumps({"step": step, "last": log.last}) + "\n")
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
        return {"run_dir": str(self.run_dir), "step": self.step, **final}

    def _checkpoint(self, record: dict[str, Any], hook: CheckpointHook | None) -> None:
        path = None
        # A backend with sharded state (DeepSpeed ZeRO 1/2) gathers it collectively: every rank calls in.
        state = self.state_dict() if self.ctx.is_main or getattr(self.backend, "collective_state_dict", False) else None
        if self.ctx.is_main:
            path = save_checkpoint(self.run_dir, state, self.step, self.cfg.train.keep_checkpoints)
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

    def read(self) -> None:
        """Floats for every pending record (one host sync); at a non-finite gradient norm of a step that
        was not skipped, write the records before it and raise."""
        values = iter(
            read_scalars([v for record, _ in self.pending for v in (record["train_loss"], record["grad_norm"])])
        )
        for i, (record, skipped) in enumerate(self.pending):
            record["train_loss"], record["grad_norm"] = next(values), next(values)
            norm = record["grad_norm"]
            if not skipped and norm is not None and not math.isfinite(norm):
                self.pending = self.pending[:i]
                self.write()
                step = record["step"] - 1
                raise NonFiniteError(f"non-finite gradient norm ({norm}) at step {step}", step=step)

    def write(self) -> None:
        """Write the pending records (after ``read``)."""
        for record, _ in self.pending:
            if self.writer is not None:
                self.writer.write(record)
            self.last = record
        self.pending = []

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


def train(
    cfg: Config, run_dir: Path, on_checkpoint: CheckpointHook | None = None, resume_from: Path | None = None
) -> dict[str, Any]:
    """Set up the process group (unless the launcher did), train, and always tear down."""
    ctx = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, run_dir, ctx, resume_from).fit(on_checkpoint)
    finally:
        distributed.teardown(ctx)
