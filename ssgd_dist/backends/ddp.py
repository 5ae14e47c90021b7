"""DistributedDataParallel: every pass but the last runs under ``no_sync()``, so one all-reduce per step.

Pass 1's forward *and* backward must both sit inside ``no_sync()``: DDP decides at forward time
whether the coming backward reduces. ``static_graph`` stays off because it breaks ``no_sync`` on
torch 2.13 (an internal assert on the first backward after entering it).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Backend


class DDPBackend(Backend):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        device = next(model.parameters()).device
        device_ids = [device] if device.type == "cuda" else None
        # No buffer broadcast: rank 0's BatchNorm statistics must not overwrite the others' (bn.py
        # synchronises them before they are read); under bn_mode sync or ghost they never differ in use.
        self.ddp = DistributedDataParallel(model, device_ids=device_ids, static_graph=False, forward_sync_buffers=False)

    @property
    def module(self) -> nn.Module:
        return self.ddp

    def sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()
