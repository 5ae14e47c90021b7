"""Run inside spawned gloo ranks by tests/test_fsdp.py: many configs, one process group per world size.

For each variant the rank builds the real ``Trainer`` (``backend: fsdp`` on several ranks, ``local`` on
one), runs a few optimizer steps through the backend, counts FSDP2's reduce-scatters, measures what the
noise holds and allocates, and saves the full (gathered) state. Then it checks the noise on shards
against the unsharded draw.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from ssgd_dist import distributed
from ssgd_dist.config import load_config
from ssgd_dist.noise import Perturber, draw_noise, fill_unit_, held, noise_generator, sample_unit_, select_targets
from ssgd_dist.train import Trainer
from tests.dist_workers import leave_group, noise_memory


def _init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of the state, whole (gathered from the shards), on every rank."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    state = get_model_state_dict(model, options=options) if dist.get_world_size() > 1 else model.state_dict()
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


@torch.no_grad()
def _noise_on_shards(model: torch.nn.Module) -> dict[str, float | bool]:
    """This rank's unit draw equals its rows of the unsharded draw (exactly); the scaled noise too (to rounding)."""
    params = select_targets(model, "all")
    whole = [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in params]
    out: dict[str, float | bool] = {"unit_exact": True, "scaled_max_diff": 0.0}
    for distribution in ("rademacher", "gaussian", "sphere", "uniform"):
        targets = [held(p) for p in params]
        backup = [t.local.clone() for t in targets]
        fill_unit_(targets, distribution, noise_generator(5, 6, "cpu"))
        reference = [w.clone() for w in whole]
        sample_unit_(reference, distribution, noise_generator(5, 6, "cpu"))
        for t, ref in zip(targets, reference):
            rows = t.rows if t.rows is not None else slice(None)
            out["unit_exact"] &= torch.equal(t.local, ref[rows])
        for t, b in zip(targets, backup):
            t.local.copy_(b)
    for scale in ("layer_rms", "filter_norm", "absolute", "elementwise"):
        before = [held(p).local.clone() for p in params]
        perturber = Perturber(params)
        perturber.perturb(5, 6, "gaussian", scale, 0.2, sign=-1.0)
        moved = [held(p).local - b for p, b in zip(params, before)]
        perturber.restore()
        for m, n, p in zip(moved, draw_noise(whole, "gaussian", scale, 0.2, noise_generator(5, 6, "cpu")), params):
            rows = held(p).rows if held(p).rows is not None else slice(None)
            out["scaled_max_diff"] = max(
                out["scaled_max_diff"], float((m + n[rows]).abs().amax()) if m.numel() else 0.0
            )
    return out


def run_variants(rank: int, world_size: int, port: int, out: str, variants: dict[str, list[str]], steps: int) -> None:
    _init(rank, world_size, port)
    backend = "fsdp" if world_size > 1 else "local"
    results = {}
    for name, sets in variants.items():
        chosen = [] if any(s.startswith("backend=") for s in sets) else [f"backend={backend}"]
        cfg = load_config("quickstart", [*sets, *chosen])
        trainer = Trainer(cfg, Path(out).parent / f"run-{world_size}-{name}", distributed.setup("cpu"))
        counter = None
        if world_size > 1:
            from ssgd_dist.backends.fsdp import count_collectives

            counter = count_collectives(trainer.backend.model) if cfg.backend == "fsdp" else None
        per_step = []
        for step in range(steps):
            x, y = trainer.local_batch(step)
            trainer.backend.set_lr(0.1)
            trainer.backend.train_step(trainer.method, x, y, step)
            if counter:
                (sent, calls), (gathered, gathers) = (c.take() for c in counter)
                per_step.append({"calls": calls, "bytes": sent, "gathers": gathers, "gathered_bytes": gathered})
        results[name] = {"state": _full_state(trainer.backend.model), "per_step": per_step}
        if name == "wide":
            results["memory"] = {mode: noise_memory(trainer.backend.model, mode) for mode in ("copy", "regenerate")}
        if name == "sgd":
            results["shards"] = _noise_on_shards(trainer.backend.model)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {"memory": results.pop("memory"), "shards": results.pop("shards")})
    results["per_rank"] = gathered
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    leave_group()
