"""Flatness measures against closed forms: a quadratic with a known Hessian, exact perturbation sums,
filter-normalised directions, the plots, and 2 gloo ranks against 1 process."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ssgd_dist.analysis.flatness import (
    LossOracle,
    filter_normalized_direction,
    hessian_trace,
    loss_landscape,
    measure,
    perturbation_sharpness,
    top_eigenvalue,
)
from ssgd_dist.analysis.flatness_run import write_outputs
from ssgd_dist.config import FlatnessOptions
from tests.dist_workers import leave_group


class Quadratic(nn.Module):
    """L(theta) = 1/2 (theta - c)^T H (theta - c), theta = [vec(w) (3x2), b (2)]; the input is ignored."""

    def __init__(self, hessian: torch.Tensor, center: torch.Tensor, start: torch.Tensor, dtype=torch.float64):
        super().__init__()
        self.register_buffer("H", hessian.to(dtype))
        self.register_buffer("c", center.to(dtype))
        self.w = nn.Parameter(start[:6].view(3, 2).clone().to(dtype))
        self.b = nn.Parameter(start[6:].clone().to(dtype))

    def forward(self, x):
        d = torch.cat([self.w.reshape(-1), self.b]) - self.c
        return (0.5 * d @ self.H @ d).expand(x.shape[0])


def mean_loss(out, y):
    return out.mean()


def _oracle(hessian, seed=0, dtype=torch.float64):
    """Float64 where only Hessian-vector products are involved; the weight-noise code works in float32."""
    gen = torch.Generator().manual_seed(seed)
    model = Quadratic(
        hessian,
        torch.randn(8, generator=gen, dtype=torch.float64),
        torch.randn(8, generator=gen, dtype=torch.float64),
        dtype,
    )
    x, y = torch.zeros(6, 1), torch.zeros(6)
    return model, LossOracle(model, x, y, mean_loss, batch_size=4)  # two chunks: 4 + 2 samples


def _rotated(eigenvalues, seed=0):
    q, _ = torch.linalg.qr(
        torch.randn(
            len(eigenvalues), len(eigenvalues), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
    )
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_hvp_is_the_hessian():
    h = _rotated([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, -0.5, 0.1])
    _, oracle = _oracle(h)
    for i in range(8):
        e = torch.zeros(8, dtype=torch.float64)
        e[i] = 1
        torch.testing.assert_close(oracle.hvp(e), h[:, i], atol=1e-12, rtol=1e-12)


def test_top_eigenvalue_of_a_quadratic():
    h = _rotated([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, -0.5, 0.1])
    _, oracle = _oracle(h)
    value, iters = top_eigenvalue(oracle, iters=200, tol=1e-9)
    assert abs(value - 5.0) < 1e-3, (value, iters)


def test_hessian_trace_of_a_quadratic():
    # Rademacher probes are exact on a diagonal Hessian (v_i^2 = 1): every probe returns tr(H).
    d = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, -0.5, 0.1], dtype=torch.float64)
    _, oracle = _oracle(torch.diag(d))
    trace, stderr = hessian_trace(oracle, probes=20)
    assert abs(trace - float(d.sum())) < 1e-3
    assert stderr < 1e-9
    # and unbiased on a rotated one (variance 2 sum_{i != j} H_ij^2 per probe)
    h = _rotated(d.tolist(), seed=3)
    _, oracle = _oracle(h)
    trace, stderr = hessian_trace(oracle, probes=400)
    assert abs(trace - float(d.sum())) < 4 * stderr + 1e-9


def test_top_eigenvalue_and_trace_on_a_diagonal_quadratic_through_measure():
    d = torch.tensor([4.0, 1.0, 0.5, 0.5, 0.2, 0.1, 2.0, 0.3], dtype=torch.float64)
    model, _ = _oracle(torch.diag(d), dtype=torch.float32)
    opts = FlatnessOptions(
        radii=(0.1,),
        draws=2,
        distribution="rademacher",
        power_iters=200,
        power_tol=1e-10,
        hutchinson=5,
        landscape_1d=0,
        landscape_2d=0,
    )
    result = measure(model, torch.zeros(6, 1), torch.zeros(6), opts, loss_fn=mean_loss)
    assert abs(result["hessian"]["top_eigenvalue"] - 4.0) < 1e-3
    assert abs(result["hessian"]["trace"] - float(d.sum())) < 1e-3


def test_perturbation_sharpness_is_exact_on_a_quadratic():
    """Symmetric pairs cancel the gradient term: 1/2 (L(w+n) + L(w-n)) - L(w) = 1/2 n^T H n, and with
    Rademacher noise of per-element size r * rms(w) on the only weight tensor w that is
    1/2 r^2 rms(w)^2 sum of H's diagonal over w's entries (H diagonal)."""
    d = torch.tensor([4.0, 1.0, 0.5, 0.5, 0.2, 0.1, 2.0, 0.3], dtype=torch.float64)
    # float64: in float32 the cancellation in L(w+n) + L(w-n) - 2 L(w) alone is ~1e-4 of the increase.
    model, oracle = _oracle(torch.diag(d), dtype=torch.float64)
    w_before = model.w.detach().clone()
    rms2 = float(model.w.detach().pow(2).mean())
    base, _, rows = perturbation_sharpness(oracle, [model.w], radii=[0.05, 0.2], draws=3, distribution="rademacher")
    for row in rows:
        expected = 0.5 * row["radius"] ** 2 * rms2 * float(d[:6].sum())
        assert row["loss_increase"] == pytest.approx(expected, rel=1e-4)
        assert row["loss_increase_std"] == pytest.approx(0.0, abs=1e-4 * expected)
    assert torch.equal(model.w.detach(), w_before)  # restored bit for bit
    assert base == pytest.approx(oracle.loss())


def test_filter_normalized_direction():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 3))
    params = [p for p in model.parameters()]
    dirs = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for p, d in zip(params, dirs):
        assert d.shape == p.shape
        if p.ndim <= 1:
            assert torch.count_nonzero(d) == 0  # biases and BatchNorm: no direction (Li et al.'s ignore biasbn)
        else:
            torch.testing.assert_close(
                d.reshape(p.shape[0], -1).norm(dim=1), p.detach().reshape(p.shape[0], -1).norm(dim=1)
            )


def test_landscape_centre_is_the_loss_and_weights_come_back(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    before = [p.detach().clone() for p in model.parameters()]
    oracle = LossOracle(model, x, y, batch_size=16)
    one = loss_landscape(oracle, points=5, span=1.0, dims=1)
    two = loss_landscape(oracle, points=3, span=0.5, dims=2)
    assert one["alphas"][2] == 0.0 and one["loss"][2] == pytest.approx(oracle.loss(), rel=1e-6)
    assert len(two["loss"]) == 3 and len(two["loss"][0]) == 3
    assert two["loss"][1][1] == pytest.approx(oracle.loss(), rel=1e-6)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    result = measure(
        model,
        x,
        y,
        FlatnessOptions(radii=(0.05, 0.1), draws=2, power_iters=10, hutchinson=3, landscape_1d=5, landscape_2d=3),
    )
    assert result["acc"] is not None and result["samples"] == 40
    path = write_outputs(result, tmp_path / "flat", title="tiny")
    assert json.loads(path.read_text())["hessian"]["top_eigenvalue"] == pytest.approx(
        result["hessian"]["top_eigenvalue"]
    )
    import matplotlib.image

    for name in ("perturbation.png", "landscape_1d.png", "landscape_2d.png"):
        img = matplotlib.image.imread(tmp_path / "flat" / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


# -- distributed: 2 gloo ranks, each a shard, give the single-process numbers -----------------------
def _tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opts = FlatnessOptions(
        radii=(0.05, 0.2), draws=3, power_iters=30, power_tol=0.0, hutchinson=4, landscape_1d=3, landscape_2d=0
    )
    return model, x, y, opts


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, y, opts = _tiny_problem()
        result = measure(model, x[rank::world], y[rank::world], opts)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        leave_group()


@pytest.mark.distributed
def test_two_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, x, y, opts = _tiny_problem()
    single = measure(model, x, y, opts)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["samples"] == 64
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert got["acc"] == pytest.approx(single["acc"])
        for a, b in zip(got["perturbation"], single["perturbation"]):
            assert a["loss_increase"] == pytest.approx(b["loss_increase"], rel=1e-4, abs=1e-7)
        assert got["hessian"]["top_eigenvalue"] == pytest.approx(single["hessian"]["top_eigenvalue"], rel=1e-4)
        assert got["hessian"]["trace"] == pytest.approx(single["hessian"]["trace"], rel=1e-4)
        assert got["landscape_1d"]["loss"] == pytest.approx(single["landscape_1d"]["loss"], rel=1e-5)
    assert math.isfinite(single["hessian"]["top_eigenvalue"])
