"""What reading the loss back every step costs a whole training run (``train.log_every``).

    python bench/trainer_readback.py --device cuda [--steps 300] [--repeats 2] [--json PATH]

Runs ``ssgd-dist train`` (S-SGD, an MLP on the synthetic data set, one process) with
``train.log_every=1`` (a host sync every step, as before the step stopped reading back) and with
the default 10, alternating, and reports the seconds per step from ``metrics.jsonl`` after a
warm-up of 50 steps. A small model makes the host's share of a step large, which is where a
per-step sync shows most.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WARMUP = 50


def seconds_per_step(log_every: int, opts: argparse.Namespace, run_dir: Path) -> float:
    sets = {
        "device": opts.device,
        "data.name": "synthetic",
        "data.batch_size": opts.batch_size,
        "model.hidden": f"[{opts.width},{opts.width}]",
        "train.epochs": opts.steps,
        "train.eval_every": 10**6,
        "train.checkpoint_every": 10**6,
        "train.progress": "false",
        "train.log_every": log_every,
    }
    args = [f"--set={k}={v}" for k, v in sets.items()]
    cmd = [sys.executable, "-m", "ssgd_dist.cli", "train", "--config", "quickstart", *args, "--run-dir", str(run_dir)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    times = {r["step"]: r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    return (times[opts.steps] - times[WARMUP]) / (opts.steps - WARMUP)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--json", help="write the measurements here")
    opts = parser.parse_args()
    if opts.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    samples: dict[int, list[float]] = {1: [], 10: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            for log_every in samples:
                samples[log_every].append(seconds_per_step(log_every, opts, Path(tmp) / f"r{i}-l{log_every}"))
    every, window = (statistics.median(samples[k]) for k in (1, 10))
    print(
        f"S-SGD, MLP 32-{opts.width}-{opts.width}-4, batch {opts.batch_size}, {opts.device}, "
        f"median of {opts.repeats} runs of {opts.steps} steps (first {WARMUP} not counted)"
    )
    print(f"  train.log_every=1  (read back every step): {every * 1e3:.3f} ms/step")
    print(f"  train.log_every=10 (the default):          {window * 1e3:.3f} ms/step")
    print(f"  step time, every step / every 10: {every / window:.3f}")
    if opts.json:
        Path(opts.json).write_text(
            json.dumps({"samples_s_per_step": samples, "ratio": every / window, **vars(opts)}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
