"""NSO and RWP against their definitions, written out by hand, in one process and on 2 gloo ranks.

- NSO (Zhang, Li, Ju): g = lam g(w) + (1 - lam)/(2k) sum_j [g(w + n_j) + g(w - n_j)], n_j Gaussian with
  ``noise.alpha`` and ``noise.scale`` (sample j of the step's noise stream), every pass on the whole batch.
- RWP (Li et al.): g = (1 - mix) g(w) + mix g(w + n), n_i ~ N(0, (gamma ||filter||)^2) on every trainable
  tensor; ``split: passes`` evaluates g(w) on the even and g(w + n) on the odd positions of the global
  batch, ``split: ranks`` g(w) on even ranks' and g(w + n) on odd ranks' whole local batches.

The steps use SGD with momentum and weight decay, so the references also check that both act on w.
Under DDP, gradient bytes are counted with a comm hook: both methods move exactly SGD's bytes per step.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from ssgd_dist.backends.local import LocalBackend
from ssgd_dist.config import Config
from ssgd_dist.errors import ConfigError
from ssgd_dist.methods import build_method, method_class
from ssgd_dist.seeding import step_seed
from tests import reference
from tests.dist_workers import leave_group

pytestmark = pytest.mark.timeout(120)

SEED, LR, MOM, WD, STEPS = 11, 0.3, 0.9, 0.01, 3
NSO_CASES = {
    "nso-k2": {"nso": {"num_samples": 2}, "noise": {"alpha": 0.3}},
    "nso-k2-clean": {"nso": {"num_samples": 2, "clean_pass": True, "clean_weight": 0.3}, "noise": {"alpha": 0.3}},
    "nso-absolute": {"noise": {"alpha": 0.05, "scale": "absolute", "targets": "all"}},
}
RWP_CASES = {
    "rwp": {"rwp": {"gamma": 0.05, "mix": 0.7}},
    "rwp-ranks": {"rwp": {"gamma": 0.05, "mix": 0.7, "split": "ranks"}},
}


def tiny():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data(step: int, n: int = 16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def cfg_of(name: str) -> Config:
    settings = {**NSO_CASES, **RWP_CASES}.get(name, {})
    return Config(method=name.split("-")[0], seed=SEED, **settings)


# -- the hand-written references -------------------------------------------------------------------
def grad_at(model, x, y, delta: dict[str, torch.Tensor] | None = None, sign: float = 1.0):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if delta and name in delta:
                p.add_(sign * delta[name])
    return [g.detach() for g in torch.autograd.grad(nn.functional.cross_entropy(m(x), y), list(m.parameters()))]


def combine(terms):
    """sum of weight * gradient-list."""
    return [sum(w * g[i] for w, g in terms) for i in range(len(terms[0][1]))]


def nso_grad(model, cfg: Config, x, y, step: int):
    k, n = cfg.nso.num_samples, cfg.noise
    lam = cfg.nso.clean_weight if cfg.nso.clean_pass else 0.0
    terms = [(lam, grad_at(model, x, y))] if lam else []
    for j in range(k):
        delta = reference.noise(model, "gaussian", SEED, step, n.alpha, n.targets, sample=j, scale=n.scale)
        for sign in (1.0, -1.0):
            terms.append(((1 - lam) / (2 * k), grad_at(model, x, y, delta, sign)))
    return combine(terms)


def rwp_noise(model, gamma: float, step: int) -> dict[str, torch.Tensor]:
    """Every parameter, in order, from the step's noise stream: N(0, 1) times gamma * (row or vector) L2 norm."""
    gen = torch.Generator().manual_seed(step_seed(SEED, step))
    out = {}
    for name, w in model.named_parameters():
        norm = w.detach().reshape(w.shape[0], -1).norm(dim=1).view(-1, 1) if w.ndim > 1 else w.detach().norm()
        out[name] = gamma * norm * torch.randn(w.shape, generator=gen)
    return out


def rwp_grad(model, cfg: Config, x, y, step: int, clean_part=slice(0, None, 2), noisy_part=slice(1, None, 2)):
    delta = rwp_noise(model, cfg.rwp.gamma, step)
    clean = grad_at(model, x[clean_part], y[clean_part])
    noisy = grad_at(model, x[noisy_part], y[noisy_part], delta)
    return combine([(1 - cfg.rwp.mix, clean), (cfg.rwp.mix, noisy)])


def reference_run(name: str, gradient) -> list[torch.Tensor]:
    """STEPS steps of SGD (momentum, weight decay) with ``gradient(model, cfg, x, y, step)``."""
    model, cfg, buf = tiny(), cfg_of(name), None
    for step in range(STEPS):
        x, y = data(step)
        g = gradient(model, cfg, x, y, step)
        with torch.no_grad():
            d = [gi + WD * p for gi, p in zip(g, model.parameters())]
            buf = d if buf is None else [MOM * b + di for b, di in zip(buf, d)]
            for p, b in zip(model.parameters(), buf):
                p.sub_(LR * b)
    return [p.detach() for p in model.parameters()]


def product_run(name: str) -> list[torch.Tensor]:
    model, cfg = tiny(), cfg_of(name)
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM, weight_decay=WD))
    method = build_method(cfg, model)
    for step in range(STEPS):
        backend.train_step(method, *data(step), step)
    return [p.detach() for p in model.parameters()]


def assert_params_close(got, want, what: str):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=lambda m: f"{what}: {m}")


