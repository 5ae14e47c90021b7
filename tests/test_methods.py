"""Each method's step against a gradient computed by hand, independently of the backend code."""

import copy

import pytest
import torch
from torch import nn

from ssgd_dist.backends.local import LocalBackend
from ssgd_dist.config import Config
from ssgd_dist.methods import build_method
from ssgd_dist.seeding import step_seed

SEED, STEP, ALPHA = 7, 3, 0.3


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def hand_noise(model, distribution):
    """The noise the spec prescribes, built directly from torch's generator: n = alpha * rms(w) * xi."""
    gen = torch.Generator().manual_seed(step_seed(SEED, STEP))
    noise = {}
    for name, w in model.named_parameters():
        if w.ndim < 2:
            continue
        if distribution == "rademacher":
            xi = torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8).float() * 2 - 1
        elif distribution == "gaussian":
            xi = torch.randn(w.shape, generator=gen)
        else:
            xi = (torch.rand(w.shape, generator=gen) * 2 - 1) * 3**0.5
        noise[name] = ALPHA * w.detach().pow(2).mean().sqrt() * xi
    return noise


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
    model = tiny_model()
    reference = copy.deepcopy(model)
    want = expected_grad(reference, "ssgd", "halves")
    cfg = Config(method="ssgd", seed=SEED, noise={"alpha": ALPHA})
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1))
    backend.train_step(build_method(cfg, model), *batch(), STEP)
    for (name, p), (_, w) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.detach(), w.detach() - 0.5 * (want[name] + 0.1 * w.detach()), rtol=1e-5, atol=1e-6)


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
