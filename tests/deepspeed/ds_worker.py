"""Runs many small trainings in one 2-rank launch and records what the DeepSpeed tests check.

    torchrun --standalone --nproc_per_node=2 tests/deepspeed/ds_worker.py CASES.json OUT_DIR

``CASES.json`` is a list of cases: ``{"name", "sets": [KEY=VALUE, ...], "sync": null | "boundary" |
"coalesce", "resume_from": null | [case name, step], "check_restore": bool}``. Each case trains the
packaged quickstart config with its overrides through the real ``Trainer`` (so the loop, the LR
schedule and the checkpoints are the ones users run) in ``OUT_DIR/<name>``; a case with
``resume_from`` starts from that case's checkpoint at that step. A case with ``"zero3_noise": true`` trains
nothing: it checks the weight noise on ZeRO-3 partitions against the unsharded noise (``zero3_noise``).
Rank 0 writes ``OUT_DIR/results.json``.

Weights are read as each rank holds them (``noise.held``: under ZeRO-3 the partition, as the parameter itself
is an empty placeholder) or whole from the module's ``state_dict`` (which gathers ZeRO-3's partitions).

Gradient reductions are counted by wrapping the reduce-type calls of DeepSpeed's communication
backend (``deepspeed.comm``'s ``cdb``: all_reduce, reduce, reduce_scatter, ...), through which every
DeepSpeed collective goes. A call made between the start of ``train_step`` and the call of
``optimizer_step`` is a gradient reduction; calls inside ``optimizer_step`` (ZeRO's overflow check and
gradient norm, small scalars) and all-gathers of updated weights are recorded separately.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ssgd_dist import distributed  # noqa: E402
from ssgd_dist.backends import deepspeed as ds_backend  # noqa: E402
from ssgd_dist.config import load_config  # noqa: E402
from ssgd_dist.errors import ConfigError  # noqa: E402
from ssgd_dist.noise import Perturber, fill_unit_, held, noise_generator, sample_unit_  # noqa: E402
from ssgd_dist.train import Trainer  # noqa: E402
from tests.dist_workers import noise_memory, rank_mismatches  # noqa: E402  (PYTHONPATH holds the repository)

REDUCE_OPS = (
    "all_reduce",
    "all_reduce_coalesced",
    "inference_all_reduce",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
)
OTHER_OPS = ("all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced", "broadcast", "barrier")


class Counter:
    def __init__(self) -> None:
        self.phase = "other"
        self.log: list[tuple[str, str, int]] = []  # (phase, op, bytes)

    def wrap(self, cdb) -> None:
        for name in REDUCE_OPS + OTHER_OPS:
            fn = getattr(cdb, name, None)
            if fn is None:
                continue

            def counted(*args, __fn=fn, __name=name, **kwargs):
                tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
                lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple))]
                if not tensors and lists:
                    tensors = [t for t in lists[-1] if torch.is_tensor(t)]
                nbytes = tensors[-1].numel() * tensors[-1].element_size() if tensors else 0
                self.log.append((self.phase, __name, nbytes))
                return __fn(*args, **kwargs)

            setattr(cdb, name, counted)


def held_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter's elements that this rank holds (under ZeRO-3 its partition)."""
    return [held(p).local.detach() for p in model.parameters()]


def whole_tensors(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """Every floating-point parameter or buffer, whole (a collective under ZeRO-3), copied."""
    names = {n for n, _ in (model.named_parameters() if kind == "parameters" else model.named_buffers())}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names and t.is_floating_point()}


def zero3_engine(model: torch.nn.Module, world_size: int):
    """A ZeRO-3 engine over ``model`` with the backend's settings (nothing kept gathered, state dict gathered)."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, **ds_backend.ZERO3_KEYS},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    engine.module.register_state_dict_post_hook(ds_backend.gather_zero3_parameters)  # as the backend does
    return engine


def zero3_memory(world_size: int) -> list[dict]:
    """Every rank's ``noise_memory`` on a model whose weights dominate the bookkeeping (2 x 256 x 256)."""
    torch.manual_seed(3)
    engine = zero3_engine(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)), world_size)
    memory = {mode: noise_memory(engine.module, mode) for mode in ("copy", "regenerate")}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, memory)
    return gathered