def largest_difference(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# -- one process -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NSO_CASES))
def test_nso_steps_match_the_definition(name):
    got, want = product_run(name), reference_run(name, nso_grad)
    assert_params_close(got, want, name)
    # A variant that reuses sample 0 for every j (no independent draws) lands far away: the test can fail.
    if cfg_of(name).nso.num_samples > 1:

        def same_sample(model, cfg, x, y, step):
            return nso_grad(
                model, cfg.model_copy(update={"nso": cfg.nso.model_copy(update={"num_samples": 1})}), x, y, step
            )

        assert largest_difference(want, reference_run(name, same_sample)) > 1e-3


def test_rwp_two_pass_form_steps_match_the_definition():
    got, want = product_run("rwp"), reference_run("rwp", rwp_grad)
    assert_params_close(got, want, "rwp")

    # Layer-RMS noise (the noise.scale default) instead of RWP's filter norms would differ by far more.
    def rms_noise(model, cfg, x, y, step):
        delta = reference.noise(model, "gaussian", SEED, step, cfg.rwp.gamma, "all")
        clean = grad_at(model, x[0::2], y[0::2])
        return combine([(1 - cfg.rwp.mix, clean), (cfg.rwp.mix, grad_at(model, x[1::2], y[1::2], delta))])

    assert largest_difference(want, reference_run("rwp", rms_noise)) > 1e-4


def test_rwp_moves_every_trainable_tensor_and_restores_w_bit_for_bit():
    model, cfg = tiny(), cfg_of("rwp")
    method = build_method(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    method.before_pass(1, 0)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # biases too
    method.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_passes_and_loss_weights_sum_to_one_gradient():
    for name in list(NSO_CASES) + ["rwp"]:
        cfg = cfg_of(name)
        assert sum(p.loss_weight for p in method_class(cfg).plan(cfg)) == pytest.approx(1.0), name
    assert len(method_class(cfg_of("nso-k2-clean")).plan(cfg_of("nso-k2-clean"))) == 5


@pytest.mark.parametrize("world", [1, 3])
def test_rwp_rank_split_needs_an_even_world_size(world):
    cfg = cfg_of("rwp-ranks").model_copy(update={"data": cfg_of("rwp").data.model_copy(update={"batch_size": 12})})
    with pytest.raises(ConfigError, match="even number of ranks"):
        method_class(cfg).check_launch(cfg, world)
    method_class(cfg).check_launch(cfg, 2)


# -- two gloo ranks --------------------------------------------------------------------------------
DDP_CASES = ["sgd", "nso-k2-clean", "rwp", "rwp-ranks"]


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from ssgd_dist.backends.ddp import DDPBackend

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name in DDP_CASES:
            model = tiny()
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
            backend = DDPBackend(model, opt)
            counted = []

            def hook(state, bucket, counted=counted):
                counted.append(bucket.buffer().numel() * bucket.buffer().element_size())
                buf = bucket.buffer().div_(world)
                return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

            backend.ddp.register_comm_hook(None, hook)
            method = build_method(cfg_of(name), backend.model, rank, world)
            per_step = []
            for step in range(STEPS):
                x, y = data(step)
                local = slice(rank * 8, (rank + 1) * 8)
                before = sum(counted)
                backend.train_step(method, x[local], y[local], step)
                per_step.append(sum(counted) - before)
            results[name] = {"bytes": per_step, "params": [p.detach().tolist() for p in model.parameters()]}
            del backend
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(results, f)
        dist.barrier()
    finally:
        leave_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("nso-rwp-ddp")
    mp.spawn(_ddp_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def _params(result) -> list[torch.Tensor]:
    return [torch.tensor(p) for p in result["params"]]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name, gradient",
    [
        ("nso-k2-clean", nso_grad),
        ("rwp", rwp_grad),
        # the original split: rank 0 (clean) holds samples 0-7, rank 1 (perturbed) samples 8-15
        ("rwp-ranks", lambda m, c, x, y, s: rwp_grad(m, c, x, y, s, slice(0, 8), slice(8, 16))),
    ],
)
def test_two_ranks_match_the_definition_on_the_global_batch(two_ranks, name, gradient):
    want = reference_run(name, gradient)
    for rank in range(2):
        assert_params_close(_params(two_ranks[rank][name]), want, f"{name} rank {rank}")


@pytest.mark.distributed
def test_two_ranks_move_the_gradient_bytes_of_sgd(two_ranks):
    sgd = two_ranks[0]["sgd"]["bytes"]
    assert len(sgd) == STEPS and all(b > 0 for b in sgd)
    for name in DDP_CASES[1:]:
        for rank in range(2):
            assert two_ranks[rank][name]["bytes"] == sgd, (name, rank)


# -- BatchNorm: running statistics see each step once ---------------------------------------------
def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=None), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("name", ["nso-k2", "nso-k2-clean", "rwp"])
def test_batchnorm_statistics_are_updated_by_one_pass_per_step(name):
    model = bn_model()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = data(0)
    backend.train_step(build_method(cfg_of(name), model), x, y, 0)
    assert int(model[1].num_batches_tracked) == 1
    if name != "nso-k2":  # the clean pass at w: RWP's on the even positions, NSO's on the whole batch
        seen = x[0::2] if name == "rwp" else x
        torch.testing.assert_close(model[1].running_mean, (seen @ w.T + b).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["nso-k2-clean", "rwp"])
def test_accumulation_micro_steps_give_the_one_big_step(name):
    """k = 2 micro-steps per optimizer step (pass-major, the same noise for both) equal one step on the batch."""
    runs = []
    for k in (1, 2):
        model = tiny()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
        backend, method = LocalBackend(model, opt, micro_steps=k), build_method(cfg_of(name), model)
        for step in range(STEPS):
            backend.train_step(method, *data(step), step)
        runs.append([p.detach() for p in model.parameters()])
    assert_params_close(runs[1], runs[0], f"{name} k=2")
    assert largest_difference(runs[0], product_run("sgd")) > 1e-3  # the method moved the weights: not vacuous
