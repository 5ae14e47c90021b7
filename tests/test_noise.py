import math

import pytest
import torch
from torch import nn

from ssgd_dist.noise import (
    Perturber,
    alpha_at,
    draw_noise,
    noise_generator,
    noise_scale,
    select_targets,
    unit_noise,
)
from ssgd_dist.seeding import step_seed


def _noise(w, distribution="rademacher", scale="layer_rms", alpha=0.3, seed=0, step=0):
    return next(draw_noise([w], distribution, scale, alpha, noise_generator(seed, step, "cpu")))


def test_same_seed_and_step_give_identical_noise_and_neighbours_differ():
    w = torch.randn(64, 32)
    a, b = _noise(w, seed=3, step=11), _noise(w, seed=3, step=11)
    assert torch.equal(a, b)
    assert not torch.equal(a, _noise(w, seed=3, step=12))
    assert not torch.equal(a, _noise(w, seed=4, step=11))
    assert len({step_seed(s, t) for s in range(20) for t in range(200)}) == 4000


def test_noise_does_not_touch_the_global_rng():
    w = torch.randn(10, 10)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _noise(w)
    assert torch.equal(torch.rand(3), expected)


def test_rademacher_layer_rms_has_fixed_magnitude():
    w = torch.randn(128, 64) * 0.05
    n = _noise(w, "rademacher", "layer_rms", alpha=0.3)
    rms = w.pow(2).mean().sqrt()
    assert torch.allclose(n.abs(), torch.full_like(n, float(0.3 * rms)))
    assert 0.4 < (n > 0).float().mean() < 0.6


def test_sphere_has_fixed_norm():
    w = torch.randn(50, 40)
    n = _noise(w, "sphere", "absolute", alpha=0.5)
    assert math.isclose(float(n.norm()), 0.5 * math.sqrt(w.numel()), rel_tol=1e-5)


@pytest.mark.parametrize("distribution, bound", [("gaussian", None), ("uniform", math.sqrt(3))])
def test_gaussian_and_uniform_have_unit_variance(distribution, bound):
    xi = unit_noise(
        torch.Size([200_000]), distribution, noise_generator(1, 2, "cpu"), torch.float32, torch.device("cpu")
    )
    assert abs(float(xi.mean())) < 0.01
    assert abs(float(xi.var()) - 1.0) < 0.02
    if bound is not None:
        assert float(xi.abs().max()) <= bound + 1e-6


def test_scale_rules():
    w = torch.randn(8, 3, 5)
    per_filter = noise_scale(w, "filter_norm")
    assert per_filter.shape == (8, 1, 1)
    assert torch.allclose(per_filter.flatten(), torch.stack([f.pow(2).mean().sqrt() for f in w]))
    assert torch.equal(noise_scale(w, "elementwise"), w.abs())
    assert noise_scale(w, "absolute") == 1.0
    n = _noise(w, "rademacher", "elementwise", alpha=0.1)
    assert torch.allclose(n.abs(), 0.1 * w.abs())


def test_targets_weights_skips_biases_and_norm_parameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    weights = select_targets(model, "weights")
    assert [tuple(p.shape) for p in weights] == [(8, 4), (2, 8)]
    assert len(select_targets(model, "all")) == len(list(model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_perturb_reflect_restore_is_bit_exact(dtype):
    params = [torch.randn(33, 17).to(dtype), torch.randn(5, 4, 3).to(dtype)]
    before = [p.clone() for p in params]
    pert = Perturber(params)
    pert.save()
    pert.add(draw_noise(params, "rademacher", "layer_rms", 0.3, noise_generator(0, 0, "cpu")))
    assert not torch.equal(params[0], before[0])
    plus = [p.clone() for p in params]
    pert.reflect()
    for p, w, q in zip(params, before, plus):  # w - n mirrors w + n through w
        assert torch.allclose(
            (p.float() + q.float()) / 2, w.float(), atol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
        )
    pert.restore()
    for p, w in zip(params, before):
        assert torch.equal(p, w)


def test_alpha_schedules():
    assert alpha_at(0.3, "constant", 0.1, 50, 100) == 0.3
    assert alpha_at(0.3, "warmup", 0.1, 4, 100) == pytest.approx(0.3 * 5 / 10)
    assert alpha_at(0.3, "warmup", 0.1, 50, 100) == 0.3
    assert alpha_at(0.3, "cosine", 0.0, 0, 100) == pytest.approx(0.3)
    assert alpha_at(0.3, "cosine", 0.0, 50, 100) == pytest.approx(0.15)


@pytest.mark.parametrize("distribution", ["rademacher", "sphere"])
def test_float64_weights_are_perturbed_too(distribution):
    w = torch.randn(6, 5, dtype=torch.float64)
    pert = Perturber([w], restore="copy")
    before = w.clone()
    pert.perturb(0, 0, distribution, "layer_rms", 0.3)
    assert not torch.equal(w, before)
    pert.restore()
    assert torch.equal(w, before)