def zero3_noise(world_size: int) -> dict:
    """Weight noise on ZeRO-3 partitions equals this rank's flat slice of the unsharded noise.

    The tensors are chosen so that 2 ranks split them awkwardly: 35 and 21 elements (not a multiple of 2:
    the last partition is padded), 7 and 3 (biases, padded), a 7x5 and a 5x3x3 tensor whose output rows
    are cut between the ranks. The unit draw must be exactly the slice; the scaled noise (its scale reads
    the whole tensor's RMS or each row's, summed over the ranks) equal to rounding.
    """
    torch.manual_seed(3)
    engine = zero3_engine(
        torch.nn.ModuleList([torch.nn.Linear(5, 7), torch.nn.Linear(7, 3), torch.nn.Conv1d(3, 5, 3)]), world_size
    )
    params = list(engine.module.parameters())
    whole = list(whole_tensors(engine.module, "parameters").values())
    out = {"unit_exact": True, "scaled_max_diff": 0.0, "padding_untouched": True, "restored_exact": True}
    out["split_rows"] = out["ragged"] = 0
    with torch.no_grad():
        for h in (held(p) for p in params):
            out["ragged"] += int(h.shape.numel() % world_size != 0)
            if len(h.shape) >= 2:
                row = h.shape.numel() // h.shape[0]
                out["split_rows"] += int(h.flat.start % row != 0 or h.flat.stop % row != 0)
        for distribution in ("rademacher", "gaussian"):
            saved = [p.ds_tensor.clone() for p in params]
            targets = [held(p) for p in params]
            fill_unit_(targets, distribution, noise_generator(5, 6, "cpu"))
            reference = [torch.empty_like(w) for w in whole]
            sample_unit_(reference, distribution, noise_generator(5, 6, "cpu"))
            out["unit_exact"] &= all(torch.equal(h.local, h.take(r)) for h, r in zip(targets, reference))
            for p, s in zip(params, saved):
                p.ds_tensor.copy_(s)
        for scale in ("layer_rms", "filter_norm"):
            for restore in ("copy", "regenerate"):
                before = [p.ds_tensor.clone() for p in params]
                perturber = Perturber(params, restore=restore)
                perturber.perturb(5, 6, "gaussian", scale, 0.2)
                reference = [torch.empty_like(w) for w in whole]
                sample_unit_(reference, "gaussian", noise_generator(5, 6, "cpu"))
                for p, b, w, r in zip(params, before, whole, reference):
                    h = held(p)
                    moved = p.ds_tensor - b
                    sigma = (
                        w.pow(2).mean().sqrt()
                        if scale == "layer_rms" or w.ndim < 2
                        else w.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (w.ndim - 1)))
                    )
                    want = h.take(0.2 * sigma * r)
                    diff = (moved[: h.local.numel()] - want).abs().max() if h.local.numel() else torch.zeros(())
                    out["scaled_max_diff"] = max(out["scaled_max_diff"], float(diff))
                    out["padding_untouched"] &= bool((moved[h.local.numel() :] == 0).all())
                perturber.restore()
                if restore == "copy":  # regenerate restores to rounding, by design
                    out["restored_exact"] &= all(torch.equal(p.ds_tensor, b) for p, b in zip(params, before))
    return out


