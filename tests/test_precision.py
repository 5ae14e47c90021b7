"""Mixed precision on CPU: bf16 autocast trains; an overflow in either pass skips the step on every
rank with the weights untouched; the gradient is unscaled and clipped once, after the sync."""

from __future__ import annotations

import copy
import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssgd_dist.backends.ddp import DDPBackend
from ssgd_dist.backends.local import LocalBackend
from ssgd_dist.config import Config
from ssgd_dist.data import load_synthetic
from ssgd_dist.methods import build_method
from ssgd_dist.seeding import step_seed
from tests.dist_workers import leave_group

SEED, ALPHA, LR, MAX_NORM = 3, 0.3, 0.1, 0.05


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_bf16_autocast_trains_and_stays_finite():
    data = load_synthetic()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    seen = set()
    model[0].register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), precision="bf16")
    method = build_method(Config(method="ssgd", seed=SEED), model)
    losses = []
    for step in range(60):
        idx = torch.arange(step * 64, (step + 1) * 64) % len(data.y_train)
        result = backend.train_step(method, data.x_train[idx], data.y_train[idx], step)
        assert not result.skipped
        losses.append(result.loss)
    assert seen == {torch.bfloat16}  # the forward really ran in bf16
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


# -- two gloo ranks ---------------------------------------------------------------------------------
def hand_ssgd_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> list[torch.Tensor]:
    """This rank's S-SGD `halves` gradient built from the spec, not from the package: Rademacher noise
    of magnitude alpha * rms(w) on the kernels, the even half at w + n, the odd half at w - n."""
    gen = torch.Generator().manual_seed(step_seed(SEED, step))
    noise = [
        ALPHA
        * w.detach().pow(2).mean().sqrt()
        * (torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8).float() * 2 - 1)
        if w.ndim >= 2
        else torch.zeros_like(w)
        for w in model.parameters()
    ]
    grads = []
    for sign, part in ((1, slice(0, None, 2)), (-1, slice(1, None, 2))):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, n in zip(m.parameters(), noise):
                p.add_(sign * n)
        loss = nn.functional.cross_entropy(m(x[part]), y[part])
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    return [(a + b) / 2 for a, b in zip(*grads)]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in ts])


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    x, y = rank_batch(rank)
    report: dict = {"overflow": [], "clip": []}

    def every_rank(case: dict) -> list[dict]:
        cases: list = [None] * world_size
        dist.all_gather_object(cases, case)
        return cases

    def gathered_equal(t: torch.Tensor) -> bool:
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t)
        return all(torch.equal(parts[0], p) for p in parts[1:])

    # 1. An overflow in one pass of one rank: every rank skips, weights and momentum untouched.
    for precision in ("fp16", "bf16", "fp32"):
        for bad_pass in (0, 1):
            model = tiny_model()
            backend = DDPBackend(
                model,
                torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
                precision=precision,
                clip_grad_norm=1.0,
                on_nonfinite="skip",
            )
            method = build_method(Config(method="ssgd", seed=SEED), model, rank, world_size)
            first = backend.train_step(method, x, y, 0)  # a normal step: momentum exists now
            weights = [p.detach().clone() for p in model.parameters()]
            momentum = [backend.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
            scale = backend.scaler.get_scale() if backend.scaler else None
            calls = {"n": 0}

            def poisoned(logits, target, bad_pass=bad_pass):
                loss = nn.functional.cross_entropy(logits, target)
                index, calls["n"] = calls["n"], calls["n"] + 1
                return loss * float("inf") if rank == 0 and index == bad_pass else loss

            bad = backend.train_step(method, x, y, 1, loss_fn=poisoned)
            untouched = all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)) and all(
                torch.equal(backend.optimizer.state[p]["momentum_buffer"], m)
                for p, m in zip(model.parameters(), momentum)
            )
            after = backend.train_step(method, x, y, 2)
            report["overflow"] += every_rank(
                {
                    "precision": precision,
                    "bad_pass": bad_pass,
                    "first_skipped": first.skipped,
                    "skipped": bad.skipped,
                    "untouched": untouched,
                    "next_skipped": after.skipped,
                    "moved_after": not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)),
                    "scale_before": scale,
                    "scale_after": backend.scaler.get_scale() if backend.scaler else None,
                    "replicas_equal": gathered_equal(_flat(model.parameters())),
                    "rank": rank,
                }
            )

    # 2. Clipping: once per step, on the synchronized (all-reduced) gradient; fp16 unscales once first,
    # also when the step's passes run in two micro-steps each.
    for precision, micro_steps in (("fp32", 1), ("fp16", 1), ("fp16", 2)):
        model = tiny_model()
        reference = copy.deepcopy(model)
        backend = DDPBackend(
            model,
            torch.optim.SGD(model.parameters(), lr=LR),
            precision=precision,
            clip_grad_norm=MAX_NORM,
            micro_steps=micro_steps,
        )
        method = build_method(Config(method="ssgd", seed=SEED), model, rank, world_size)
        seen, unscales = [], {"n": 0}
        original_clip = torch.nn.utils.clip_grad_norm_

        def recording_clip(params, max_norm, *args, **kwargs):
            params = list(params)
            seen.append((_flat(p.grad for p in params), max_norm))
            return original_clip(params, max_norm, *args, **kwargs)

        if backend.scaler is not None:
            original_unscale = backend.scaler.unscale_

            def counting_unscale(optimizer):
                unscales["n"] += 1
                return original_unscale(optimizer)

            backend.scaler.unscale_ = counting_unscale
        torch.nn.utils.clip_grad_norm_ = recording_clip
        try:
            result = backend.train_step(method, x, y, 0)
        finally:
            torch.nn.utils.clip_grad_norm_ = original_clip
        want = _flat(hand_ssgd_grad(reference, x, y, 0))
        dist.all_reduce(want)
        want /= world_size
        clipped = want * min(1.0, MAX_NORM / float(want.norm()))
        expected_weights = _flat(reference.parameters()) - LR * clipped
        got = seen[0][0] if seen else torch.zeros(0)
        report["clip"] += every_rank(
            {
                "precision": precision,
                "micro_steps": micro_steps,
                "skipped": result.skipped,
                "calls": len(seen),
                "max_norm": seen[0][1] if seen else None,
                "unscales": unscales["n"],
                "grad_identical_across_ranks": gathered_equal(got),
                "grad_rel_error": float((got - want).norm() / want.norm()),
                "clipping_active": float(want.norm()) > MAX_NORM,
                "weights_rel_error": float(
                    (_flat(model.parameters()) - expected_weights).norm() / (LR * clipped).norm()
                ),
                "rank": rank,
            }
        )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    leave_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "report.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(out)), nprocs=2, start_method="spawn")
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_an_overflow_in_either_pass_of_one_rank_skips_the_step_on_every_rank(two_ranks):
    cases = two_ranks["overflow"]
    assert len(cases) == 12  # 3 precisions x 2 passes x 2 ranks
    for case in cases:
        where = f"{case['precision']}, inf in pass {case['bad_pass']} of rank 0, seen on rank {case['rank']}"
        assert not case["first_skipped"], where
        assert case["skipped"], where
        assert case["untouched"], where  # weights and momentum bit-for-bit as before the step
        assert not case["next_skipped"] and case["moved_after"], where  # training goes on
        assert case["replicas_equal"], where
        if case["precision"] == "fp16":
            assert case["scale_after"] < case["scale_before"], where  # GradScaler backed off


@pytest.mark.distributed
def test_clipping_happens_once_on_the_synchronized_gradient(two_ranks):
    assert len(two_ranks["clip"]) == 6
    for case in two_ranks["clip"]:
        where = f"{case['precision']}, {case['micro_steps']} micro-steps, rank {case['rank']}"
        assert not case["skipped"], where
        assert case["clipping_active"], where
        assert case["calls"] == 1 and case["max_norm"] == MAX_NORM, where
        assert case["grad_identical_across_ranks"], where  # after the all-reduce, not before
        fp32 = case["precision"] == "fp32"
        assert case["grad_rel_error"] < (1e-5 if fp32 else 2e-2), (
            where
        )  # the mean of the ranks' S-SGD gradients, unscaled
        assert case["weights_rel_error"] < (1e-4 if fp32 else 2e-2), where  # one step with the clipped gradient
        if case["precision"] == "fp16":
            assert case["unscales"] == 1, where
