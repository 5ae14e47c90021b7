"""Baselines and the BatchNorm policy, against values computed by hand.

- SAM (Foret et al. 2020): the step uses the gradient at w + rho g/||g|| (g over *every* trainable
  tensor), momentum and weight decay act on w; under DDP the first pass is not synchronised, so each
  rank ascends along its own gradient and only the second gradient is averaged.
- BatchNorm (SPEC section 1): running statistics see every sample once: both passes in ``halves`` (each
  at its own point w+n / w-n), only the w+n pass in ``full``, only the pass at w for SAM;
  ``train.bn_recalibrate`` recomputes them at w before evaluation.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from ssgd_dist.backends.local import LocalBackend
from ssgd_dist.bn import recalibrate_bn
from ssgd_dist.config import Config
from ssgd_dist.methods import build_method
from tests import reference
from tests.dist_workers import leave_group

SEED, STEP = 11, 5


def tiny():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data(n=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def grads_at(model, x, y, delta=None):
    m = copy.deepcopy(model)
    if delta is not None:
        with torch.no_grad():
            for p, d in zip(m.parameters(), delta):
                p.add_(d)
    return list(torch.autograd.grad(nn.functional.cross_entropy(m(x), y), list(m.parameters())))


def sam_direction(model, x, y, rho):
    g = grads_at(model, x, y)
    norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
    return [rho * t / norm for t in g]


# -- SAM -------------------------------------------------------------------------------------------
def test_sam_two_steps_with_momentum_and_weight_decay_match_the_definition():
    rho, lr, mom, wd = 0.1, 0.3, 0.9, 0.01
    model, ref = tiny(), tiny()
    cfg = Config(method="sam", seed=SEED, sam={"rho": rho}, noise={"targets": "weights"})
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd))
    method = build_method(cfg, model)
    buf = None
    for step, seed in ((0, 2), (1, 4)):
        x, y = data(seed=seed)
        backend.train_step(method, x, y, step)
        # by hand: e over all tensors (biases too, whatever noise.targets says), gradient at w + e,
        # then SGD's weight decay and momentum on w
        e = sam_direction(ref, x, y, rho)
        g = grads_at(ref, x, y, e)
        with torch.no_grad():
            d = [gi + wd * p for gi, p in zip(g, ref.parameters())]
            buf = d if buf is None else [mom * b + di for b, di in zip(buf, d)]
            for p, b in zip(ref.parameters(), buf):
                p.sub_(lr * b)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def _sam_ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from ssgd_dist.backends.ddp import DDPBackend

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny()
        cfg = Config(method="sam", seed=SEED, sam={"rho": 0.2})
        backend = DDPBackend(model, torch.optim.SGD(model.parameters(), lr=0.5))
        x, y = data(n=16)
        local = slice(rank * 8, (rank + 1) * 8)
        backend.train_step(build_method(cfg, backend.model, rank, world), x[local], y[local], STEP)
        torch.save([p.detach() for p in model.parameters()], f"{out}/sam-rank{rank}.pt")
        # Both ranks leave together and drop DDP's reducer before the group goes: a rank that tears
        # gloo down while its peer is still finishing can abort ("terminate called without an active exception").
        del backend
        dist.barrier()
    finally:
        leave_group()


@pytest.mark.distributed
def test_sam_under_ddp_ascends_along_each_ranks_own_gradient(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sam_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ref = tiny()
    x, y = data(n=16)
    per_rank = []
    for r in range(2):
        xs, ys = x[r * 8 : (r + 1) * 8], y[r * 8 : (r + 1) * 8]
        per_rank.append(grads_at(ref, xs, ys, sam_direction(ref, xs, ys, 0.2)))  # unsynced first pass
    want = [p.detach() - 0.5 * (a + b) / 2 for p, a, b in zip(ref.parameters(), *per_rank)]
    # the synchronised-first-pass variant (one global e) differs, so the test can tell them apart
    e_global = sam_direction(ref, x, y, 0.2)
    other = [p.detach() - 0.5 * g for p, g in zip(ref.parameters(), grads_at(ref, x, y, e_global))]
    assert max(float((w - o).abs().max()) for w, o in zip(want, other)) > 1e-4
    for r in range(2):
        got = torch.load(tmp_path / f"sam-rank{r}.pt", weights_only=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# -- BatchNorm policy ------------------------------------------------------------------------------
def bn_model():
    """Linear -> BN (cumulative averages, momentum=None) -> ReLU -> Linear; the BN input depends on the noise."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=None), nn.ReLU(), nn.Linear(6, 3))


def _pre_bn(model, x, delta=None):
    w, b = model[0].weight.detach(), model[0].bias.detach()
    if delta is not None:
        w = w + delta
    return x @ w.T + b


