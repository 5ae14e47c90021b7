import copy

import torch
from torch import nn

from ssgd_dist.optim import SymmetricNoiseOptimizer
from tests import reference


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    return model, x, y


def test_closure_step_equals_the_manual_two_pass_step():
    model_a, x, y = setup()
    model_b = copy.deepcopy(model_a)
    opt_a = SymmetricNoiseOptimizer(model_a, torch.optim.SGD(model_a.parameters(), lr=0.1), alpha=0.2, seed=4)
    opt_b = SymmetricNoiseOptimizer(model_b, torch.optim.SGD(model_b.parameters(), lr=0.1), alpha=0.2, seed=4)

    def closure():
        loss = nn.functional.cross_entropy(model_a(x), y)
        loss.backward()
        return loss

    opt_a.step(closure)
    opt_b.perturb()
    nn.functional.cross_entropy(model_b(x), y).mul(0.5).backward()
    opt_b.reflect()
    nn.functional.cross_entropy(model_b(x), y).mul(0.5).backward()
    opt_b.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b)


def grads_at(model, delta, x, y):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(delta.get(name, torch.zeros_like(p)))
    return torch.autograd.grad(nn.functional.cross_entropy(m(x), y), list(m.parameters()))


def test_each_step_perturbs_by_the_documented_noise_and_applies_the_mean_gradient():
    """Against tests/reference.py, step after step: perturb() puts the kernels at w + n_t (n_t from the
    generator of (seed, t), alpha * rms(w) * xi), reflect() at w - n_t, biases untouched, restore() at w
    bit for bit, and the closure step is w - lr * 1/2 (g(w + n_t) + g(w - n_t))."""
    model, x, y = setup()
    lr, alpha, seed = 0.1, 0.2, 4
    opt = SymmetricNoiseOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr), alpha=alpha, seed=seed)
    for step in range(3):
        ref = copy.deepcopy(model)  # w before this step
        n = reference.noise(ref, "rademacher", seed, step, alpha)
        assert sorted(n) == ["0.weight", "2.weight"]
        for sign, move in ((1, opt.perturb), (-1, opt.reflect)):
            move()
            for (name, p), (_, w) in zip(model.named_parameters(), ref.named_parameters()):
                want = w + sign * n[name] if name in n else w
                torch.testing.assert_close(p.detach(), want.detach(), rtol=1e-6, atol=1e-7, msg=f"{step} {name}")
        opt.restore()
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), ref.parameters()))

        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
        plus, minus = grads_at(ref, n, x, y), grads_at(ref, {k: -v for k, v in n.items()}, x, y)
        for (name, p), w, gp, gm in zip(model.named_parameters(), ref.parameters(), plus, minus):
            want = w.detach() - lr * (gp + gm) / 2
            torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


def test_restore_is_exact_and_the_base_step_acts_on_w():
    model, x, y = setup()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SymmetricNoiseOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), alpha=0.5)
    opt.perturb()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # lr 0: the weights must come back bit-for-bit
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_schedulers_and_state_dict_see_the_base_optimizer():
    model, _, _ = setup()
    base = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    opt = SymmetricNoiseOptimizer(model, base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == 0.5
    state = opt.state_dict()
    assert state["step"] == 1 and "param_groups" in state["base"]
    fresh = SymmetricNoiseOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))
    fresh.load_state_dict(state)
    assert fresh.step_count == 1 and fresh.param_groups[0]["lr"] == 0.5


def test_a_failing_closure_leaves_the_weights_at_w():
    model, _, _ = setup()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SymmetricNoiseOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), alpha=0.5)

    def closure():
        raise RuntimeError("out of memory")

    try:
        opt.step(closure)
    except RuntimeError:
        pass
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
