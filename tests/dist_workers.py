"""Functions run inside spawned gloo ranks by the distributed tests (importable by child processes)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ssgd_dist import distributed
from ssgd_dist.bench.memory import AllocationTracker
from ssgd_dist.config import load_config
from ssgd_dist.noise import Perturber, held, select_targets, whole_shape
from ssgd_dist.train import Trainer


def init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def rank_mismatches(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Tensors that are not bitwise equal on every rank: name -> largest difference from rank 0's (a collective)."""
    out = {}
    for name, tensor in state.items():
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            out[name] = max(float((g.double() - gathered[0].double()).abs().max()) for g in gathered[1:])
    return out


def float_tensors(module: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """Every floating-point parameter or buffer (BatchNorm running statistics...), copied."""
    named = module.named_parameters() if kind == "parameters" else module.named_buffers()
    return {name: t.detach().clone() for name, t in named if t.is_floating_point()}


def count_comm(rank: int, world_size: int, port: int, out: str, variants: list[list[str]], steps: int) -> None:
    """For each config variant: gradient bytes all-reduced per step, and which floating-point tensors of the
    state (parameters and buffers) differ between ranks, at every forward, after the steps and after evaluate()."""
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
        # The buffers each forward starts from: DDP's buffer broadcast (if on) has run by then.
        at_forward: list[dict[str, torch.Tensor]] = []
        handle = trainer.model.register_forward_pre_hook(
            lambda module, args: at_forward.append(float_tensors(module, "buffers"))
        )
        per_step = []
        for step in range(steps):
            before = counted["bytes"]
            x, y = trainer.local_batch(step)
            trainer.backend.train_step(trainer.method, x, y, step)
            per_step.append(counted["bytes"] - before)
        handle.remove()
        at_each_forward: dict[str, float] = {}
        for i, buffers in enumerate(at_forward):
            at_each_forward.update({f"forward {i}: {k}": v for k, v in rank_mismatches(buffers).items()})
        after_steps = rank_mismatches(float_tensors(trainer.model, "buffers"))
        parameters = rank_mismatches(float_tensors(trainer.model, "parameters"))
        trainer.evaluate()  # the product's own path to reading the state
        results.append(
            {
                "overrides": overrides,
                "bytes_per_step": per_step,
                "parameter_names": sorted(float_tensors(trainer.model, "parameters")),
                "buffer_names": sorted(float_tensors(trainer.model, "buffers")),
                "ddp_syncs_buffers": bool(getattr(trainer.backend.ddp, "forward_sync_buffers", True)),
                "forwards": len(at_forward),
                # name -> largest difference from rank 0's; empty: bitwise identical on every rank
                "parameter_mismatches": parameters,
                "buffer_mismatches_at_each_forward": at_each_forward,
                "buffer_mismatches_after_steps": after_steps,
                "buffer_mismatches_after_evaluate": rank_mismatches(float_tensors(trainer.model, "buffers")),
            }
        )
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    leave_group()


def evaluate_worker(rank: int, world_size: int, out: str, overrides: list[str]) -> None:
    """Each rank's ``Trainer.evaluate()`` at the initial weights, and rank 0's model state to score it by hand."""
    torch.set_num_threads(1)
    # A file rendezvous: no port to race for with other process groups on a shared machine.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world_size)
    cfg = load_config("quickstart", overrides)
    trainer = Trainer(cfg, Path(out) / "run", distributed.setup("cpu"))
    metrics = trainer.evaluate()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, metrics)
    if rank == 0:
        torch.save(trainer.model.state_dict(), Path(out) / "model.pt")
        (Path(out) / "metrics.json").write_text(json.dumps(gathered))
    dist.barrier()
    leave_group()


def leave_group() -> None:
    """Destroy the process group after a pause that releases the GIL: gloo's worker threads first finish
    releasing the last collectives' Python tensors, which they need the GIL for. Without it a rank can
    deadlock at exit, its main thread joining those threads in ``~ProcessGroupGloo`` while holding the GIL
    (docs/testing.md, "Known problem")."""
    time.sleep(0.2)
    dist.destroy_process_group()


def noise_memory(model: torch.nn.Module, restore: str) -> dict[str, int]:
    """Bytes the noise holds after a perturb/reflect/restore cycle and its peak, by allocation; with what
    this rank holds of the perturbed weights (a shard under FSDP2 and ZeRO-3) and their whole size."""
    params = select_targets(model, "weights")
    perturber = Perturber(params, restore=restore)
    with AllocationTracker() as tracker:
        perturber.perturb(3, 4, "rademacher", "layer_rms", 0.1)
        perturber.reflect()
        perturber.restore()
        held_bytes = tracker.live_bytes()
    whole = [math.prod(whole_shape(p)) * p.element_size() for p in params]
    return {
        "held": held_bytes,
        "peak": tracker.peak,
        "shard_bytes": sum(h.local.numel() * h.local.element_size() for h in map(held, params)),
        "whole_bytes": sum(whole),
        "largest_bytes": max(whole),
    }


def assert_noise_holds_one_shard(memory: dict[str, dict[str, int]], world_size: int) -> None:
    """``noise_memory`` of ``copy`` and ``regenerate``: a shard's backup (1/world of the perturbed weights), at
    most one whole tensor more at the peak; nothing held with ``regenerate``."""
    copy, regenerate = memory["copy"], memory["regenerate"]
    small = 4096  # per-tensor sigmas and the all-reduced squares: bytes, not a tensor's worth
    assert copy["shard_bytes"] <= copy["held"] <= copy["shard_bytes"] + small
    assert copy["held"] <= -(-copy["whole_bytes"] // world_size) + small
    assert copy["peak"] <= copy["held"] + copy["largest_bytes"] + small
    assert regenerate["held"] <= small
    assert regenerate["peak"] <= regenerate["largest_bytes"] + small
