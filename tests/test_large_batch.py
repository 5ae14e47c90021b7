"""Gradient accumulation and BatchNorm modes against the invariance contract (SPEC section 7).

One gloo launch per world size (1, 2, 4) runs every variant for a few optimizer steps through the real
trainer and backend. What may not depend on the world size or on the micro-steps k must agree with the
one-process, k = 1 run to 1e-5; a deliberately wrong variant shows the tolerance is not loose.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import final_params, run_cli, run_torchrun, sets, spawn_per_world_size
from tests.large_batch_workers import run_variants

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
WORLD_SIZES = (1, 2, 4)
KS = (1, 2, 4)
TOL = 1e-5
MLP = ["data.num_samples=2000", "data.batch_size=256", "model.hidden=[32,32]", "train.num_threads=1"]
CNN = ["data.num_samples=2000", "data.batch_size=256", "model.name=cnn1d", "model.batchnorm=true"]
METHODS = {
    "sgd": ["method=sgd"],
    "halves": ["method=ssgd", "ssgd.batch_split=halves"],
    "full": ["method=ssgd", "ssgd.batch_split=full"],
    "paired": ["method=ssgd", "ssgd.batch_split=paired"],
    "gni": ["method=gni"],
    "sam": ["method=sam"],
}
BN_MODES = {"sync": ["model.bn_mode=sync"], "ghost": ["model.bn_mode=ghost", "model.bn_ghost_batch=8"]}


def _variants(world_size: int) -> dict[str, dict]:
    out = {}
    for method, method_sets in METHODS.items():
        if method == "paired" and world_size % 2:
            continue
        for k in KS:
            out[f"{method}-k{k}"] = {"sets": MLP + method_sets + [f"train.accumulation_steps={k}"]}
    # Wrong on purpose: each micro-step's loss counted whole instead of 1/k of it.
    out["halves-k2-undivided"] = {"sets": out["halves-k2"]["sets"], "loss_scale": 2.0}
    for mode, mode_sets in {**BN_MODES, "local": []}.items():
        for split in ("halves", "full"):
            for k in (1, 2):
                sets_ = CNN + mode_sets + METHODS[split] + [f"train.accumulation_steps={k}"]
                out[f"bn-{mode}-{split}-k{k}"] = {"sets": sets_}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    return spawn_per_world_size(run_variants, WORLD_SIZES, _variants, STEPS, tmp_path_factory, "ws")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("method", ["sgd", "halves", "full", "gni"])
def test_world_size_and_micro_steps_do_not_change_the_trajectory(runs, method):
    reference = runs[1][f"{method}-k1"]["state"]
    for world_size in WORLD_SIZES:
        for k in KS:
            got = runs[world_size][f"{method}-k{k}"]["state"]
            assert _max_diff(got, reference) < TOL, (world_size, k)


@pytest.mark.parametrize("method", ["sam", "paired"])
def test_rank_dependent_methods_do_not_depend_on_micro_steps(runs, method):
    """SAM ascends along each rank's own gradient and paired splits by rank: invariant in k only."""
    for world_size in WORLD_SIZES:
        if f"{method}-k1" not in runs[world_size]:
            continue
        reference = runs[world_size][f"{method}-k1"]["state"]
        for k in KS[1:]:
            assert _max_diff(runs[world_size][f"{method}-k{k}"]["state"], reference) < TOL, (world_size, k)


def test_sam_depends_on_the_world_size(runs):
    """The contrast: each rank's ascent sees only its own samples (m-sharpness), so ranks change the result."""
    assert _max_diff(runs[2]["sam-k1"]["state"], runs[1]["sam-k1"]["state"]) > 20 * TOL


def test_a_loss_not_divided_by_its_micro_steps_is_caught(runs):
    wrong, right = runs[2]["halves-k2-undivided"]["state"], runs[1]["halves-k1"]["state"]
    assert _max_diff(wrong, right) > 100 * TOL


def test_one_gradient_all_reduce_per_optimizer_step_for_every_k(runs):
    for world_size in WORLD_SIZES[1:]:
        sgd = runs[world_size]["sgd-k1"]["per_step"]
        assert all(step["calls"] >= 1 for step in sgd)
        for name, result in runs[world_size].items():
            if name.startswith("bn-"):
                continue
            assert result["per_step"] == sgd, (world_size, name)


def test_replicas_hold_identical_parameters_and_buffers(runs):
    for world_size in WORLD_SIZES[1:]:
        for name, result in runs[world_size].items():
            assert result["replicas_equal"], (world_size, name)


@pytest.mark.parametrize("split", ["halves", "full"])
def test_sync_batchnorm_is_world_size_invariant_at_a_fixed_k(runs, split):
    for k in (1, 2):
        reference = runs[1][f"bn-sync-{split}-k{k}"]["state"]
        for world_size in WORLD_SIZES[1:]:
            assert _max_diff(runs[world_size][f"bn-sync-{split}-k{k}"]["state"], reference) < TOL, (world_size, k)


@pytest.mark.parametrize("split", ["halves", "full"])
def test_ghost_batchnorm_is_invariant_in_world_size_and_micro_steps(runs, split):
    reference = runs[1][f"bn-ghost-{split}-k1"]["state"]
    assert any("running_mean" in key for key in reference)  # the buffers are compared, not only parameters
    for world_size in WORLD_SIZES:
        for k in (1, 2):
            assert _max_diff(runs[world_size][f"bn-ghost-{split}-k{k}"]["state"], reference) < TOL, (world_size, k)


def test_local_batchnorm_depends_on_the_world_size(runs):
    """The contrast: with each rank normalising its own samples the trajectory moves with the ranks."""
    local = runs[2]["bn-local-halves-k1"]["state"]
    assert _max_diff(local, runs[1]["bn-local-halves-k1"]["state"]) > 100 * TOL


RESUME = [
    "train",
    "--config",
    "quickstart",
    *sets(*CNN, "train.progress=false", "train.max_steps=8", "train.checkpoint_every=2", "optim.lr=0.1"),
]


@pytest.mark.parametrize(("mode", "resume_on"), [("ghost", 1), ("ghost", 4), ("sync", 1)])
def test_stopped_at_two_ranks_and_resumed_elsewhere_ends_where_the_uninterrupted_run_does(tmp_path, mode, resume_on):
    args = [*RESUME, *sets(*BN_MODES[mode])]
    full = run_torchrun(2, *args, "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = run_torchrun(2, *args, "--set", "train.crash_at_step=5", "--run-dir", str(tmp_path / "moved"))
    assert crashed.returncode != 0  # the last rank died at step 5, after the step-4 checkpoint
    resumed = (
        run_cli(*args, "--set", "train.crash_at_step=5", "--run-dir", str(tmp_path / "moved"))
        if resume_on == 1
        else run_torchrun(resume_on, *args, "--set", "train.crash_at_step=5", "--run-dir", str(tmp_path / "moved"))
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    want, got = final_params(tmp_path / "full"), final_params(tmp_path / "moved")
    for key in want:
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=TOL, atol=TOL, msg=key)