def _one_step(method: str, split: str = "halves"):
    model = bn_model()
    ref = copy.deepcopy(model)
    cfg = Config(method=method, seed=SEED, ssgd={"batch_split": split}, noise={"alpha": 0.3}, sam={"rho": 0.05})
    x, y = data(n=12)
    LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.1)).train_step(build_method(cfg, model), x, y, STEP)
    return model[1], ref, cfg, x


def _noise_on_first_layer(ref, cfg):
    """The documented noise of model[0].weight (tests/reference.py), not the package's own noise function."""
    assert (cfg.noise.distribution, cfg.noise.scale, cfg.noise.targets) == ("rademacher", "layer_rms", "weights")
    return reference.noise(ref, "rademacher", cfg.seed, STEP, cfg.noise.alpha)["0.weight"]


def test_halves_updates_running_stats_once_per_sample_at_both_points():
    bn, ref, cfg, x = _one_step("ssgd", "halves")
    n = _noise_on_first_layer(ref, cfg)
    plus, minus = _pre_bn(ref, x[0::2], n), _pre_bn(ref, x[1::2], -n)
    assert int(bn.num_batches_tracked) == 2  # each half once: every sample counted once
    torch.testing.assert_close(bn.running_mean, (plus.mean(0) + minus.mean(0)) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, (plus.var(0) + minus.var(0)) / 2, rtol=1e-5, atol=1e-6)


def test_full_updates_running_stats_only_in_the_plus_pass():
    bn, ref, cfg, x = _one_step("ssgd", "full")
    plus = _pre_bn(ref, x, _noise_on_first_layer(ref, cfg))
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, plus.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, plus.var(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_sgd_and_sam_count_each_sample_once_at_w(method):
    bn, ref, _, x = _one_step(method)
    at_w = _pre_bn(ref, x)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, at_w.mean(0), rtol=1e-5, atol=1e-6)


def test_recalibrate_bn_recomputes_the_statistics_at_w():
    model = bn_model()
    model[1].momentum = 0.1
    with torch.no_grad():  # stale statistics, as left by training at w +- n
        model[1].running_mean.fill_(5.0)
        model[1].running_var.fill_(9.0)
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(9))
    assert recalibrate_bn(model, x, samples=64, batch_size=64)
    at_w = _pre_bn(model, x)
    torch.testing.assert_close(model[1].running_mean, at_w.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, at_w.var(0), rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.1 and model.training  # settings and mode restored
    # equal chunks are averaged with equal weights: chunk means average to the full mean
    assert recalibrate_bn(model, x, samples=64, batch_size=16)
    torch.testing.assert_close(model[1].running_mean, at_w.mean(0), rtol=1e-5, atol=1e-6)
    assert not recalibrate_bn(nn.Linear(5, 3), x, 64, 64)  # nothing to do without BatchNorm


def test_train_bn_recalibrate_evaluates_with_statistics_at_w(tmp_path):
    """A cnn1d (Conv -> BN) trained with S-SGD: after the run, the first BN's statistics are those of
    the final weights on the training samples, not the running averages at w +- n."""
    from ssgd_dist.checkpoint import load_latest
    from ssgd_dist.config import validate
    from ssgd_dist.data import load_dataset
    from ssgd_dist.models import build_model
    from ssgd_dist.train import train

    def cfg(recal: bool):
        return validate(
            {
                "method": "ssgd",
                "device": "cpu",
                "model": {"name": "cnn1d"},
                "data": {"name": "synthetic", "batch_size": 64, "eval_batch_size": 1638},
                "optim": {"lr": 0.05},
                "noise": {"alpha": 0.5},
                "train": {
                    "epochs": 1,
                    "max_steps": 6,
                    "progress": False,
                    "num_threads": 1,
                    "bn_recalibrate": recal,
                    "bn_recalibrate_samples": 100000,
                },
            }
        )

    stats = {}
    for recal in (False, True):
        run = tmp_path / f"recal-{recal}"
        summary = train(cfg(recal), run)
        state, _ = load_latest(run)
        ds = load_dataset(cfg(recal).data)
        torch.manual_seed(0)
        model = build_model(cfg(recal).model, ds.input_shape, ds.num_classes)
        model.load_state_dict(state["model"])
        conv_out = model[1](model[0](ds.x_train)).detach()  # Unflatten -> Conv1d
        want_mean = conv_out.transpose(0, 1).reshape(conv_out.shape[1], -1).mean(1)
        stats[recal] = (state["model"]["2.running_mean"], want_mean, summary)
    got, want, summary = stats[True]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    stale, want_stale, _ = stats[False]
    assert float((stale - want_stale).abs().max()) > 1e-3  # without it, the statistics are the training ones
    assert json.loads(json.dumps(summary))["test_acc"] is not None
