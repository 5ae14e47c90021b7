"""Two real gloo ranks: one all-reduce per step, replicas bitwise equal, 2 ranks == 1 rank."""

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import TINY, final_params, free_port, run_cli, run_torchrun
from tests.dist_workers import count_comm, evaluate_worker

pytestmark = pytest.mark.distributed


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


def test_parameters_stay_bitwise_identical_on_all_ranks(comm_results):
    """Every floating-point parameter of the cnn1d (with BatchNorm), every method, after 6 steps."""
    for key, result in comm_results.items():
        assert len(result["parameter_names"]) > 4, key
        assert result["parameter_mismatches"] == {}, key


def test_batchnorm_buffers_are_identical_on_all_ranks_only_where_ddp_or_the_trainer_makes_them(comm_results):
    """Every floating-point buffer (BatchNorm running statistics) compared across ranks too, honestly.

    With DDP's forward buffer sync (torch's default), each forward starts from rank 0's buffers on every
    rank; then each rank updates them with its own samples, so after a step they differ between ranks
    (by up to about 0.4 after these 6 steps) until the next forward, and the checkpoint holds rank 0's.
    Without it, the trainer must make them identical before they are read (evaluation, checkpoints).
    """
    for key, result in comm_results.items():
        assert any(n.endswith("running_mean") for n in result["buffer_names"]), key  # not vacuous: it has BatchNorm
        if result["ddp_syncs_buffers"]:
            assert result["forwards"] >= 6, key
            assert result["buffer_mismatches_at_each_forward"] == {}, key
            assert result["buffer_mismatches_after_steps"], f"{key}: per-rank statistics were expected to differ"
        else:
            assert result["buffer_mismatches_after_evaluate"] == {}, key


@pytest.mark.parametrize(("ranks", "eval_batch"), [(2, 64), (3, 133)])
def test_test_metrics_cover_the_whole_test_set_on_several_ranks(tmp_path, ranks, eval_batch):
    """Each rank scores its share of the test set; the reported loss and accuracy are those of the whole set,
    computed here by hand from rank 0's weights, and what one process reports. On 3 ranks the 400 test
    samples split 134/133/133, so with batches of 133 two ranks end on an empty batch (every rank makes
    the same number of forwards)."""
    from ssgd_dist import distributed
    from ssgd_dist.config import load_config
    from ssgd_dist.data import load_dataset
    from ssgd_dist.models import build_model
    from ssgd_dist.train import Trainer

    overrides = ["data.num_samples=2000", "data.batch_size=204", f"data.eval_batch_size={eval_batch}"]
    overrides.append("model.hidden=[32,32]")
    mp.start_processes(evaluate_worker, args=(ranks, str(tmp_path), overrides), nprocs=ranks, start_method="spawn")
    per_rank = json.loads((tmp_path / "metrics.json").read_text())
    cfg = load_config("quickstart", overrides)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        logits = model.eval()(data.x_test)
        losses = torch.nn.functional.cross_entropy(logits, data.y_test, reduction="none").double()
        correct = (logits.argmax(1) == data.y_test).double()
    want = {"test_loss": float(losses.mean()), "test_acc": float(correct.mean())}
    # The test can tell: rank 0's own half scores differently from the whole set.
    assert abs(float(losses[0::2].mean()) - want["test_loss"]) > 1e-4
    alone = Trainer(cfg, tmp_path / "alone", distributed.setup("cpu")).evaluate()
    for metrics in (*per_rank, alone):
        assert metrics["test_loss"] == pytest.approx(want["test_loss"], rel=1e-6)
        assert metrics["test_acc"] == pytest.approx(want["test_acc"], abs=1e-12)


def logged_test_metrics(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "test_loss" in r]


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
    # and the test metrics: rank 0 reports the whole test set, as one process does
    m1, m2 = logged_test_metrics(tmp_path / "one"), logged_test_metrics(tmp_path / "two")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] and m1
    for a, b in zip(m1, m2):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4), a["step"]
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=0.0026), a["step"]  # at most 1 of 400 flips


def test_paired_mode_trains_on_two_ranks_and_is_refused_on_one(tmp_path):
    args = ["train", "--config", "quickstart", *TINY, "--set", "train.max_steps=4", "--set", "ssgd.batch_split=paired"]
    two = run_torchrun(2, *args, "--run-dir", str(tmp_path / "paired"))
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "paired" / "checkpoints" / "last.pt").exists()
    one = run_cli(*args, "--run-dir", str(tmp_path / "alone"))
    assert one.returncode == 2
    assert "ssgd.batch_split = paired" in one.stderr and "Traceback" not in one.stderr
    assert not (tmp_path / "alone").exists()
