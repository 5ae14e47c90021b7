"""Running a method's passes: the part every backend shares.

A backend decides three things only: which module forwards, how a pass's gradients are held back
from synchronisation (all passes but the last), and how the optimizer steps. Everything else (which
weights, which samples, which loss weights) comes from the method, so all backends run the same
algorithm.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..bn import bn_restore, bn_snapshot, end_step, frozen_bn_stats
from ..config import Config
from ..methods import Method, select_part
from ..noise import whole


@dataclass
class StepResult:
    """What a step reports. ``loss`` and ``grad_norm`` may be device tensors: reading one is a host
    sync, so the trainer reads a window of steps at once (``train.log_every``). Under
    ``on_nonfinite: stop`` a non-finite ``grad_norm`` is the caller's signal to stop (None: not
    computed, the backend decided itself); ``skipped`` is decided on the host only where a step can
    be skipped."""

    loss: torch.Tensor | float
    grad_norm: torch.Tensor | float | None
    skipped: bool


class Backend:
    """Local single-process execution; subclasses add gradient synchronisation."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str = "fp32",
        clip_grad_norm: float | None = None,
        on_nonfinite: str = "stop",
        micro_steps: int = 1,
    ):
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        self.on_nonfinite = on_nonfinite
        self.micro_steps = micro_steps
        device_type = next(model.parameters()).device.type
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    @classmethod
    def check_config(cls, cfg: Config, method: type[Method]) -> None:
        """Refuse (``ConfigError``) what this backend cannot run; called by ``backends.check_launch``."""

    @classmethod
    def from_config(cls, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer) -> Backend:
        return cls(
            model,
            optimizer,
            precision=cfg.train.precision,
            clip_grad_norm=cfg.optim.clip_grad_norm,
            on_nonfinite=cfg.train.on_nonfinite,
            micro_steps=cfg.train.accumulation_steps,
        )

    # -- hooks a distributed backend overrides -------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The module to call forward on (a DDP wrapper, an engine, or the model itself)."""
        return self.model

    def sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Around each pass: holds gradient synchronisation back on all passes but the last."""
        return contextlib.nullcontext()

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as the module takes them; autocast does the mixed-precision casting here."""
        return x

    def step_scope(self) -> contextlib.AbstractContextManager:
        """Around all passes of a step (DeepSpeed ZeRO-2 coalesces its reductions here)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def can_skip(self) -> bool:
        """Whether a step may be skipped: ``on_nonfinite: skip``, or fp16, where GradScaler skips overflows."""
        return self.on_nonfinite == "skip" or self.scaler is not None

    def clipped_norm(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Clip once (on the synced gradient); return the norm and whether to skip the step.

        Nothing is read back to the host unless a step can be skipped: the norm stays on the device,
        so the CPU queues the next step while the accelerator still runs this one (the trainer reads
        it later). A skip is decided on the host: one sync per step. The gradient is identical on
        every rank, so every rank decides alike.
        """
        if self.clip_grad_norm is None:  # the norm only: scaling every gradient by 1.0 costs a pass over them
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        norm = whole(norm.detach())  # sharded gradients (FSDP2): the norm over every shard
        return norm, self.can_skip and not bool(torch.isfinite(norm))

    def optimizer_step(self) -> StepResult:
        """Unscale once, clip once, step once (or skip)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm, skipped = self.clipped_norm(params)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself when either pass overflowed
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()  # under ``stop`` a non-finite norm is seen by the trainer, before any checkpoint
        self.zero_grad()
        return StepResult(loss=float("nan"), grad_norm=norm, skipped=skipped)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        """Model and optimizer state, gathered as plain tensors (rank 0's copy is the checkpoint)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    # Whether this run's checkpoints are sharded directories (``save_sharded``) rather than plain files.
    sharded_checkpoints = False
    # Whether ``state_dict`` is a collective (sharded state gathered): every rank must call it, in step.
    collective_state_dict = False

    def save_sharded(self, path: Path) -> dict:
        """Write this rank's shards into ``path`` (a collective); return the plain rest rank 0 keeps beside them."""
        raise NotImplementedError(f"{type(self).__name__} writes plain checkpoints only")

    def load_sharded(self, path: Path, meta: dict) -> dict:
        """Load the sharded checkpoint ``path`` (with its plain part ``meta``) into the model and optimizer
        (a collective); return the loaded state as a checkpoint dict for ``load_state_dict``."""
        raise NotImplementedError("a sharded checkpoint (torch.distributed.checkpoint) is read only with backend=fsdp")

    # -- the shared algorithm --------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def train_step(
        self, method: Method, x: torch.Tensor, y: torch.Tensor, step: int, loss_fn=nn.functional.cross_entropy
    ) -> StepResult:
        """One optimizer step on this rank's batch ``x, y``, cut into ``micro_steps`` micro-batches.

        Pass-major: each pass places the weights once and runs every micro-batch, so the noise is the
        same for all micro-steps and a pass can read the whole step's gradient of the one before (SAM).
        Every backward but the very last holds its gradients back from synchronisation.
        """
        passes, k = method.passes(), self.micro_steps
        micro = list(zip(x.chunk(k), y.chunk(k), strict=True))
        loss_sum = torch.zeros((), device=x.device)
        # Only a step that can be skipped needs a way back: a skipped one must not leave NaN statistics.
        bn_before = bn_snapshot(self.model) if self.can_skip else []
        try:
            with self.step_scope():
                for index, p in enumerate(passes):
                    method.before_pass(index, step)
                    for j, (xm, ym) in enumerate(micro):
                        last = index == len(passes) - 1 and j == k - 1
                        with self.sync_context(last), frozen_bn_stats(self.model, not p.update_bn):
                            with self.autocast():
                                logits = self.module(self.cast_input(select_part(xm, p.part)))
                                loss = loss_fn(logits.float(), select_part(ym, p.part))
                            self.backward(loss * (p.loss_weight / k))
                        loss_sum += loss.detach().float()
        finally:
            method.restore()  # weight decay, momentum and the LR act on w, never on w +- n
        end_step(self.model)
        result = self.optimizer_step()
        if result.skipped:
            bn_restore(bn_before)
        result.loss = loss_sum / (len(passes) * k)
        return result
