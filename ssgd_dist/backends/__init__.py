"""Backends run a method's passes with gradient sync on the last pass only, then step.

``check_launch`` is the one home of every rule that depends on how a run is launched (the number of
ranks, the backend): the trainer calls it before anything is written, and launchers call it to fail
before they start workers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..methods import method_class
from .base import Backend, StepResult


def resolve_backend_name(cfg: Config, world_size: int) -> str:
    if cfg.backend == "auto":
        return "ddp" if world_size > 1 else "local"
    return cfg.backend


def backend_class(cfg: Config, world_size: int) -> type[Backend]:
    name = resolve_backend_name(cfg, world_size)
    if name == "ddp":
        from .ddp import DDPBackend

        return DDPBackend
    if name == "deepspeed":
        from .deepspeed import DeepSpeedBackend  # DeepSpeed itself is imported only when an engine is built

        return DeepSpeedBackend
    if name == "fsdp":
        from .fsdp import FSDPBackend

        return FSDPBackend
    from .local import LocalBackend

    return LocalBackend


def check_launch(cfg: Config, world_size: int, *, process_group: bool = True) -> None:
    """Refuse (``ConfigError``, exit 2) a config that cannot run on ``world_size`` ranks or on its backend.

    ``process_group``: whether the ranks are (or will be) in a torch.distributed group; a trainer passes
    ``dist.is_initialized()``, launchers (torchrun, Ray Train) leave the default, as they create one.
    """
    if cfg.backend in ("ddp", "fsdp") and world_size == 1 and not process_group:
        raise ConfigError(
            f"backend = {cfg.backend} in a single process (WORLD_SIZE unset or 1, no process group): launch the ranks "
            "with torchrun (`torchrun --nproc_per_node=N -m ssgd_dist.cli train ...`), or use backend=local (or auto)"
        )
    if cfg.backend == "local" and world_size > 1:
        raise ConfigError(
            f"backend = local with {world_size} ranks would train {world_size} unsynchronised copies; "
            "use backend=ddp (or auto)"
        )
    method = method_class(cfg)
    method.check_launch(cfg, world_size)
    backend_class(cfg, world_size).check_config(cfg, method)


def build_backend(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int) -> Backend:
    return backend_class(cfg, world_size).from_config(cfg, model, optimizer)


__all__ = ["Backend", "StepResult", "backend_class", "build_backend", "check_launch", "resolve_backend_name"]
