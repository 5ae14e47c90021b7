"""``backends.check_launch``: every rule that depends on the ranks, the micro-steps and the backend, one line each."""

from __future__ import annotations

import pytest

from ssgd_dist.backends import check_launch
from ssgd_dist.config import validate
from ssgd_dist.errors import ConfigError
from ssgd_dist.rundir import run_differences


def cfg(**sections):
    return validate({"device": "cpu", **sections})


@pytest.mark.parametrize(
    ("config", "world_size", "message"),
    [
        (cfg(data={"batch_size": 202}), 2, "a multiple of 2 x 2 ranks = 4; nearest: 200 or 204"),
        (
            cfg(data={"batch_size": 200}, train={"accumulation_steps": 3}),
            2,
            "a multiple of 2 x 2 ranks x 3 micro-steps = 12; nearest: 192 or 204",
        ),
        (cfg(method="sgd", data={"batch_size": 201}), 2, "data.batch_size = 201: a multiple of 2 ranks = 2"),
        (cfg(ssgd={"batch_split": "paired"}), 3, "needs an even number of ranks"),
        (cfg(backend="local"), 2, "backend = local with 2 ranks"),
        (cfg(method="sam", backend="deepspeed"), 2, "method = sam with backend = deepspeed"),
        (
            cfg(backend="deepspeed", deepspeed={"zero_stage": 3}, ssgd={"batch_split": "paired"}),
            2,
            "ZeRO-3 ranks gather one shared set of weights",
        ),
        (
            cfg(model={"name": "cnn1d", "bn_mode": "ghost", "bn_ghost_batch": 24}, data={"batch_size": 256}),
            2,
            "model.bn_ghost_batch = 24: each forward sees data.batch_size 256 / (2 x 2 ranks) = 64 samples",
        ),
    ],
)
def test_a_launch_that_cannot_run_is_refused_naming_the_numbers(config, world_size, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_launch(config, world_size)


@pytest.mark.parametrize(
    ("config", "world_size"),
    [
        (cfg(data={"batch_size": 256}, train={"accumulation_steps": 4}), 4),
        (cfg(method="sgd", data={"batch_size": 201}), 1),
        (cfg(model={"name": "cnn1d", "bn_mode": "ghost", "bn_ghost_batch": 16}, data={"batch_size": 256}), 4),
        (cfg(model={"name": "mlp", "bn_mode": "ghost", "bn_ghost_batch": 24}, data={"batch_size": 256}), 2),
        (cfg(model={"name": "cnn1d", "bn_mode": "sync"}, data={"batch_size": 256}), 1),  # a no-op alone
    ],
)
def test_a_launch_that_can_run_passes(config, world_size):
    check_launch(config, world_size)


def test_ghost_batchnorm_needs_its_size():
    with pytest.raises(ConfigError, match="model.bn_mode = ghost: needs model.bn_ghost_batch"):
        cfg(model={"bn_mode": "ghost"})


@pytest.mark.parametrize(
    ("model", "may_change"),
    [
        ({"name": "mlp"}, True),
        ({"name": "cnn1d", "bn_mode": "ghost", "bn_ghost_batch": 8}, True),
        ({"name": "cnn1d", "bn_mode": "sync"}, False),
        ({"name": "cnn1d"}, False),
    ],
)
def test_micro_steps_may_change_on_resume_only_where_they_do_not_change_the_trajectory(model, may_change):
    saved = cfg(model=model, train={"accumulation_steps": 1}).to_dict()
    resumed = cfg(model=model, train={"accumulation_steps": 4})
    assert (run_differences(saved, resumed) == []) == may_change