def instrument(trainer: Trainer, counter: Counter, per_step: list, restore_mismatches: list, initial: list) -> None:
    backend = trainer.backend
    original_train_step, original_optimizer_step = backend.train_step, backend.optimizer_step
    snapshot: list[torch.Tensor] = []

    def optimizer_step():
        # The weights the optimizer steps from must be bit for bit those before the passes.
        restore_mismatches.append(sum(int((t != s).sum()) for t, s in zip(held_weights(backend.model), snapshot)))
        counter.phase = "step"
        try:
            return original_optimizer_step()
        finally:
            counter.phase = "other"

    def train_step(method, x, y, step, **kwargs):
        snapshot[:] = [t.clone() for t in held_weights(backend.model)]
        if not initial:
            initial[:] = snapshot
        start = len(counter.log)
        counter.phase = "grad"
        try:
            return original_train_step(method, x, y, step, **kwargs)
        finally:
            counter.phase = "other"
            entries = counter.log[start:]
            grad = [(op, b) for ph, op, b in entries if ph == "grad" and op in REDUCE_OPS]
            gathers = [(op, b) for ph, op, b in entries if ph == "grad" and op.startswith("all_gather")]
            per_step.append(
                {
                    "grad_reductions": len(grad),
                    "grad_reduction_bytes": sum(b for _, b in grad),
                    "grad_ops": sorted({op for op, _ in grad}),
                    # ZeRO-3 all-gathers the weights for every forward and backward (bytes: this rank's input)
                    "grad_gathers": len(gathers),
                    "grad_gather_bytes": sum(b for _, b in gathers),
                    "step_reductions": sum(1 for ph, op, _ in entries if ph == "step" and op in REDUCE_OPS),
                    "step_other": sum(1 for ph, op, _ in entries if ph == "step" and op not in REDUCE_OPS),
                }
            )

    backend.optimizer_step = optimizer_step
    backend.train_step = train_step


def run_case(case: dict, out: Path, counter: Counter, rank: int) -> dict:
    if case.get("zero3_noise"):
        world_size = dist.get_world_size()
        return {"name": case["name"], "shards": zero3_noise(world_size), "memory": zero3_memory(world_size)}
    run_dir = out / case["name"]
    if case.get("resume_from"):
        source, step = case["resume_from"]
        if rank == 0:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / source / "checkpoints" / f"step-{step:08d}.pt", run_dir / "checkpoints" / "last.pt")
            shutil.copyfile(out / source / "config.yaml", run_dir / "config.yaml")
        dist.barrier()
    cfg = load_config("quickstart", case["sets"])
    ctx = distributed.setup("cpu")
    forced = case.get("sync")
    ds_backend.default_sync_mode = (lambda stage: forced) if forced else DEFAULT_SYNC
    per_step: list[dict] = []
    restore_mismatches: list[int] = []
    initial: list[torch.Tensor] = []
    started = time.perf_counter()
    try:
        trainer = Trainer(cfg, run_dir, ctx)
    except ConfigError as exc:
        return {"name": case["name"], "error": str(exc)}
    backend = trainer.backend
    instrument(trainer, counter, per_step, restore_mismatches, initial)
    summary = trainer.fit()
    whole = whole_tensors(backend.model, "parameters")
    params = torch.cat([t.float().flatten() for t in whole.values()])
    result = {
        "name": case["name"],
        "sets": case["sets"],
        "backend": type(backend).__name__,
        "sync": getattr(backend, "sync_mode", None),
        "optimizer": type(backend.optimizer).__name__,
        "param_dtype": str(next(backend.model.parameters()).dtype),
        "zero3": all(hasattr(p, "ds_tensor") for p in backend.model.parameters()),
        "per_step": per_step,
        "restore_mismatches": restore_mismatches,
        # every floating-point tensor of the state, compared across ranks: name -> largest difference from rank 0's
        "parameter_mismatches": rank_mismatches(whole),
        "buffer_names": sorted(whole_tensors(backend.model, "buffers")),
        "buffer_mismatches": rank_mismatches(whole_tensors(backend.model, "buffers")),
        "params_finite": bool(torch.isfinite(params).all()),
        "unchanged": all(torch.equal(t, q) for t, q in zip(held_weights(backend.model), initial)),
        "skipped": trainer.skipped,
        "summary": summary,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return result


DEFAULT_SYNC = ds_backend.default_sync_mode


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")  # joins torchrun's group
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    import deepspeed.comm.comm as dscomm

    counter = Counter()
    counter.wrap(dscomm.cdb)
    results = []
    for case in cases:
        try:
            results.append(run_case(case, out, counter, ctx.rank))
        except Exception as exc:  # noqa: BLE001 - record and go on; a collective mismatch would hang instead
            results.append(
                {"name": case["name"], "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            )
        if ctx.rank == 0:
            (out / "results.json").write_text(json.dumps(results, indent=1))
    distributed.teardown(ctx)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
