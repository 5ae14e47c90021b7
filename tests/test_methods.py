"""Each method's step against a gradient computed by hand, independently of the backend code.

The noise of every expected value is ``tests.reference.noise``: the documented noise re-derived with
plain torch calls, never the package's own noise functions.
"""

import copy
import math

import pytest
import torch
from torch import nn

from ssgd_dist.backends.local import LocalBackend
from ssgd_dist.config import Config
from ssgd_dist.methods import build_method
from tests import reference

SEED, STEP, ALPHA = 7, 3, 0.3


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def hand_noise(model, distribution, step=STEP, alpha=ALPHA):
    """The noise the spec prescribes, built directly from torch's generator: n = alpha * rms(w) * xi."""
    return reference.noise(model, distribution, SEED, step, alpha)


def grad_at(model, noise, sign, x, y):
    """Gradient of the mean loss on (x, y) at w + sign * n, by a fresh copy of the model."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in noise:
                p.add_(sign * noise[name])
    loss = nn.functional.cross_entropy(m(x), y)
    return dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(loss, list(m.parameters()))))


def expected_grad(model, method, split):
    x, y = batch()
    if method == "sgd":
        return grad_at(model, {}, 0, x, y)
    if method in ("gni", "smoothout"):
        return grad_at(model, hand_noise(model, "gaussian" if method == "gni" else "uniform"), 1, x, y)
    n = hand_noise(model, "rademacher")
    (xp, yp), (xm, ym) = ((x[0::2], y[0::2]), (x[1::2], y[1::2])) if split == "halves" else ((x, y), (x, y))
    gp, gm = grad_at(model, n, 1, xp, yp), grad_at(model, n, -1, xm, ym)
    return {k: (gp[k] + gm[k]) / 2 for k in gp}


@pytest.mark.parametrize(
    "method, split", [("sgd", None), ("ssgd", "halves"), ("ssgd", "full"), ("gni", None), ("smoothout", None)]
)
def test_step_applies_the_methods_gradient_from_w(method, split):
    model = tiny_model()
    reference = copy.deepcopy(model)
    want = expected_grad(reference, method, split)
    cfg = Config(method=method, seed=SEED, noise={"alpha": ALPHA})
    if split:
        cfg.ssgd.batch_split = split
    lr = 0.5
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=lr))
    x, y = batch()
    backend.train_step(build_method(cfg, model), x, y, STEP)
    for (name, p), (_, w) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.detach(), w.detach() - lr * want[name], rtol=1e-5, atol=1e-6)


def test_weight_decay_and_momentum_act_on_w_not_on_the_perturbed_weights():
    """Three S-SGD steps with SGD momentum 0.9 and weight decay 0.1, against torch's update rule written out:
    d = g + wd * w (w: the unperturbed weights), b = mom * b + d, w -= lr * b; g = 1/2 (g(w+n) + g(w-n))."""
    lr, mom, wd = 0.5, 0.9, 0.1
    model = tiny_model()
    reference_model = copy.deepcopy(model)
    cfg = Config(method="ssgd", seed=SEED, noise={"alpha": ALPHA})
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd))
    method = build_method(cfg, model)
    buf = {}
    for step in range(3):
        x, y = batch(seed=10 + step)
        n = hand_noise(reference_model, "rademacher", step=step)
        gp = grad_at(reference_model, n, 1, x[0::2], y[0::2])
        gm = grad_at(reference_model, n, -1, x[1::2], y[1::2])
        with torch.no_grad():
            for name, w in reference_model.named_parameters():
                d = (gp[name] + gm[name]) / 2 + wd * w
                buf[name] = d if step == 0 else mom * buf[name] + d
                w.sub_(lr * buf[name])
        backend.train_step(method, x, y, step)
        for (name, p), (_, w) in zip(model.named_parameters(), reference_model.named_parameters()):
            torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
    # The test can tell: weight decay taken at w - n instead of w moves a step by lr * wd * n, far above the tolerance.
    assert lr * wd * max(float(v.abs().max()) for v in n.values()) > 1e-3


@pytest.mark.parametrize("rank, sign", [(0, 1.0), (1, -1.0), (2, 1.0), (3, -1.0)])
def test_paired_puts_even_ranks_at_w_plus_n_and_odd_ranks_at_w_minus_n(rank, sign):
    """``ssgd.batch_split=paired``: one pass on the whole local batch, at w+n on even ranks, w-n on odd ones;
    the step applies that rank's gradient (DDP then averages the ranks: 1/2 (g(w+n) + g(w-n)) for 2 ranks)."""
    model = tiny_model()
    reference_model = copy.deepcopy(model)
    n = hand_noise(reference_model, "rademacher")
    cfg = Config(method="ssgd", seed=SEED, noise={"alpha": ALPHA}, ssgd={"batch_split": "paired"})
    method = build_method(cfg, model, rank=rank, world_size=4)
    assert [(p.part, p.loss_weight) for p in method.passes()] == [("all", 1.0)]
    method.before_pass(0, STEP)
    for (name, p), (_, w) in zip(model.named_parameters(), reference_model.named_parameters()):
        want = w + sign * n[name] if name in n else w
        torch.testing.assert_close(p.detach(), want.detach(), rtol=1e-6, atol=1e-7, msg=name)
    method.restore()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), reference_model.parameters()))

    lr = 0.5
    x, y = batch()
    want = grad_at(reference_model, n, sign, x, y)
    LocalBackend(model, torch.optim.SGD(model.parameters(), lr=lr)).train_step(method, x, y, STEP)
    for (name, p), (_, w) in zip(model.named_parameters(), reference_model.named_parameters()):
        torch.testing.assert_close(p.detach(), w.detach() - lr * want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "schedule, step, factor",
    [
        ("warmup", 0, 1 / 5),  # linear warm-up over 0.5 x 10 steps: (step + 1) / 5
        ("warmup", 1, 2 / 5),
        ("warmup", 7, 1.0),
        ("cosine", 5, 0.5 * (1 + math.cos(math.pi * 5 / 10))),  # cosine decay over the 10 steps
        ("cosine", 8, 0.5 * (1 + math.cos(math.pi * 8 / 10))),
    ],
)
def test_noise_schedule_sets_the_magnitude_of_the_noise_each_step_adds(schedule, step, factor):
    """``noise.schedule`` acts in training: the weights a step's first pass sees are w + alpha_t n_t/alpha."""
    model = tiny_model()
    reference_model = copy.deepcopy(model)
    noise = {"alpha": ALPHA, "schedule": schedule, "schedule_fraction": 0.5}
    method = build_method(Config(method="ssgd", seed=SEED, noise=noise), model, total_steps=10)
    method.before_pass(0, step)
    n = hand_noise(reference_model, "rademacher", step=step, alpha=ALPHA * factor)
    for (name, p), (_, w) in zip(model.named_parameters(), reference_model.named_parameters()):
        want = w + n[name] if name in n else w
        torch.testing.assert_close(p.detach(), want.detach(), rtol=1e-6, atol=1e-7, msg=name)
    method.restore()
    assert method.alpha(step) == pytest.approx(ALPHA * factor)


