"""The DeepSpeed backend on real engines: DeepSpeed on CPU (DS_ACCELERATOR=cpu), gloo, 2 ranks.

One torchrun launch (``ds_worker.py``) trains every case of ``cases.py`` through the real Trainer and
records the final checkpoints, the gradient reductions of each step and the weights at each
optimizer step; the tests below read those records. The references are DDP runs of the same
configs in the same launch (the DDP backend is tested against a single process elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import INSTALL, REPO, TINY, require, run_torchrun, sets

sys.path.insert(0, str(Path(__file__).parent))
from cases import EXTRA_METHODS, METHODS, RESUMED, STAGES, all_cases, checkpoint, launch, result  # noqa: E402

# The deepspeed marker makes tests/conftest.py require DeepSpeed (a skip, or an error under CI=true).
pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch(all_cases(), tmp_path_factory.mktemp("deepspeed-runs"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- equivalence with DDP ------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("method", [*METHODS, *EXTRA_METHODS])
def test_final_parameters_equal_ddp(runs, stage, method):
    """sgd, ssgd halves/full (and paired, gni, clipping, AdamW, BatchNorm): DeepSpeed == DDP after 4 steps.

    As measured (CPU, gloo): bit for bit, except gradient clipping under ZeRO 1/2, where DeepSpeed takes the
    norm over its flat gradient partitions (another summation order): there the weights (all below 0.25 in
    magnitude) differ by at most one float32 rounding step, 2^-26 = 1.49e-8. The README quotes these figures.
    """
    name = f"z{stage}-{method}"
    r = result(runs, name)
    assert r["backend"] == "DeepSpeedBackend" and r["summary"]["step"] == 4
    assert r["parameter_mismatches"] == {}  # every parameter bitwise identical on both ranks
    # Buffers (BatchNorm running statistics): the ranks agree exactly where DDP's ranks agree, and rank 0's,
    # the checkpointed ones, equal DDP's (max_diff below covers every tensor of the model's state).
    assert bool(r["buffer_names"]) == (method == "bn")
    assert sorted(r["buffer_mismatches"]) == sorted(result(runs, f"ddp-{method}")["buffer_mismatches"])
    got, want = checkpoint(runs, name)["model"], checkpoint(runs, f"ddp-{method}")["model"]
    if method == "clip" and stage > 0:
        assert max(float(v.abs().max()) for v in want.values()) < 0.25  # where one rounding step is 2^-26
        assert max_diff(got, want) <= 2.0**-26
    else:
        assert max_diff(got, want) == 0.0


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpointed_optimizer_state_is_gathered_in_torch_format(runs, stage):
    """ZeRO 1/2 partition the optimizer state; the checkpoint holds it whole, as DDP's does."""
    for method in ("halves", "adamw"):
        ours, ddp = checkpoint(runs, f"z{stage}-{method}")["optimizer"], checkpoint(runs, f"ddp-{method}")["optimizer"]
        assert ours["state"].keys() == ddp["state"].keys()
        for index, entry in ddp["state"].items():
            assert ours["state"][index].keys() == entry.keys()
            for key, value in entry.items():
                torch.testing.assert_close(ours["state"][index][key], value, rtol=0, atol=1e-6)
        assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in ddp["param_groups"]]


# -- one gradient reduction per step ------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", STAGES)
def test_ssgd_reduces_gradients_as_often_as_sgd(runs, stage, bf16):
    tag = "-bf16" if bf16 else ""
    sgd = result(runs, f"z{stage}{tag}-sgd")["per_step"]
    assert len(sgd) == 4
    for split in ("halves", "full"):
        ssgd = result(runs, f"z{stage}{tag}-{split}")["per_step"]
        assert [s["grad_reductions"] for s in ssgd] == [s["grad_reductions"] for s in sgd] == [1] * 4
        assert [s["grad_reduction_bytes"] for s in ssgd] == [s["grad_reduction_bytes"] for s in sgd]
        assert [s["step_reductions"] for s in ssgd] == [s["step_reductions"] for s in sgd]


@pytest.mark.parametrize("stage", STAGES)
def test_accumulation_still_reduces_once_per_optimizer_step(runs, stage):
    """2 passes x 2 micro-steps: four backwards, one gradient reduction, as SGD."""
    per_step = result(runs, f"z{stage}-halves-k2")["per_step"]
    assert [s["grad_reductions"] for s in per_step] == [1] * 4
    sgd = result(runs, f"z{stage}-sgd")["per_step"]
    assert [s["grad_reduction_bytes"] for s in per_step] == [s["grad_reduction_bytes"] for s in sgd]


