"""Every BatchNorm concern in one place: the three ``model.bn_mode``s, snapshots, freezing, recalibration.

S-SGD's passes see perturbed weights and (``full``, SAM) the same samples twice, so the running
statistics need care a plain training loop never takes: a pass may be frozen, a skipped step rolls
its statistics back, and evaluation may recompute them at the unperturbed weights.

``bn_mode`` decides which samples a forward normalises together:

- ``local``: each rank its own (micro-)batch, torch's BatchNorm. Parameters depend on the world size.
- ``sync``: every rank's samples of the same forward (one pass of one micro-step), by an all-reduce of
  the per-channel sums that gradients flow through. World-size invariant at a fixed number of
  micro-steps, since micro-batches are laid out micro-step first, then ranks.
- ``ghost``: fixed virtual batches of ``model.bn_ghost_batch`` consecutive samples of the global batch
  (Hoffer et al. 2017), whatever the ranks and micro-steps: invariant in both.

Running statistics must describe every rank's samples when they are read (evaluation, checkpoint), so
``synchronize_running_stats`` runs on every rank first. DDP must not broadcast rank 0's buffers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .distributed import all_reduce_sum
from .seeding import Stream, generator

BNState = list[tuple[nn.Module, dict[str, torch.Tensor]]]


class _ManagedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training statistics this module computes itself; any input with channels in dim 1.

    Same parameters and buffers as torch's BatchNorm (checkpoints load into either); inference and
    ``standard_statistics`` use torch's own path.
    """

    standard = False  # set by ``standard_statistics``: behave exactly like torch's BatchNorm

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (batch, channels, ...), got {input.dim()}-D")

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps), then the affine map; ``mean`` and ``var`` broadcast over x."""
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = (-1,) + (1,) * (x.dim() - channel_dim - 1)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standard or not self.training:
            return super().forward(x)
        return self.train_forward(x)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the gradients: every rank's loss reaches
    every rank's activations through shared statistics."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


class SyncBatchNorm(_ManagedBatchNorm):
    """Statistics over every rank's samples of this forward; runs on CPU with gloo as well as on GPUs.

    (torch's own SyncBatchNorm refuses CPU tensors.) One all-reduce of [sum, sum of squares, count] per
    layer and forward; its backward all-reduces the gradient of those sums, so each rank's activations
    get the gradient of every rank's loss, as one process with the whole batch would compute.
    """

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        dims = [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        if dist.is_initialized() and dist.get_world_size() > 1:
            stats = _AllReduceSum.apply(stats)
        channels = x.shape[1]
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self._normalize(xf, mean.view(shape), var.view(shape), channel_dim=1).to(x.dtype)


class GhostBatchNorm(_ManagedBatchNorm):
    """Ghost BatchNorm: each run of ``ghost_batch`` consecutive samples is normalised on its own.

    Running statistics take one update per optimizer step, with the mean of that step's ghost-batch
    statistics over all ranks and micro-steps, so they do not depend on either. Between two
    ``synchronize_running_stats`` each rank accumulates its share (``pending``) and the decay of the
    old value (``decay``) locally: no communication during training.
    """

    def __init__(self, num_features: int, ghost_batch: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.ghost_batch = ghost_batch
        # This step's sums of ghost-batch means and unbiased variances, and how many ghost batches.
        self.register_buffer("step_sums", torch.zeros(2, num_features), persistent=False)
        self.register_buffer("step_batches", torch.zeros(()), persistent=False)
        # Since the last synchronisation: running = decay * running + sum over ranks of pending.
        self.register_buffer("pending", torch.zeros(2, num_features), persistent=False)
        self.register_buffer("decay", torch.ones(()), persistent=False)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        n, g = x.shape[0], self.ghost_batch
        if n % g:
            raise ValueError(f"model.bn_ghost_batch = {g}: a forward of {n} samples does not split into ghost batches")
        xg = x.float().reshape(n // g, g, *x.shape[1:])
        dims = [1, *range(3, xg.dim())]
        mean = xg.mean(dims)
        var = xg.var(dims, unbiased=False)
        shape = (n // g, 1, -1) + (1,) * (x.dim() - 2)
        y = self._normalize(xg, mean.view(shape), var.view(shape), channel_dim=2).reshape(x.shape)
        if self.track_running_stats:
            per_batch = g * math.prod(x.shape[2:])
            with torch.no_grad():
                self.step_sums[0] += mean.detach().sum(0)
                self.step_sums[1] += var.detach().sum(0) * per_batch / max(1, per_batch - 1)
                self.step_batches += n // g
        return y.to(x.dtype)

    @torch.no_grad()
    def end_step(self, world_size: int) -> None:
        """Fold this step's statistics into the pending update (every rank saw as many ghost batches)."""
        if not self.track_running_stats or float(self.step_batches) == 0:
            return
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.pending.mul_(1 - momentum).add_(self.step_sums / (self.step_batches * world_size), alpha=momentum)
        self.decay.mul_(1 - momentum)
        self.step_sums.zero_()
        self.step_batches.zero_()

    @torch.no_grad()
    def settle(self) -> None:
        """Running statistics = decayed old value + every rank's pending share (a collective)."""
        pending = all_reduce_sum(self.pending.clone()) if dist.is_initialized() else self.pending
        self.running_mean.mul_(self.decay).add_(pending[0].to(self.running_mean.dtype))
        self.running_var.mul_(self.decay).add_(pending[1].to(self.running_var.dtype))
        self.pending.zero_()
        self.decay.fill_(1.0)


def convert_batchnorm(model: nn.Module, mode: str, ghost_batch: int | None = None) -> nn.Module:
    """Replace torch's BatchNorm layers for ``bn_mode`` ``sync`` or ``ghost`` (``local`` keeps them), in place."""
    if mode == "local":
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, _ManagedBatchNorm):
            kwargs = dict(
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            if mode == "ghost":
                new: nn.Module = GhostBatchNorm(child.num_features, ghost_batch, **kwargs)
            else:
                new = SyncBatchNorm(child.num_features, **kwargs)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_batchnorm(child, mode, ghost_batch)
    return model


def end_step(model: nn.Module) -> None:
    """After all passes of an optimizer step: ghost layers take their one running-statistics update."""
    world = _world()[1]
    for m in model.modules():
        if isinstance(m, GhostBatchNorm):
            m.end_step(world)


@torch.no_grad()
def synchronize_running_stats(model: nn.Module) -> None:
    """Make every rank's running statistics cover every rank's samples; call on all ranks before reading them.

    ``local`` layers (each rank saw only its own samples) are averaged over the ranks; ``ghost`` layers
    fold in every rank's pending share; ``sync`` layers are identical on every rank already.
    """
    world = _world()[1]
    for m in tracking_bn_layers(model):
        if isinstance(m, GhostBatchNorm):
            m.settle()
        elif not isinstance(m, SyncBatchNorm) and world > 1:
            for buf in (m.running_mean, m.running_var):
                all_reduce_sum(buf).div_(world)


@contextlib.contextmanager
def standard_statistics(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm layer behaves as torch's own (each forward's local statistics), e.g. to recalibrate."""
    managed = [m for m in model.modules() if isinstance(m, _ManagedBatchNorm)]
    for m in managed:
        m.standard = True
    try:
        yield
    finally:
        for m in managed:
            m.standard = False


def tracking_bn_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_snapshot(model: nn.Module) -> BNState:
    """Copies of every BatchNorm layer's buffers (running statistics and pending sums: a few vectors each)."""
    return [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in tracking_bn_layers(model)]


def bn_restore(saved: BNState) -> None:
    with torch.no_grad():
        for m, buffers in saved:
            for name, value in buffers.items():
                getattr(m, name).copy_(value)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, frozen: bool) -> Iterator[None]:
    """Keep BatchNorm running statistics as they are for a pass that sees samples a second time."""
    if not frozen:
        yield
        return
    saved = bn_snapshot(model)
    try:
        yield
    finally:
        bn_restore(saved)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x_train: torch.Tensor, samples: int, batch_size: int, seed: int = 0) -> bool:
    """Recompute BatchNorm running statistics at the current weights (no noise).

    Statistics are reset, then accumulated as an equal-weight average (``momentum=None``) over
    forward passes in train mode on ``samples`` training examples (a fixed seeded subset, no
    augmentation), each rank on a strided shard; ranks then average their statistics so every replica
    holds the same buffers. Returns False when the model has no BatchNorm with running statistics.
    """
    bns = tracking_bn_layers(model)
    if not bns:
        return False
    rank, world = _world()
    param = next(model.parameters())
    device, dtype = (
        param.device,
        (param.dtype if x_train.is_floating_point() else x_train.dtype),
    )  # bf16 weights: bf16 inputs
    gen = generator(Stream.BN_RECALIBRATE, seed)
    idx = torch.randperm(len(x_train), generator=gen)[: min(samples, len(x_train))][rank::world]
    x = x_train[idx]
    chunk = max(1, min(batch_size, len(x)))
    usable = (len(x) // chunk) * chunk  # equal chunks: the running average weighs every sample equally
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        with standard_statistics(model):
            for start in range(0, usable, chunk):
                model(x[start : start + chunk].to(device, dtype))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    if world > 1:
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                all_reduce_sum(buf).div_(world)
    return True
