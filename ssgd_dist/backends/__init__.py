"""Backends run a method's passes with gradient sync on the last pass only, then step."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from .base import Backend, StepResult


def resolve_backend_name(cfg: Config, world_size: int) -> str:
    if cfg.backend == "auto":
        return "ddp" if world_size > 1 else "local"
    if cfg.backend == "local" and world_size > 1:
        raise ConfigError(
            f"backend = local with {world_size} ranks would train {world_size} unsynchronised copies; "
            "use backend=ddp (or auto)"
        )
    return cfg.backend


def build_backend(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int) -> Backend:
    kwargs = dict(
        precision=cfg.train.precision, clip_grad_norm=cfg.optim.clip_grad_norm, on_nonfinite=cfg.train.on_nonfinite
    )
    name = resolve_backend_name(cfg, world_size)
    if name == "ddp":
        from .ddp import DDPBackend

        return DDPBackend(model, optimizer, **kwargs)
    if name == "deepspeed":
        from .deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, model, optimizer, **kwargs)
    from .local import LocalBackend

    return LocalBackend(model, optimizer, **kwargs)


__all__ = ["Backend", "StepResult", "build_backend", "resolve_backend_name"]