def test_zero2_needs_coalescing_for_one_reduction(runs):
    """The accumulation-boundary trick reduces in every ZeRO-2 backward: twice per S-SGD step."""
    default, boundary = result(runs, "z2-halves"), result(runs, "z2-halves-boundary")
    assert default["sync"] == "coalesce" and boundary["sync"] == "boundary"
    assert [s["grad_reductions"] for s in boundary["per_step"]] == [2] * 4
    assert max_diff(checkpoint(runs, "z2-halves")["model"], checkpoint(runs, "z2-halves-boundary")["model"]) <= 1e-6
    # ZeRO 1 gives one reduction either way; ZeRO 0 has no coalescing at all.
    assert [s["grad_reductions"] for s in result(runs, "z1-halves-coalesce")["per_step"]] == [1] * 4
    assert "coalesce needs ZeRO 1, 2 or 3" in runs[1]["z0-coalesce"]["error"]


# -- weights: restore, bf16 ---------------------------------------------------------------------------
def test_optimizer_always_steps_from_the_exact_unperturbed_weights(runs):
    """At every optimizer step of every run, the engine's weights equal bit for bit those before the passes."""
    checked = [r for r in runs[1].values() if "error" not in r]
    assert len(checked) > 40
    for r in checked:
        assert r["restore_mismatches"] and not any(r["restore_mismatches"]), r["name"]


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_runs_finite_with_bf16_weights_restored_exactly(runs, stage):
    for split in ("sgd", "halves", "full"):
        r = result(runs, f"z{stage}-bf16-{split}")
        assert r["param_dtype"] == "torch.bfloat16"
        assert r["params_finite"] and r["parameter_mismatches"] == {}
        assert r["restore_mismatches"] == [0, 0, 0, 0]
        assert torch.isfinite(torch.tensor(r["summary"]["train_loss"]))
        # bf16 follows the fp32 run closely (4 steps)
        assert (
            max_diff(checkpoint(runs, f"z{stage}-bf16-{split}")["model"], checkpoint(runs, f"ddp-{split}")["model"])
            < 0.02
        )


# -- checkpoints and resume ---------------------------------------------------------------------------
@pytest.mark.parametrize("source", RESUMED)
def test_resume_from_a_checkpoint_is_bit_exact(runs, source):
    r = result(runs, f"{source}-resumed")
    assert len(r["per_step"]) == 2  # trained steps 3 and 4 only
    resumed, uninterrupted = checkpoint(runs, f"{source}-resumed"), checkpoint(runs, source)
    assert resumed["step"] == uninterrupted["step"] == 4
    for k, v in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][k], v), k


def test_bf16_checkpoint_holds_fp32_master_weights(runs):
    for name in ("z0-bf16-halves", "z2-bf16-halves", "z1-bf16acc-halves"):
        assert result(runs, name)["param_dtype"] == "torch.bfloat16"
        model = checkpoint(runs, name)["model"]
        assert all(v.dtype == torch.float32 for v in model.values())


# -- non-finite gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["z0-nonfinite", "z2-nonfinite", "z0-bf16-nonfinite", "z2-bf16-nonfinite"])
def test_nonfinite_steps_are_skipped_and_weights_untouched(runs, name):
    r = result(runs, name)
    assert r["skipped"] == 4 and r["unchanged"] and r["params_finite"]


def test_nonfinite_stop_raises(runs):
    # ZeRO 2: the engine skips the step and says so; ZeRO 0 (fp32): the trainer finds it when it reads the norm.
    assert "NonFiniteError" in runs[1]["z2-nonfinite-stop"]["error"]
    assert (
        "NonFiniteError" in runs[1]["z0-nonfinite-stop"]["error"]
        and "at step 0" in runs[1]["z0-nonfinite-stop"]["error"]
    )


# -- refusals -----------------------------------------------------------------------------------------
def test_sam_and_zero3_paired_are_refused_in_workers(runs):
    assert "ZeRO-3 ranks gather one shared set of weights" in runs[1]["z3-paired"]["error"]
    assert "method = sam" in runs[1]["sam"]["error"]


# -- launchers ----------------------------------------------------------------------------------------
def test_torchrun_cli_trains_with_the_deepspeed_backend(tmp_path):
    """The README command, shrunk: `torchrun -m ssgd_dist.cli train --config quickstart --set backend=deepspeed`."""
    run_dir = tmp_path / "run"
    proc = run_torchrun(
        2,
        "train",
        "--config",
        "quickstart",
        *TINY,
        *sets("train.max_steps=2", "backend=deepspeed", "deepspeed.zero_stage=2"),
        "--run-dir",
        str(run_dir),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ssgd-dist: done at step 2" in proc.stdout
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_deepspeed_launcher_passes_local_rank_and_trains(tmp_path):
    launcher = require(tool="deepspeed", install=INSTALL["deepspeed"])
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            launcher,
            "--num_gpus",
            "2",
            "--master_port",
            str(_free_port()),
            "--module",
            "ssgd_dist.cli",
            "train",
            "--config",
            "quickstart",
            *TINY,
            *sets("train.max_steps=2", "backend=deepspeed", "deepspeed.zero_stage=1"),
            "--run-dir",
            str(run_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["world_size"] == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
