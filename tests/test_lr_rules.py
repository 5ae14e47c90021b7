"""Learning-rate rules (linear scaling, warm-up, step / cosine / constant) and LARS, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ssgd_dist.config import OptimConfig
from ssgd_dist.optimizers import LARS, build_optimizer, lr_at, peak_lr


def test_linear_scaling_from_a_reference_batch():
    cfg = OptimConfig(lr=0.1, reference_batch_size=256)
    assert peak_lr(cfg, 256) == pytest.approx(0.1)
    assert peak_lr(cfg, 1024) == pytest.approx(0.4)
    assert peak_lr(cfg, 8192) == pytest.approx(3.2)
    assert peak_lr(cfg, 32) == pytest.approx(0.0125)
    assert peak_lr(OptimConfig(lr=0.1), 8192) == pytest.approx(0.1)  # no reference: no scaling


def test_linear_warmup_then_cosine():
    # 100 steps, 10 of warm-up, peak 0.4 (0.1 at batch 256 scaled to 1024)
    cfg = OptimConfig(lr=0.1, reference_batch_size=256, warmup_fraction=0.1, schedule="cosine")
    lr = [lr_at(cfg, 1024, s, 100) for s in range(100)]
    assert lr[0] == pytest.approx(0.04)  # (0 + 1) / 10 of the peak
    assert lr[4] == pytest.approx(0.2)
    assert lr[9] == pytest.approx(0.4)
    assert lr[10] == pytest.approx(0.4)  # cosine starts at the peak after warm-up
    assert lr[55] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))  # = 0.2
    assert lr[55] == pytest.approx(0.2)
    assert lr[99] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # monotone decay


def test_step_schedule_decays_at_the_milestones():
    cfg = OptimConfig(lr=0.2, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert lr_at(cfg, 128, 0, 200) == pytest.approx(0.2)
    assert lr_at(cfg, 128, 99, 200) == pytest.approx(0.2)
    assert lr_at(cfg, 128, 100, 200) == pytest.approx(0.02)
    assert lr_at(cfg, 128, 149, 200) == pytest.approx(0.02)
    assert lr_at(cfg, 128, 150, 200) == pytest.approx(0.002)
    assert lr_at(cfg, 128, 199, 200) == pytest.approx(0.002)


def test_constant_schedule_with_warmup():
    cfg = OptimConfig(lr=0.5, schedule="constant", warmup_fraction=0.25)
    assert [lr_at(cfg, 64, s, 8) for s in range(8)] == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_lars_step_by_hand():
    """w = [[3, 4]] (norm 5), g = [[0.6, 0.8]] (norm 1), weight decay 0.1, trust coefficient 0.001:
    d = g + 0.1 w = [0.9, 1.2]; trust = 0.001 * 5 / (1 + 0.1 * 5) = 1/300; step 1: w -= lr * d * trust.
    The bias (1-D) gets neither trust ratio nor weight decay: b -= lr * g_b. Step 2 adds momentum."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=1.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    opt.step()
    d1 = torch.tensor([[0.9, 1.2]]) / 300
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - d1)
    torch.testing.assert_close(b.detach(), torch.tensor([0.5]))
    # step 2: same gradient; the new trust ratio from the new weights, buffer = 0.9 * d1 + d2
    w1 = w.detach().clone()
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    opt.step()
    w_norm = float(w1.norm())
    d2 = (torch.tensor([[0.6, 0.8]]) + 0.1 * w1) * (0.001 * w_norm / (1.0 + 0.1 * w_norm))
    torch.testing.assert_close(w.detach(), w1 - (0.9 * d1 + d2))
    torch.testing.assert_close(b.detach(), torch.tensor([0.5 - (0.9 * 0.5 + 0.5)]))


def test_lars_zero_weights_fall_back_to_plain_sgd():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))


def test_build_optimizer_settings():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4), params)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    adamw = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95)), params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)
    lars = build_optimizer(OptimConfig(name="lars", lr=1.0, trust_coefficient=0.02), params)
    assert isinstance(lars, LARS) and lars.defaults["trust_coefficient"] == 0.02
    # nesterov without momentum would be rejected by torch: it is switched off instead
    plain = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.0, nesterov=True), params)
    assert not plain.defaults["nesterov"]
