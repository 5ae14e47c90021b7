"""Process-group setup shared by torchrun, Ray Train workers and single-process runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # destroy the group at the end only if we created it (Ray creates its own)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = cuda: no CUDA device is visible to this process; use device=cpu (or auto)")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


LAUNCH_HINT = "unset RANK/WORLD_SIZE/LOCAL_RANK to run alone, or start the ranks with torchrun, which sets them"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} = {text!r}: not an integer; {LAUNCH_HINT}") from None


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment, checked: integers, 0 <= rank < world_size."""
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1:
        raise ConfigError(f"environment variable WORLD_SIZE = {world_size}: must be >= 1; {LAUNCH_HINT}")
    if rank < 0 or local_rank < 0:
        name, value = ("RANK", rank) if rank < 0 else ("LOCAL_RANK", local_rank)
        raise ConfigError(f"environment variable {name} = {value}: must be >= 0; {LAUNCH_HINT}")
    if rank >= world_size:
        raise ConfigError(
            f"environment variables RANK = {rank}, WORLD_SIZE = {world_size}: RANK must be < WORLD_SIZE; {LAUNCH_HINT}"
        )
    return rank, world_size, local_rank


def setup(requested_device: str) -> DistContext:
    """Join the group torchrun or Ray describes (RANK/WORLD_SIZE in the environment), or run alone."""
    rank, world_size, local_rank = env_ranks()
    device = resolve_device(requested_device, local_rank)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _elastic_attempt_store(world_size)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        owns = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank, world_size, local_rank, device, owns)


def _elastic_attempt_store(world_size: int) -> dist.Store | None:
    """Under torchrun restarts, a key space of its own for each attempt.

    torchrun shares its rendezvous TCPStore with the workers; after a restart, a new rank 0 can read
    the previous attempt's gloo addresses from it and fail to connect to the dead worker (pytorch
    issue 135712). Prefixing the keys with the restart count keeps attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(minutes=30),
    )
    return dist.PrefixStore(f"ssgd-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
