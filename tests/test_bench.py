"""`ssgd-dist bench` end to end on a tiny configuration, the projection's arithmetic by hand, and the
memory of the noise step (one copy, or none in `regenerate` mode) counted by allocation."""

import json
import math

import pytest
import torch
from torch import nn

from ssgd_dist.bench.memory import AllocationTracker
from ssgd_dist.bench.projection import project_step, projection, ring_allreduce_seconds
from ssgd_dist.cli import main
from ssgd_dist.noise import Perturber, draw_noise, noise_generator

RESULT_FIELDS = {
    "method",
    "batch_split",
    "step_time_s",
    "ratio_step_time",
    "ratio_step_time_ga2",
    "comm_bytes_per_step",
    "ratio_comm_bytes",
    "extra_memory_params",
    "noise_fraction",
    "samples_per_s",
    "peak_memory_bytes",
}


@pytest.mark.distributed
def test_bench_runs_end_to_end_and_reports_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--model",
            "mlp",
            "--batch-size",
            "16",
            "--world-size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--burst",
            "2",
            "--threads",
            "1",
            "--project",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ssgd-halves" in printed and "PROJECTION" in printed and "MODEL, not a measurement" in printed
    report = json.loads(out.read_text())
    for key in ("machine", "torch", "model", "world_size", "batch_size", "results", "projection"):
        assert key in report
    assert (report["model"], report["world_size"], report["batch_size"], report["burst"]) == ("mlp", 2, 16, 2)
    by = {r["variant"]: r for r in report["results"]}
    assert set(by) == {
        "sgd",
        "sgd-ga2",
        "ssgd-halves",
        "ssgd-paired",
        "ssgd-full",
        "ssgd-halves-regenerate",
        "ssgd-naive",
        "sam",
        "ssgd-halves-syncbn",  # on the MLP: no BatchNorm to synchronise, the same step as halves
    }
    for r in report["results"]:
        assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
        assert r["step_time_s"] > 0 and 0 <= r["noise_fraction"] < 1

    # Gradient bytes: every gradient once per step (the MLP's fp32 parameters), S-SGD exactly as SGD.
    mlp = nn.Sequential(nn.Linear(40, 256), nn.Linear(256, 256), nn.Linear(256, 10))
    grad_bytes = 4 * sum(p.numel() for p in mlp.parameters())
    assert by["sgd"]["comm_bytes_per_step"] == grad_bytes
    for name in ("sgd-ga2", "ssgd-halves", "ssgd-paired", "ssgd-full", "ssgd-halves-regenerate", "sam"):
        assert by[name]["ratio_comm_bytes"] == 1.0, name
    assert by["ssgd-naive"]["ratio_comm_bytes"] == 2.0
    assert (by["ssgd-halves"]["method"], by["ssgd-halves"]["batch_split"]) == ("ssgd", "halves")
    assert by["sgd"]["batch_split"] is None and by["sgd"]["ratio_step_time"] == 1.0

    # Memory (counted by allocation, not timed): S-SGD over the same passes without noise holds one copy
    # of the perturbed weights (all but the 522 biases: 0.9934 of the parameters); `regenerate` holds
    # none, only one noise tensor at a time (at most the 256 x 256 kernel, 0.83 of the parameters),
    # which at this tiny batch can stick out of the backward's peak a little.
    weights_fraction = 1 - 522 / (grad_bytes / 4)
    assert by["ssgd-halves"]["extra_memory_params_ga2"] == pytest.approx(weights_fraction, abs=0.02)
    assert by["ssgd-halves-regenerate"]["extra_memory_params_ga2"] <= 256 * 256 / (grad_bytes / 4)
    assert by["ssgd-halves-regenerate"]["extra_memory_params_ga2"] < by["ssgd-halves"]["extra_memory_params_ga2"] / 2
    assert by["ssgd-paired"]["extra_memory_params"] == pytest.approx(weights_fraction, abs=0.02)
    # Held between steps: exactly the backup of the weights, or nothing.
    assert by["ssgd-halves"]["extra_held_memory_params"] == pytest.approx(weights_fraction, abs=1e-3)
    assert by["ssgd-halves-regenerate"]["extra_held_memory_params"] == pytest.approx(0.0, abs=1e-3)
    assert by["sgd-ga2"]["extra_held_memory_params"] == pytest.approx(0.0, abs=1e-3)

    rows = report["projection"]["rows"]
    assert [r["gpus"] for r in rows] == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert report["projection"]["grad_bytes"] == grad_bytes


