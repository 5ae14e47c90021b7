"""DeepSpeed ZeRO-3 (``deepspeed.zero_stage: 3``): weight noise on parameter partitions, on real engines.

One 2-rank launch of ``ds_worker.py`` (DeepSpeed on CPU, gloo) trains the cases below through the real
Trainer. The references are DDP runs of the same configs in the same launch. A ZeRO-3 rank holds a flat
range of each parameter's elements (``ds_tensor``); S-SGD must perturb exactly those elements by the values
the unsharded run adds there, and the next forward (which all-gathers the partitions) must see them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from ssgd_dist.backends.deepspeed import check_zero3
from ssgd_dist.config import load_config
from ssgd_dist.errors import ConfigError
from ssgd_dist.methods import method_class
from ssgd_dist.models import build_model
from tests.conftest import TINY, run_cli, sets
from tests.dist_workers import assert_noise_holds_one_shard

sys.path.insert(0, str(Path(__file__).parent))
from cases import EXTRA_METHODS, METHODS, case, checkpoint, ds, launch, result  # noqa: E402

pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed]

COMPARED = {
    "sgd": METHODS["sgd"],
    "halves": METHODS["halves"],
    "full": METHODS["full"],
    "gni": EXTRA_METHODS["gni"],
    # filter_norm on every tensor: rows (and the 1-D biases) that ZeRO-3 cuts between the ranks
    "filter-norm": ["method=ssgd", "noise.scale=filter_norm", "noise.targets=all"],
    "rwp": ["method=rwp"],  # RWP's filter norms, the same shard-aware helper
    "halves-k2": EXTRA_METHODS["halves-k2"],  # 2 passes x 2 micro-steps in one coalesced step
    "adamw": EXTRA_METHODS["adamw"],
    "clip": EXTRA_METHODS["clip"],  # DeepSpeed's gradient clipping: the norm over every rank's partitions
    "bn": EXTRA_METHODS["bn"],  # a CNN with BatchNorm: 3-D kernels, unpartitioned running statistics
}
TOL = 1e-5


def zero3_cases() -> list[dict]:
    cases = [case(f"ddp-{m}", ["backend=ddp", *s]) for m, s in COMPARED.items()]
    cases += [case(f"z3-{m}", ds(3, *s)) for m, s in COMPARED.items()]
    cases += [
        case("z3-halves-boundary", ds(3, *METHODS["halves"]), sync="boundary"),
        case("z3-halves-resumed", ds(3, *METHODS["halves"]), resume_from=("z3-halves", 2)),
        case("z3-adamw-resumed", ds(3, *EXTRA_METHODS["adamw"]), resume_from=("z3-adamw", 2)),
        case("z3-bf16-halves", ds(3, *METHODS["halves"], "deepspeed.bf16=true")),
        {"name": "z3-noise", "zero3_noise": True},
        case("z3-paired", ds(3, *EXTRA_METHODS["paired"])),  # refused
        case(
            "z3-persistent",  # refused: a parameter kept gathered would forward without its noise
            ds(3, *METHODS["halves"], "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=100000"),
        ),
    ]
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch(zero3_cases(), tmp_path_factory.mktemp("zero3-runs"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("method", list(COMPARED))
def test_zero3_ends_where_ddp_ends(runs, method):
    r = result(runs, f"z3-{method}")
    assert r["zero3"] and r["summary"]["step"] == 4
    assert r["parameter_mismatches"] == {}  # the gathered weights are the same on both ranks
    assert r["restore_mismatches"] == [0, 0, 0, 0]  # every partition restored bit for bit before each step
    assert max_diff(checkpoint(runs, f"z3-{method}")["model"], checkpoint(runs, f"ddp-{method}")["model"]) < TOL


def test_the_noise_reaches_the_forward(runs):
    """If the perturbed partitions were not what the next forward gathers, S-SGD would train like SGD."""
    sgd = checkpoint(runs, "z3-sgd")["model"]
    for method in ("halves", "full", "gni", "filter-norm", "rwp", "halves-k2"):
        assert max_diff(checkpoint(runs, f"z3-{method}")["model"], sgd) > 100 * TOL, method


def test_noise_on_a_partition_is_that_slice_of_the_unsharded_noise(runs):
    shards = result(runs, "z3-noise")["shards"]
    assert shards["ragged"] >= 3 and shards["split_rows"] >= 2  # the awkward layouts are really there
    assert shards["unit_exact"]  # rademacher and gaussian draws: exactly the flat slice
    assert shards["scaled_max_diff"] < 1e-6  # layer_rms and filter_norm, copy and regenerate
    assert shards["padding_untouched"] and shards["restored_exact"]


def test_noise_holds_one_partition_with_copy_and_nothing_with_regenerate(runs):
    memory = result(runs, "z3-noise")["memory"]
    assert len(memory) == 2
    for rank_memory in memory:
        assert_noise_holds_one_shard(rank_memory, world_size=2)


def test_ssgd_reduces_gradients_once_per_step_as_sgd(runs):
    sgd = result(runs, "z3-sgd")["per_step"]
    assert [s["grad_reductions"] for s in sgd] == [1] * 4
    for name in ("z3-halves", "z3-full", "z3-halves-k2"):
        per_step = result(runs, name)["per_step"]
        assert [s["grad_reductions"] for s in per_step] == [1] * 4, name
        assert [s["grad_reduction_bytes"] for s in per_step] == [s["grad_reduction_bytes"] for s in sgd]
    # What ZeRO-3 costs S-SGD instead: the weights are all-gathered for every forward and every backward, so
    # two passes gather twice what SGD's one does.
    halves = result(runs, "z3-halves")["per_step"]
    assert [s["grad_gathers"] for s in halves] == [2 * s["grad_gathers"] for s in sgd]
    assert [s["grad_gather_bytes"] for s in halves] == [2 * s["grad_gather_bytes"] for s in sgd]
    # The accumulation-boundary trick reduces in every ZeRO-3 backward: twice per S-SGD step.
    boundary = result(runs, "z3-halves-boundary")
    assert result(runs, "z3-halves")["sync"] == "coalesce" and boundary["sync"] == "boundary"
    assert [s["grad_reductions"] for s in boundary["per_step"]] == [2] * 4
    assert max_diff(checkpoint(runs, "z3-halves-boundary")["model"], checkpoint(runs, "z3-halves")["model"]) < TOL


@pytest.mark.parametrize("method", ["halves", "adamw"])
def test_checkpoint_is_the_plain_format_and_resumes(runs, method):
    """Full fp32 tensors and a torch-format optimizer state (loadable with weights_only=True, the DDP
    checkpoint's keys and shapes; momentum, Adam's moments and step); resuming from step 2 ends bit for bit
    where the uninterrupted run ends."""
    ours, ddp = checkpoint(runs, f"z3-{method}", 2), checkpoint(runs, f"ddp-{method}", 2)
    assert max_diff(ours["model"], ddp["model"]) < TOL
    cfg = load_config("quickstart", result(runs, f"z3-{method}")["sets"])
    build_model(cfg.model, (40,), 10).load_state_dict(ours["model"])  # the plain model takes it (strict)
    assert ours["optimizer"]["state"].keys() == ddp["optimizer"]["state"].keys()
    for index, entry in ddp["optimizer"]["state"].items():
        assert ours["optimizer"]["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(ours["optimizer"]["state"][index][key], value, rtol=0, atol=TOL)
    assert [g["params"] for g in ours["optimizer"]["param_groups"]] == [
        g["params"] for g in ddp["optimizer"]["param_groups"]
    ]
    resumed = result(runs, f"z3-{method}-resumed")
    assert len(resumed["per_step"]) == 2
    assert max_diff(checkpoint(runs, f"z3-{method}-resumed")["model"], checkpoint(runs, f"z3-{method}")["model"]) == 0.0


def test_a_two_rank_zero3_checkpoint_resumes_in_one_process(runs, tmp_path):
    """Another world size: one process reads the full tensors and keeps the whole as its partition."""
    source = runs[0] / "z3-halves"
    run_dir = tmp_path / "one"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copyfile(source / "checkpoints" / "step-00000002.pt", run_dir / "checkpoints" / "last.pt")
    shutil.copyfile(source / "config.yaml", run_dir / "config.yaml")
    args = [a for a in next(c for c in zero3_cases() if c["name"] == "z3-halves")["sets"]]
    proc = run_cli(
        "train", "--config", "quickstart", *sets(*args), "--run-dir", str(run_dir), timeout=300, env=ONE_PROCESS
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert got["step"] == 4 and got["world_size"] == 1
    assert max_diff(got["model"], checkpoint(runs, "z3-halves")["model"]) < TOL


ONE_PROCESS = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def test_bf16_trains_on_bf16_partitions(runs):
    r = result(runs, "z3-bf16-halves")
    assert r["param_dtype"] == "torch.bfloat16" and r["params_finite"] and r["parameter_mismatches"] == {}
    assert r["restore_mismatches"] == [0, 0, 0, 0]
    model = checkpoint(runs, "z3-bf16-halves")["model"]
    assert all(v.dtype == torch.float32 for v in model.values())  # the fp32 master weights
    assert max_diff(model, checkpoint(runs, "ddp-halves")["model"]) < 0.02


def test_what_zero3_cannot_run_is_refused(runs):
    assert "ZeRO-3 ranks gather one shared set of weights" in runs[1]["z3-paired"]["error"]
    assert "stage3_param_persistence_threshold" in runs[1]["z3-persistent"]["error"]


def test_a_refused_zero3_config_exits_2(tmp_path):
    proc = run_cli(
        "train",
        "--config",
        "quickstart",
        *TINY,
        *sets(
            "train.max_steps=1",
            "backend=deepspeed",
            "deepspeed.zero_stage=3",
            "deepspeed.extra.zero_optimization.stage3_max_reuse_distance=1000",
        ),
        "--run-dir",
        str(tmp_path / "z3"),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "deepspeed.extra.zero_optimization.stage3_max_reuse_distance" in proc.stderr


@pytest.mark.parametrize(
    "zero",
    [
        {"offload_param": {"device": "cpu"}},
        {"cpu_offload_param": True},  # DeepSpeed's old name for offload_param
        {"zero_hpz_partition_size": 2},
        {"mics_shard_size": 2},
        {"stage3_prefetch_bucket_size": 0},  # set by the backend, not by the user
    ],
)
def test_zero3_refuses_weights_kept_elsewhere_and_the_keys_it_sets(zero):
    cfg = load_config("quickstart", ["backend=deepspeed", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match=next(iter(zero))):
        check_zero3(cfg, method_class(cfg), zero)


def test_zero3_takes_those_keys_when_they_are_off():
    cfg = load_config("quickstart", ["backend=deepspeed", "deepspeed.zero_stage=3"])
    off = {"offload_param": {"device": "none"}, "cpu_offload_param": False, "zero_hpz_partition_size": 1}
    check_zero3(cfg, method_class(cfg), {**off, "mics_shard_size": -1})
