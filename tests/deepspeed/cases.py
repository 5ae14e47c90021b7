"""The trainings the DeepSpeed tests run (all in one 2-rank launch of ``ds_worker.py``); ZeRO-3's are in test_zero3.py.

Every case trains the packaged quickstart config, shrunk to 4 steps of a batch of 200 on a 40-32-32-10
MLP, with a checkpoint every 2 steps. DDP cases are the reference the DeepSpeed engines must match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ds_worker.py")

TINY = [
    "train.max_steps=4",
    "data.num_samples=2000",
    "data.batch_size=200",
    "model.hidden=[32,32]",
    "train.progress=false",
    "train.num_threads=1",
    "train.checkpoint_every=2",
]
STAGES = (0, 1, 2)  # ZeRO-3: test_zero3.py
# method name in the tests -> config overrides
METHODS = {
    "sgd": ["method=sgd"],
    "halves": ["method=ssgd", "ssgd.batch_split=halves"],
    "full": ["method=ssgd", "ssgd.batch_split=full"],
}
EXTRA_METHODS = {
    "paired": ["method=ssgd", "ssgd.batch_split=paired"],
    "gni": ["method=gni"],
    "clip": ["method=ssgd", "optim.clip_grad_norm=0.05"],
    "adamw": ["method=ssgd", "optim.name=adamw", "optim.lr=0.01"],
    # BatchNorm: running statistics updated once per sample (the w+n pass only, under `full`).
    "bn": ["method=ssgd", "ssgd.batch_split=full", "model.name=cnn1d", "model.batchnorm=true"],
    # Gradient accumulation: 2 micro-steps per optimizer step, still one reduction per step.
    "halves-k2": ["method=ssgd", "ssgd.batch_split=halves", "train.accumulation_steps=2"],
}
# Noise so large that every loss is inf/NaN: each step must be skipped (or stop the run), never applied.
RESUMED = (
    "z0-halves",
    "z1-halves",
    "z2-halves",
    "z0-adamw",
    "z2-adamw",
    "z0-bf16-halves",
    "z2-bf16-halves",
    "z1-bf16acc-halves",
)
NONFINITE = ["method=ssgd", "noise.alpha=1e30", "train.on_nonfinite=skip"]


def case(name: str, sets: list[str], sync: str | None = None, resume_from: tuple[str, int] | None = None) -> dict:
    return {"name": name, "sets": TINY + sets, "sync": sync, "resume_from": list(resume_from) if resume_from else None}


def ds(stage: int, *sets: str) -> list[str]:
    return ["backend=deepspeed", f"deepspeed.zero_stage={stage}", *sets]


def reduction_cases(stages: tuple[int, ...] = STAGES) -> list[dict]:
    """SGD and S-SGD on ``stages``, fp32 and bf16, with the default and the other sync mode."""
    cases = []
    for bf16 in (False, True):
        tag = "-bf16" if bf16 else ""
        for stage in stages:
            for method in ("sgd", "halves", "full"):
                sets = ds(stage, *METHODS[method], f"deepspeed.bf16={str(bf16).lower()}")
                cases.append(case(f"z{stage}{tag}-{method}", sets))
                other = {0: None, 1: "coalesce", 2: "boundary", 3: "boundary"}[stage]
                if other and method != "full":
                    cases.append(case(f"z{stage}{tag}-{method}-{other}", sets, sync=other))
    return cases


def all_cases() -> list[dict]:
    cases = [case(f"ddp-{m}", ["backend=ddp", *sets]) for m, sets in {**METHODS, **EXTRA_METHODS}.items()]
    cases += reduction_cases()
    for stage in STAGES:
        for m, sets in EXTRA_METHODS.items():
            cases.append(case(f"z{stage}-{m}", ds(stage, *sets)))
    # bf16 weights with fp32 gradient accumulation: ZeRO 1 then uses DeepSpeed's BF16_Optimizer.
    cases.append(
        case(
            "z1-bf16acc-halves",
            ds(1, *METHODS["halves"], "deepspeed.bf16=true", "deepspeed.extra.data_types.grad_accum_dtype=fp32"),
        )
    )
    # Exact resume: start from another case's step-2 checkpoint, train to step 4.
    for source in RESUMED:
        cases.append(
            case(
                f"{source}-resumed",
                next(c for c in cases if c["name"] == source)["sets"][len(TINY) :],
                resume_from=(source, 2),
            )
        )
    for name, sets in {
        "z0-nonfinite": ds(0, *NONFINITE),
        "z2-nonfinite": ds(2, *NONFINITE),
        "z0-bf16-nonfinite": ds(0, *NONFINITE, "deepspeed.bf16=true"),
        "z2-bf16-nonfinite": ds(2, *NONFINITE, "deepspeed.bf16=true"),
        "z0-nonfinite-stop": ds(0, *NONFINITE, "train.on_nonfinite=stop"),
        "z2-nonfinite-stop": ds(2, *NONFINITE, "train.on_nonfinite=stop"),
    }.items():
        cases.append(case(name, sets))
    cases.append(case("z0-coalesce", ds(0, *METHODS["halves"]), sync="coalesce"))  # refused: no coalescing at ZeRO 0
    cases.append(case("z3-paired", ds(3, *EXTRA_METHODS["paired"])))  # refused: ZeRO-3 ranks share their weights
    cases.append(case("sam", ds(2, "method=sam")))  # refused
    return cases


def run_worker(cases: list[dict], out: Path, timeout: int = 600) -> tuple[list[dict], subprocess.CompletedProcess]:
    """One torchrun launch of 2 gloo ranks that trains every case; returns rank 0's results."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "cases.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            str(spec),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    return results, proc


def launch(cases: list[dict], out: Path) -> tuple[Path, dict[str, dict]]:
    """Train ``cases`` in one launch (a module fixture's body): (output folder, rank 0's results by name)."""
    import pytest

    results, proc = run_worker(cases, out)
    if proc.returncode != 0 or len(results) != len(cases):
        pytest.fail(
            f"the 2-rank DeepSpeed worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return out, {r["name"]: r for r in results}


def result(runs: tuple[Path, dict], name: str) -> dict:
    """A case's record; a case that raised fails the test with its traceback."""
    r = runs[1][name]
    assert "error" not in r, f"{name}: {r['error']}\n{r.get('traceback', '')}"
    return r


def checkpoint(runs: tuple[Path, dict], name: str, step: int | None = None) -> dict:
    import torch

    ckpt = runs[0] / name / "checkpoints" / ("last.pt" if step is None else f"step-{step:08d}.pt")
    return torch.load(ckpt, weights_only=True)  # a checkpoint is plain tensors
