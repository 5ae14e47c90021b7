import copy

import torch
from torch import nn

from ssgd_dist.optim import SymmetricNoiseOptimizer


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