def test_bench_runs_one_rank_in_process_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "one.json"
    rc = main(
        [
            "bench",
            "--model",
            "cnn1d",
            "--batch-size",
            "8",
            "--world-size",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--variants",
            "ssgd-halves,ssgd-paired",
            "--no-memory",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["sgd", "ssgd-halves"]  # sgd always, the reference
    assert "even number of ranks" in report["skipped"]["ssgd-paired"]
    assert report["results"][1]["ratio_comm_bytes"] == 1.0 and report["results"][1]["peak_memory_bytes"] is None
    assert not torch.distributed.is_initialized()  # the in-process group is torn down


def test_bench_on_fsdp_reduces_once_and_holds_a_shard(tmp_path):
    """``--backend fsdp``: S-SGD reduce-scatters what SGD does (the hand-written form twice) and gathers the
    weights twice as much (once per pass), its noise backup
    is this rank's shard (about half the perturbed weights on 2 ranks) and nothing with regenerate; SAM is
    left out, said why."""
    out = tmp_path / "fsdp.json"
    args = ["bench", "--backend", "fsdp", "--model", "mlp", "--batch-size", "64", "--world-size", "2"]
    args += ["--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(out)]
    args += ["--variants", "ssgd-halves,ssgd-halves-regenerate,ssgd-naive,sam"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    by = {r["variant"]: r for r in report["results"]}
    assert by["sgd"]["comm_bytes_per_step"] > 0
    assert by["ssgd-halves"]["ratio_comm_bytes"] == 1.0
    assert by["ssgd-halves-regenerate"]["ratio_comm_bytes"] == 1.0
    assert by["ssgd-naive"]["ratio_comm_bytes"] == 2.0
    assert by["sgd"]["gathered_bytes_per_step"] > 0 and by["ssgd-halves"]["ratio_gathered_bytes"] == 2.0  # 2 passes
    assert 0.4 < by["ssgd-halves"]["extra_held_memory_params"] <= 0.5 + 0.02
    assert abs(by["ssgd-halves-regenerate"]["extra_held_memory_params"]) < 0.02
    assert "sam" not in by and "unreduced gradient" in json.dumps(report)


def test_bench_refuses_a_batch_that_does_not_split(capsys):
    assert main(["bench", "--batch-size", "6", "--world-size", "2"]) == 2
    assert "--batch-size 6" in capsys.readouterr().err


def test_ring_allreduce_cost_by_hand():
    # 1 GB over 8 GPUs at 25 GB/s in 2 calls of 50 us: 2 x 50e-6 + 2 x 7/8 x 1e9 / 25e9 = 0.0701 s
    assert ring_allreduce_seconds(1e9, 8, 25e9, 50e-6, calls=2) == pytest.approx(0.0701)
    assert ring_allreduce_seconds(1e9, 1, 25e9, 50e-6) == 0.0  # nothing to reduce alone
    # 4 GPUs, 10 GB/s, no latency: one all-reduce of 1 GB = 2 x 3/4 x 0.1 s = 0.15 s; two of them 0.3 s;
    # half hidden behind compute: step = 0.1 + 0.5 x 0.3 = 0.25 s; efficiency 0.1 / 0.25 = 0.4
    r = project_step(0.1, 1e9, 2, 4, 10e9, 0.0, overlap=0.5)
    assert r["comm_s"] == pytest.approx(0.3)
    assert r["step_s"] == pytest.approx(0.25)
    assert r["efficiency"] == pytest.approx(0.4)


def test_projection_table_by_hand():
    # 100 MB of gradient, 10 GB/s, 100 us per call, 4 calls, no overlap; compute 50 ms (sgd), 52 ms (ssgd).
    p = projection(
        {"sgd": 0.050, "ssgd": 0.052}, 100e6, calls=4, bandwidth_gbs=10, latency_us=100, overlap=0.0, gpus=(8, 1024)
    )
    ar8 = 4 * 100e-6 + 2 * 7 / 8 * 100e6 / 10e9  # 0.0179 s
    row = p["rows"][0]
    assert row["gpus"] == 8
    assert row["sgd"]["step_s"] == pytest.approx(0.050 + ar8)
    assert row["ssgd"]["step_s"] == pytest.approx(0.052 + ar8)
    assert row["ssgd-naive"]["step_s"] == pytest.approx(0.052 + 2 * ar8)
    assert row["ssgd"]["efficiency"] == pytest.approx(0.052 / (0.052 + ar8))
    assert row["naive_over_ssgd"] == pytest.approx((0.052 + 2 * ar8) / (0.052 + ar8))
    ar1024 = 4 * 100e-6 + 2 * 1023 / 1024 * 100e6 / 10e9
    assert p["rows"][1]["ssgd-naive"]["comm_s"] == pytest.approx(2 * ar1024)
    assert "MODEL" in p["note"]


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 32, generator=g), torch.randn(128, 64, generator=g), torch.randn(10, 128, generator=g)]


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian", "sphere", "uniform"])
@pytest.mark.parametrize("scale", ["layer_rms", "filter_norm", "absolute"])
def test_regenerate_mode_draws_the_same_noise_and_restores_within_rounding(distribution, scale):
    w = _params()
    copy_mode, regen = [t.clone() for t in w], [t.clone() for t in w]
    a, b = Perturber(copy_mode), Perturber(regen, restore="regenerate")
    noise = list(draw_noise(w, distribution, scale, 0.3, noise_generator(4, 9, "cpu")))
    a.perturb(4, 9, distribution, scale, 0.3)
    b.perturb(4, 9, distribution, scale, 0.3)
    for p, q, t, n in zip(copy_mode, regen, w, noise):  # both at w + n, the documented noise
        assert torch.equal(p, q)
        assert torch.equal(p, t + n)
    a.reflect()
    b.reflect()
    for p, q, t, n in zip(copy_mode, regen, w, noise):  # both at w - n, to rounding
        tolerance = 4 * torch.finfo(t.dtype).eps * float((t.abs() + n.abs()).max())
        torch.testing.assert_close(p, t - n, rtol=0, atol=tolerance)
        torch.testing.assert_close(q, t - n, rtol=0, atol=tolerance)
    a.restore()
    b.restore()
    for p, q, t, n in zip(copy_mode, regen, w, noise):
        assert torch.equal(p, t)  # copy: bit-for-bit
        # regenerate: three roundings of |w| + |n| at most, far below the noise itself
        assert float((q - t).abs().max()) <= 4 * torch.finfo(t.dtype).eps * float((t.abs() + n.abs()).max())
    assert b._backup is None


def test_regenerate_refuses_elementwise_scale():
    with pytest.raises(ValueError, match="elementwise"):
        Perturber(_params(), restore="regenerate").perturb(0, 0, "rademacher", "elementwise", 0.3)


def test_noise_step_allocates_one_copy_or_none():
    """Allocation peak of perturb + reflect + restore: the backup in copy mode (noise drawn in place),
    one tensor at a time in regenerate mode."""
    sizes = {}
    for mode in ("copy", "regenerate"):
        params = _params()
        pert = Perturber(params, restore=mode)
        with AllocationTracker() as tracker:
            pert.perturb(1, 2, "rademacher", "layer_rms", 0.3)
            pert.reflect()
            pert.restore()
        sizes[mode] = tracker.peak
    total = sum(t.numel() * 4 for t in _params())
    largest = max(t.numel() * 4 for t in _params())
    small = 1024  # the per-tensor sigmas (0-d tensors)
    assert total <= sizes["copy"] <= total + small
    assert sizes["regenerate"] <= largest + small
    assert math.isclose(largest / total, 8192 / (2048 + 8192 + 1280))
