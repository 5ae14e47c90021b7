"""``backend: fsdp``: the same algorithm as one process, on shards (SPEC section 7, noise under sharding).

One process group per world size runs every variant (tests/fsdp_workers.py); the checkpoint tests go
through the CLI under torchrun.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ssgd_dist.analysis.flatness_run import measure_run
from ssgd_dist.backends import check_launch
from ssgd_dist.backends.dcp import read_whole_model
from ssgd_dist.backends.fsdp import shard_units
from ssgd_dist.config import FlatnessOptions, load_config
from ssgd_dist.data import load_dataset
from ssgd_dist.errors import ConfigError
from ssgd_dist.models import build_model
from tests.conftest import TINY, final_params, run_torchrun, sets, spawn_per_world_size
from tests.dist_workers import assert_noise_holds_one_shard
from tests.fsdp_workers import run_variants

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
TOL = 1e-5
MLP = ["data.num_samples=2000", "data.batch_size=256", "model.hidden=[32,32]", "train.num_threads=1"]
CNN = ["data.num_samples=2000", "data.batch_size=256", "model.name=cnn1d", "model.batchnorm=true"]
VARIANTS = {
    "sgd": MLP + ["method=sgd"],
    "halves": MLP + ["method=ssgd", "ssgd.batch_split=halves"],
    "full": MLP + ["method=ssgd", "ssgd.batch_split=full"],
    "regenerate": MLP + ["method=ssgd", "noise.restore=regenerate"],
    "filter-norm-all": MLP + ["method=ssgd", "noise.scale=filter_norm", "noise.targets=all"],
    "gni": MLP + ["method=gni"],
    "smoothout": MLP + ["method=smoothout"],
    "nso": MLP + ["method=nso", "nso.num_samples=2", "nso.clean_pass=true"],
    "rwp": MLP + ["method=rwp"],
    "halves-k2": MLP + ["method=ssgd", "train.accumulation_steps=2"],
    "wide": MLP + ["method=sgd", "model.hidden=[256,256]"],  # where memory is measured: weights >> bookkeeping
    "ghost-bn": CNN + ["method=ssgd", "model.bn_mode=ghost", "model.bn_ghost_batch=8"],
}
BF16 = {"bf16": MLP + ["method=ssgd", "train.precision=bf16"]}  # MixedPrecisionPolicy vs autocast: to bf16 rounding
WORLD_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    return spawn_per_world_size(
        run_variants, WORLD_SIZES, lambda _: {**VARIANTS, **BF16}, STEPS, tmp_path_factory, "fsdp"
    )


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_runs_end_where_one_process_ends(runs, variant):
    reference = runs[1][variant]["state"]
    for world_size in WORLD_SIZES[1:]:
        assert _max_diff(runs[world_size][variant]["state"], reference) < TOL, world_size


def test_bf16_shards_train_within_bf16_rounding_of_one_process(runs):
    reference = runs[1]["bf16"]["state"]
    assert all(torch.isfinite(t).all() for t in reference.values())
    for world_size in WORLD_SIZES[1:]:
        assert _max_diff(runs[world_size]["bf16"]["state"], reference) < 5e-3, world_size


def test_the_methods_really_differ_so_the_tolerance_means_something(runs):
    one = runs[1]
    assert _max_diff(one["halves"]["state"], one["sgd"]["state"]) > 100 * TOL
    assert _max_diff(one["halves"]["state"], one["full"]["state"]) > 100 * TOL
    assert _max_diff(one["gni"]["state"], one["smoothout"]["state"]) > 100 * TOL


def test_noise_on_a_shard_is_that_slice_of_the_unsharded_noise(runs):
    for world_size in WORLD_SIZES[1:]:
        for rank, result in enumerate(runs[world_size]["per_rank"]):
            assert result["shards"]["unit_exact"], (world_size, rank)
            assert result["shards"]["scaled_max_diff"] < 1e-6, (world_size, rank)


def test_one_reduce_scatter_per_unit_per_step_as_for_sgd(runs):
    """Every S-SGD step reduce-scatters exactly what an SGD step does: the first pass keeps its gradient."""
    for world_size in WORLD_SIZES[1:]:
        sgd = runs[world_size]["sgd"]["per_step"]
        units = 4  # the MLP's three Linear layers and the root (which holds no parameters of its own)
        assert all(step["calls"] <= units for step in sgd) and sgd[0]["calls"] >= 3
        reductions = [{k: step[k] for k in ("calls", "bytes")} for step in sgd]
        for variant in ("halves", "full", "regenerate", "halves-k2", "gni"):
            ours = runs[world_size][variant]["per_step"]
            assert [{k: step[k] for k in ("calls", "bytes")} for step in ours] == reductions, (world_size, variant)


def test_two_passes_gather_the_weights_twice_as_often_as_one(runs):
    """What S-SGD does cost on shards: every pass gathers each unit for its forward and its backward."""
    for world_size in WORLD_SIZES[1:]:
        sgd = runs[world_size]["sgd"]["per_step"]
        assert all(step["gathers"] == 6 for step in sgd)  # 3 Linear units, forward and backward
        for variant, passes in (("halves", 2), ("full", 2), ("gni", 1), ("halves-k2", 4)):
            for ours, base in zip(runs[world_size][variant]["per_step"], sgd, strict=True):
                assert (ours["gathers"], ours["gathered_bytes"]) == (
                    passes * base["gathers"],
                    passes * base["gathered_bytes"],
                ), (world_size, variant)


def test_noise_holds_one_shard_with_copy_and_nothing_with_regenerate(runs):
    for world_size in WORLD_SIZES[1:]:
        for result in runs[world_size]["per_rank"]:
            assert_noise_holds_one_shard(result["memory"], world_size)


ARGS = ["train", "--config", "quickstart", *TINY, *sets("train.epochs=2", "train.checkpoint_every=3", "backend=fsdp")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The 2-rank run every stopped one must end on, keeping its sharded checkpoints (the format does not
    change the trajectory)."""
    run_dir = tmp_path_factory.mktemp("fsdp-uninterrupted") / "full"
    proc = run_torchrun(2, *ARGS, *sets("train.keep_checkpoints=10"), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize("checkpoint", ["sharded", "full"])
def test_a_sharded_run_stopped_at_four_ranks_resumes_at_two(tmp_path, uninterrupted, checkpoint):
    args = [*ARGS, *sets(f"fsdp.checkpoint={checkpoint}", "train.keep_checkpoints=10")]
    crashed = run_torchrun(4, *args, "--set", "train.crash_at_step=8", "--run-dir", str(tmp_path / "resumed"))
    assert crashed.returncode != 0
    ckpts = tmp_path / "resumed/checkpoints"
    if checkpoint == "sharded":  # each of the 4 ranks wrote its own shards; nothing was gathered
        assert not (ckpts / "last.pt").exists()
        shards = ckpts / "step-00000006.dcp"
        assert {p.name for p in shards.iterdir()} == {f"__{r}_0.distcp" for r in range(4)} | {".metadata", "meta.pt"}
        assert torch.load(shards / "meta.pt", weights_only=True)["step"] == 6
        # Read whole in one process (what ``flatness`` does): 4 ranks' shards and 2 ranks' give one model.
        like = final_params(uninterrupted)
        a = read_whole_model(shards, like)["model"]
        b = read_whole_model(uninterrupted / "checkpoints/step-00000006.dcp", like)["model"]
        assert max(float((a[k] - b[k]).abs().max()) for k in like) < TOL
        assert max(float((a[k] - like[k]).abs().max()) for k in like) > 1e-3  # step 6, not the end
        # ``flatness`` on a run stopped before its plain last.pt: the newest sharded checkpoint, read whole
        quick = FlatnessOptions(
            samples=200, radii=(0.01,), draws=1, power_iters=0, hutchinson=0, landscape_1d=0, landscape_2d=0
        )
        measured = measure_run(tmp_path / "resumed", quick, figures=False)
        assert measured["step"] == 6 and measured["checkpoint"].endswith("step-00000006.dcp")
        damaged = shutil.copytree(shards, tmp_path / "damaged.dcp")
        (damaged / "__3_0.distcp").unlink()
        with pytest.raises(ConfigError, match="cannot be read as a sharded checkpoint.*__3_0.distcp"):
            measure_run(tmp_path / "resumed", quick, checkpoint=damaged, figures=False)
    else:
        assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == 6
    resumed = run_torchrun(2, *args, "--set", "train.crash_at_step=8", "--run-dir", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and f"step-00000006.{'dcp' if checkpoint == 'sharded' else 'pt'}" in (
        resumed.stdout
    )
    a, b = final_params(uninterrupted), final_params(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOL

    # last.pt is the plain contract: the unwrapped model's state dict, loaded without unpickling code
    cfg = load_config("quickstart", [*args[3:][1::2]])
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(final_params(tmp_path / "resumed"), strict=True)


def test_fsdp_refuses_what_it_cannot_shard():
    """Refused before any rank starts (``backends.check_launch``, exit 2 from the CLI)."""
    for extra, message in (
        (["method=sam"], "unreduced gradient"),
        (["train.precision=fp16"], "fp16"),
        # each rank would perturb its rows with its own sign, and every rank would gather the mix
        (["ssgd.batch_split=paired"], "different weights"),
        (["method=rwp", "rwp.split=ranks"], "different weights"),
    ):
        cfg = load_config("quickstart", ["backend=fsdp", *extra])
        with pytest.raises(ConfigError, match=message):
            check_launch(cfg, 2)
    check_launch(load_config("quickstart", ["backend=fsdp", "method=rwp"]), 2)  # the two-pass form shards
    with pytest.raises(ConfigError, match="single process"):
        check_launch(load_config("quickstart", ["backend=fsdp"]), 1, process_group=False)


def test_wrap_names_units_by_class_and_refuses_unknown_ones():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 2)))
    assert shard_units(model, []) == [model[0], model[2]]  # the children that hold parameters
    assert shard_units(model, ["Linear"]) == [model[0], model[2][0]]
    with pytest.raises(ConfigError, match=r"Conv9d.*Linear"):
        shard_units(model, ["Conv9d"])