def test_clipping_scales_the_step_gradient_once_by_its_global_norm():
    """``optim.clip_grad_norm`` c: the step uses g * c / ||g||, with g the S-SGD gradient (both passes) over
    every tensor; the reported norm is ||g|| before clipping."""
    model = tiny_model()
    reference_model = copy.deepcopy(model)
    want = expected_grad(reference_model, "ssgd", "halves")
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in want.values())))
    clip, lr = 0.1 * norm, 0.5
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=lr), clip_grad_norm=clip)
    result = backend.train_step(
        build_method(Config(method="ssgd", seed=SEED, noise={"alpha": ALPHA}), model), *batch(), STEP
    )
    assert float(result.grad_norm) == pytest.approx(norm, rel=1e-5)
    for (name, p), (_, w) in zip(model.named_parameters(), reference_model.named_parameters()):
        torch.testing.assert_close(p.detach(), w.detach() - lr * 0.1 * want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["ssgd", "gni", "smoothout"])
def test_a_training_step_neither_draws_from_nor_reseeds_the_global_rng(method):
    """The noise has its own generator: a step leaves the global RNG (dropout, augmentation and user code draw
    from it, differently on each rank) exactly as it was, and the weights move as the reference says."""
    model = tiny_model()
    reference_model = copy.deepcopy(model)
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.5))
    torch.manual_seed(1234)
    torch.rand(5)
    before = torch.get_rng_state()
    backend.train_step(build_method(Config(method=method, seed=SEED, noise={"alpha": ALPHA}), model), *batch(), STEP)
    assert torch.equal(torch.get_rng_state(), before)
    want = expected_grad(reference_model, method, "halves")
    for (name, p), (_, w) in zip(model.named_parameters(), reference_model.named_parameters()):
        torch.testing.assert_close(p.detach(), w.detach() - 0.5 * want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sam_uses_the_gradient_at_the_adversarial_point():
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, y = batch()
    g = grad_at(reference, {}, 0, x, y)
    norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
    e = {k: 0.05 * v / norm for k, v in g.items()}
    want = grad_at(reference, e, 1, x, y)
    cfg = Config(method="sam", sam={"rho": 0.05})
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.5))
    backend.train_step(build_method(cfg, model), x, y, STEP)
    for (name, p), (_, w) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.detach(), w.detach() - 0.5 * want[name], rtol=1e-5, atol=1e-6)


def test_full_split_updates_batchnorm_statistics_once_and_halves_twice():
    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    counts = {}
    for split in ("full", "halves"):
        model = bn_model()
        cfg = Config(method="ssgd", ssgd={"batch_split": split})
        LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.1)).train_step(
            build_method(cfg, model), *batch(), 0
        )
        counts[split] = int(model[1].num_batches_tracked)
    assert counts == {"full": 1, "halves": 2}
