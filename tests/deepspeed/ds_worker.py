"""Runs many small trainings in one 2-rank launch and records what the DeepSpeed tests check.

    torchrun --standalone --nproc_per_node=2 tests/deepspeed/ds_worker.py CASES.json OUT_DIR

``CASES.json`` is a list of cases: ``{"name", "sets": [KEY=VALUE, ...], "sync": null | "boundary" |
"coalesce", "resume_from": null | [case name, step], "check_restore": bool}``. Each case trains the
packaged quickstart config with its overrides through the real ``Trainer`` (so the loop, the LR
schedule and the checkpoints are the ones users run) in ``OUT_DIR/<name>``; a case with
``resume_from`` starts from that case's checkpoint at that step. Rank 0 writes ``OUT_DIR/results.json``.

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
from ssgd_dist.train import Trainer  # noqa: E402
from tests.dist_workers import float_tensors, rank_mismatches  # noqa: E402  (PYTHONPATH holds the repository)

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


def instrument(trainer: Trainer, counter: Counter, per_step: list, restore_mismatches: list, initial: list) -> None:
    backend = trainer.backend
    original_train_step, original_optimizer_step = backend.train_step, backend.optimizer_step
    snapshot: list[torch.Tensor] = []

    def optimizer_step():
        # The weights the optimizer steps from must be bit for bit those before the passes.
        restore_mismatches.append(
            sum(int((p.detach() != s).sum()) for p, s in zip(backend.model.parameters(), snapshot))
        )
        counter.phase = "step"
        try:
            return original_optimizer_step()
        finally:
            counter.phase = "other"

    def train_step(method, x, y, step, **kwargs):
        snapshot[:] = [p.detach().clone() for p in backend.model.parameters()]
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
            per_step.append(
                {
                    "grad_reductions": len(grad),
                    "grad_reduction_bytes": sum(b for _, b in grad),
                    "grad_ops": sorted({op for op, _ in grad}),
                    "step_reductions": sum(1 for ph, op, _ in entries if ph == "step" and op in REDUCE_OPS),
                    "step_other": sum(1 for ph, op, _ in entries if ph == "step" and op not in REDUCE_OPS),
                }
            )

    backend.optimizer_step = optimizer_step
    backend.train_step = train_step


def run_case(case: dict, out: Path, counter: Counter, rank: int) -> dict:
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
    params = torch.cat([p.detach().float().flatten() for p in backend.model.parameters()])
    result = {
        "name": case["name"],
        "backend": type(backend).__name__,
        "sync": getattr(backend, "sync_mode", None),
        "optimizer": type(backend.optimizer).__name__,
        "param_dtype": str(next(backend.model.parameters()).dtype),
        "per_step": per_step,
        "restore_mismatches": restore_mismatches,
        # every floating-point tensor of the state, compared across ranks: name -> largest difference from rank 0's
        "parameter_mismatches": rank_mismatches(float_tensors(backend.model, "parameters")),
        "buffer_names": sorted(float_tensors(backend.model, "buffers")),
        "buffer_mismatches": rank_mismatches(float_tensors(backend.model, "buffers")),
        "params_finite": bool(torch.isfinite(params).all()),
        "unchanged": all(torch.equal(p.detach(), q) for p, q in zip(backend.model.parameters(), initial)),
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
