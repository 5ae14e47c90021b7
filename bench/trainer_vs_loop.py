"""What the trainer costs over a hand-written loop: ``ssgd-dist train``'s loop against a minimal DDP loop.

    python bench/trainer_vs_loop.py [--workers 2] [--rounds 5] [--steps 60] [--warmup 10] [--json PATH]
                                    [--set KEY=VALUE ...]

Both run the quickstart config (S-SGD ``halves``, MLP 40-256-256-10, global batch 2000, one thread per
rank) on ``--workers`` gloo ranks of one torchrun launch, from the same initial weights, on the same
batches (``GlobalBatches``), with the same LR schedule and the same S-SGD step: the loop is the README's
"Use it in your own loop" (``SymmetricNoiseOptimizer``, the first pass under ``no_sync()``). Each round
runs the full ``Trainer.fit`` of fresh run directories and the loop, in alternating order, after one
untimed round. Two clocks, both over steps ``warmup`` to ``steps``:

- wall: the trainer's own ``metrics.jsonl`` clock (its set-up, final evaluation and checkpoint are not
  counted), the loop's ``perf_counter``; what a user waits for, but on a busy machine mostly the load.
- CPU: the process time of a rank (all its threads), the largest over ranks; for the trainer the CPU
  time of a ``steps`` run minus that of a ``warmup`` run, so set-up, evaluation and checkpoint cancel.
  Work that other jobs' load cannot add to, so it still compares the two sides on a busy machine.

``ratio_trainer_vs_loop`` is the median over rounds of trainer / loop on the wall clock,
``ratio_trainer_vs_loop_cpu`` on the CPU clock. ``max_param_diff`` (the largest difference of final
parameters between the two) shows they computed the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def hand_written_loop(cfg, ctx, steps: int, warmup: int):
    """S-SGD the way the README's "Use it in your own loop" writes it.
    Returns (wall seconds, CPU seconds, final parameters) of steps ``warmup`` to ``steps``."""
    from torch.nn.functional import cross_entropy
    from torch.nn.parallel import DistributedDataParallel

    from ssgd_dist.data import GlobalBatches, load_dataset
    from ssgd_dist.models import build_model
    from ssgd_dist.optim import SymmetricNoiseOptimizer
    from ssgd_dist.optimizers import build_optimizer, lr_at
    from ssgd_dist.seeding import seed_initial_weights

    data = load_dataset(cfg.data)
    batches = GlobalBatches(len(data.y_train), cfg.data.batch_size, cfg.seed, ctx.rank, ctx.world_size)
    seed_initial_weights(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    ddp = DistributedDataParallel(model)
    base = build_optimizer(cfg.optim, model.parameters())
    n = cfg.noise
    opt = SymmetricNoiseOptimizer(model, base, n.alpha, n.distribution, n.scale, n.targets, cfg.seed)
    for step in range(steps):
        if step == warmup:
            wall, cpu = time.perf_counter(), time.process_time()
        idx = batches.local_indices(step)
        x, y = data.x_train[idx], data.y_train[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg.optim, cfg.data.batch_size, step, steps)
        opt.zero_grad()
        opt.perturb()
        with ddp.no_sync():
            cross_entropy(ddp(x[0::2]), y[0::2]).mul(0.5).backward()
        opt.reflect()
        cross_entropy(ddp(x[1::2]), y[1::2]).mul(0.5).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    return time.perf_counter() - wall, time.process_time() - cpu, params


def trainer_run(cfg, ctx, run_dir: Path, steps: int, warmup: int):
    """``Trainer.fit`` for ``steps`` and, in another run directory, for ``warmup`` steps.
    Returns (wall seconds, CPU seconds, final parameters) of steps ``warmup`` to ``steps``."""
    from ssgd_dist.train import Trainer

    cpu = {}
    for n in (warmup, steps):
        sized = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": n, "checkpoint_every": n})})
        trainer = Trainer(sized, run_dir / f"steps-{n}", ctx)
        start = time.process_time()
        trainer.fit()
        cpu[n] = time.process_time() - start
    params = [p.detach().clone() for p in trainer.model.parameters()]
    records = (run_dir / f"steps-{steps}" / "metrics.jsonl").read_text().splitlines() if ctx.is_main else []
    times = {r["step"]: r["time"] for r in map(json.loads, records)}
    wall = times[steps] - times[warmup] if ctx.is_main else 0.0
    return wall, cpu[steps] - cpu[warmup], params


def worker(opts: argparse.Namespace) -> None:
    """One rank: an untimed round, then every round runs both sides, in alternating order, on one process
    group; rank 0 writes the rounds to ``opts.result``."""
    import torch

    from ssgd_dist import distributed
    from ssgd_dist.config import load_config

    settings = ["train.epochs=100000", "train.eval_every=100000", f"train.max_steps={opts.steps}", *opts.set]
    cfg = load_config("quickstart", settings)
    torch.set_num_threads(cfg.train.num_threads or 1)
    ctx = distributed.setup(cfg.device)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(-1, opts.rounds):
            result = {}
            for side in ("trainer", "loop") if r % 2 == 0 else ("loop", "trainer"):
                if side == "trainer":
                    result[side] = trainer_run(cfg, ctx, Path(tmp) / f"round{r}", opts.steps, opts.warmup)
                else:
                    result[side] = hand_written_loop(cfg, ctx, opts.steps, opts.warmup)
                distributed.barrier()
            cpu = torch.tensor([result["trainer"][1], result["loop"][1]], dtype=torch.float64)
            torch.distributed.all_reduce(cpu, op=torch.distributed.ReduceOp.MAX)
            diff = max(float((a - b).abs().max()) for a, b in zip(result["trainer"][2], result["loop"][2]))
            if r >= 0:
                rounds.append(
                    {
                        "trainer_s": result["trainer"][0],
                        "loop_s": result["loop"][0],
                        "trainer_cpu_s": float(cpu[0]),
                        "loop_cpu_s": float(cpu[1]),
                        "max_param_diff": diff,
                    }
                )
    distributed.teardown(ctx)
    if ctx.is_main:
        Path(opts.result).write_text(json.dumps(rounds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="trainer/loop pairs, alternating order (default 5)")
    parser.add_argument("--steps", type=int, default=60, help="steps of each side per round (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps of each side not timed (default 10)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--result", help=argparse.SUPPRESS)  # set for the ranks: where rank 0 writes its rounds
    opts = parser.parse_args()
    if opts.result:
        worker(opts)
        return 0
    if not 1 <= opts.warmup < opts.steps:
        parser.error("--warmup must be at least 1 (the trainer's clock starts after step 1) and less than --steps")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rounds.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={opts.workers}"]
        cmd += [str(HERE), *sys.argv[1:], "--result", str(result)]
        before = os.getloadavg()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rounds = json.loads(result.read_text())
    ratios = [r["trainer_s"] / r["loop_s"] for r in rounds]
    cpu_ratios = [r["trainer_cpu_s"] / r["loop_cpu_s"] for r in rounds]
    timed = opts.steps - opts.warmup
    report = {
        "ratio_trainer_vs_loop": statistics.median(ratios),
        "ratio_trainer_vs_loop_cpu": statistics.median(cpu_ratios),
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "trainer_ms_per_step": statistics.median(r["trainer_s"] for r in rounds) / timed * 1e3,
        "loop_ms_per_step": statistics.median(r["loop_s"] for r in rounds) / timed * 1e3,
        "trainer_cpu_ms_per_step": statistics.median(r["trainer_cpu_s"] for r in rounds) / timed * 1e3,
        "loop_cpu_ms_per_step": statistics.median(r["loop_cpu_s"] for r in rounds) / timed * 1e3,
        "max_param_diff": max(r["max_param_diff"] for r in rounds),
        "rounds": rounds,
        "loadavg_before": before,
        "loadavg_after": os.getloadavg(),
        "options": {k: v for k, v in vars(opts).items() if k != "result"},
    }
    print(
        f"wall: trainer {report['trainer_ms_per_step']:.2f} ms/step, loop {report['loop_ms_per_step']:.2f} ms/step, "
        f"ratio_trainer_vs_loop {report['ratio_trainer_vs_loop']:.3f}\n"
        f"CPU:  trainer {report['trainer_cpu_ms_per_step']:.2f} ms/step, loop {report['loop_cpu_ms_per_step']:.2f} "
        f"ms/step, ratio_trainer_vs_loop_cpu {report['ratio_trainer_vs_loop_cpu']:.3f}\n"
        f"(medians of {len(ratios)} rounds; load average {before[0]:.2f} before, "
        f"{report['loadavg_after'][0]:.2f} after)"
    )
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
