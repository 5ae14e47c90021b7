"""Functions run inside spawned gloo ranks by the distributed tests (importable by child processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ssgd_dist import distributed
from ssgd_dist.config import load_config
from ssgd_dist.train import Trainer


def init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def count_comm(rank: int, world_size: int, port: int, out: str, variants: list[list[str]], steps: int) -> None:
    """For each config variant: gradient bytes all-reduced per step and whether replicas stay bitwise equal."""
    init(rank, world_size, port)
    results = []
    for overrides in variants:
        cfg = load_config("quickstart", overrides)
        ctx = distributed.setup("cpu")
        trainer = Trainer(cfg, Path(out).parent / f"run-{len(results)}", ctx)
        counted = {"bytes": 0, "calls": 0}

        def hook(state, bucket):
            counted["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            counted["calls"] += 1
            buf = bucket.buffer().div_(world_size)
            return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

        trainer.backend.ddp.register_comm_hook(None, hook)
        per_step = []
        for step in range(steps):
            before = counted["bytes"]
            x, y = trainer.local_batch(step)
            trainer.backend.train_step(trainer.method, x, y, step)
            per_step.append(counted["bytes"] - before)
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        results.append(
            {
                "overrides": overrides,
                "bytes_per_step": per_step,
                "identical": all(torch.equal(gathered[0], g) for g in gathered[1:]),
            }
        )
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()
