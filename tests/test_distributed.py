"""Two real gloo ranks: one all-reduce per step, replicas bitwise equal, 2 ranks == 1 rank."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import TINY, final_params, run_cli, run_torchrun
from tests.dist_workers import count_comm

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CNN = ["model.name=cnn1d", "data.num_samples=2000", "data.batch_size=200", "train.progress=false"]


@pytest.fixture(scope="module")
def comm_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm") / "results.json"
    variants = [
        CNN + ["method=sgd"],
        CNN + ["method=ssgd", "ssgd.batch_split=halves"],
        CNN + ["method=ssgd", "ssgd.batch_split=full"],
        CNN + ["method=ssgd", "ssgd.batch_split=paired"],
        CNN + ["method=sam"],
    ]
    mp.start_processes(count_comm, args=(2, free_port(), str(out), variants, 6), nprocs=2, start_method="spawn")
    return {" ".join(r["overrides"][len(CNN) :]): r for r in json.loads(out.read_text())}


def test_ssgd_all_reduces_exactly_as_many_bytes_per_step_as_sgd(comm_results):
    sgd = comm_results["method=sgd"]["bytes_per_step"]
    assert all(b > 0 for b in sgd)
    for key in ("halves", "full", "paired"):
        assert comm_results[f"method=ssgd ssgd.batch_split={key}"]["bytes_per_step"] == sgd, key
    assert comm_results["method=sam"]["bytes_per_step"] == sgd


def test_replicas_stay_bitwise_identical_with_batchnorm(comm_results):
    for key, result in comm_results.items():
        assert result["identical"], key


@pytest.mark.parametrize("split", ["halves", "full"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, split):
    args = [
        "train",
        "--config",
        "quickstart",
        *TINY,
        "--set",
        "train.max_steps=8",
        "--set",
        f"ssgd.batch_split={split}",
    ]
    one = run_cli(*args, "--run-dir", str(tmp_path / "one"))
    two = run_torchrun(2, *args, "--run-dir", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    p1, p2 = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-5, atol=1e-5)


def test_paired_mode_trains_on_two_ranks_and_is_refused_on_one(tmp_path):
    args = ["train", "--config", "quickstart", *TINY, "--set", "train.max_steps=4", "--set", "ssgd.batch_split=paired"]
    two = run_torchrun(2, *args, "--run-dir", str(tmp_path / "paired"))
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "paired" / "checkpoints" / "last.pt").exists()
    one = run_cli(*args, "--run-dir", str(tmp_path / "alone"))
    assert one.returncode == 2
    assert "ssgd.batch_split = paired" in one.stderr and "Traceback" not in one.stderr
    assert not (tmp_path / "alone").exists()
