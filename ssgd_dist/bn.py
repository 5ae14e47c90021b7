"""Every BatchNorm concern in one place: which layers track statistics, snapshots, freezing, recalibration.

S-SGD's passes see perturbed weights and (``full``, SAM) the same samples twice, so the running
statistics need care a plain training loop never takes: a pass may be frozen, a skipped step rolls
its statistics back, and evaluation may recompute them at the unperturbed weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .distributed import all_reduce_sum
from .seeding import Stream, generator

BNState = list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]]


def tracking_bn_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_snapshot(model: nn.Module) -> BNState:
    """Copies of every BatchNorm layer's running statistics (small: two vectors and a counter each)."""
    return [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in tracking_bn_layers(model)
    ]


def bn_restore(saved: BNState) -> None:
    with torch.no_grad():
        for m, mean, var, count in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)


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
