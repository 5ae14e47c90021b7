"""Run inside spawned gloo ranks by tests/test_large_batch.py: many configs, one process group per world size.

For each variant the rank builds the real ``Trainer``, runs ``steps`` optimizer steps through the
backend, counts the gradient all-reduces with a DDP comm hook, makes the running statistics cover every
rank (as before a checkpoint) and gathers every floating-point tensor of the state from every rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ssgd_dist import distributed
from ssgd_dist.bn import synchronize_running_stats
from ssgd_dist.config import load_config
from ssgd_dist.train import Trainer
from tests.dist_workers import leave_group


def _init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _counting_hook(counter: dict, world_size: int):
    def hook(state, bucket):
        counter["calls"] += 1
        counter["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        buf = bucket.buffer().div_(world_size)
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

    return hook


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def run_variants(rank: int, world_size: int, port: int, out: str, variants: dict[str, dict], steps: int) -> None:
    """``variants``: name -> {"sets": [...], "loss_scale": s} (s != 1: the loss not divided by its micro-steps)."""
    _init(rank, world_size, port)
    results = {}
    for name, variant in variants.items():
        cfg = load_config("quickstart", variant["sets"])
        trainer = Trainer(cfg, Path(out).parent / f"run-{world_size}-{name}", distributed.setup("cpu"))
        counter = {"calls": 0, "bytes": 0}
        if hasattr(trainer.backend, "ddp"):
            trainer.backend.ddp.register_comm_hook(None, _counting_hook(counter, world_size))
        scale = variant.get("loss_scale", 1.0)

        def loss_fn(logits, y, scale=scale):
            return scale * nn.functional.cross_entropy(logits, y)

        per_step = []
        for step in range(steps):
            before = dict(counter)
            x, y = trainer.local_batch(step)
            trainer.backend.set_lr(0.1)
            trainer.backend.train_step(trainer.method, x, y, step, loss_fn=loss_fn)
            per_step.append({k: counter[k] - before[k] for k in counter})
        synchronize_running_stats(trainer.backend.model)
        state = _state(trainer.backend.model)
        replicas_equal = True
        for tensor in state.values():
            gathered = [torch.empty_like(tensor) for _ in range(world_size)]
            dist.all_gather(gathered, tensor)
            replicas_equal &= all(torch.equal(gathered[0], g) for g in gathered[1:])
        results[name] = {"state": state, "per_step": per_step, "replicas_equal": replicas_equal}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    leave_group()
