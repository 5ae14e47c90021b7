"""What survives what: killed workers, changed world sizes, damaged checkpoints, hostile files, NaNs."""

import json
import os
import pickle
import re
import subprocess
import sys

import torch

from ssgd_dist.checkpoint import load_latest, save_checkpoint
from ssgd_dist.config import load_config
from ssgd_dist.train import train
from tests.conftest import REPO, TINY, final_params, run_cli, run_torchrun

ARGS = ["train", "--config", "quickstart", *TINY, "--set", "train.epochs=2", "--set", "train.checkpoint_every=3"]
# A small in-process run whose skip policy tolerates no skipped step at all.
NO_SKIP_ALLOWED = [
    "data.num_samples=1000",
    "data.batch_size=100",
    "model.hidden=[8]",
    "train.on_nonfinite=skip",
    "train.max_skips=0",
]


def test_elastic_torchrun_survives_a_sigkilled_worker_bit_for_bit(tmp_path):
    full = run_torchrun(2, *ARGS, "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "-m",
        "ssgd_dist.cli",
        *ARGS,
        "--set",
        "train.crash_at_step=5",
        "--run-dir",
        str(tmp_path / "elastic"),
    ]
    elastic = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    worker_lines = [line for line in elastic.stderr.splitlines() if not line.startswith("[rank")]
    assert elastic.returncode == 0, "\n".join(worker_lines)[-5000:]
    assert (tmp_path / "elastic" / ".crash-injected-5").exists()  # the worker really died once
    assert "resumed from" in elastic.stdout
    for name, value in final_params(tmp_path / "full").items():
        assert torch.equal(value, final_params(tmp_path / "elastic")[name]), name


def test_resume_on_a_different_world_size_continues_the_same_run(tmp_path):
    reference = run_cli(*ARGS, "--run-dir", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    two = run_torchrun(2, *ARGS, "--set", "train.crash_at_step=5", "--run-dir", str(tmp_path / "moved"))
    assert two.returncode != 0
    one = run_cli(*ARGS, "--set", "train.crash_at_step=5", "--run-dir", str(tmp_path / "moved"))
    assert one.returncode == 0, one.stderr
    assert "at step 3/" in one.stdout
    for name, value in final_params(tmp_path / "ref").items():
        torch.testing.assert_close(final_params(tmp_path / "moved")[name], value, rtol=1e-5, atol=1e-5)


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step}


def test_retention_keeps_the_newest_and_last_points_at_the_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, state(step), step, num_to_keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert names == ["step-00000004.pt", "step-00000005.pt"]
    manifest = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert set(manifest) == {"last.pt", *names}
    loaded, path = load_latest(tmp_path)
    assert loaded["step"] == 5 and path.name == "step-00000005.pt"


def test_after_a_fallback_the_abandoned_newer_files_are_replaced_not_kept(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, state(step), step, num_to_keep=3)
    save_checkpoint(tmp_path, state(2), 2, num_to_keep=1)  # resumed from step 2 after step 3 went bad
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")) == ["step-00000002.pt"]
    assert load_latest(tmp_path)[0]["step"] == 2


def test_a_half_written_metrics_line_does_not_block_resume(tmp_path):
    from ssgd_dist.metrics import MetricsWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train_lo')
    MetricsWriter(tmp_path, resume_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    for step in (1, 2):
        save_checkpoint(tmp_path, state(step), step, num_to_keep=2)
    newest = tmp_path / "checkpoints" / "step-00000002.pt"
    data = newest.read_bytes()
    os.truncate(newest, len(data) // 2)  # last.pt is a hard link: both are damaged
    loaded, path = load_latest(tmp_path)
    assert loaded["step"] == 1 and path.name == "step-00000001.pt"
    assert "fails its checksum" in capsys.readouterr().err


def test_corrupted_bytes_without_manifest_are_detected_by_loading(tmp_path, capsys):
    for step in (1, 2):
        save_checkpoint(tmp_path, state(step), step, num_to_keep=2)
    (tmp_path / "checkpoints" / "manifest.json").unlink()
    newest = tmp_path / "checkpoints" / "step-00000002.pt"
    newest.write_bytes(b"garbage" * 100)
    (tmp_path / "checkpoints" / "last.pt").unlink()
    loaded, _ = load_latest(tmp_path)
    assert loaded["step"] == 1
    assert "cannot be loaded" in capsys.readouterr().err


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_pickled_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    with open(ckpt_dir / "last.pt", "wb") as f:
        torch.save({"model": {}, "step": Payload(marker)}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    assert load_latest(tmp_path) is None
    assert not marker.exists()
    assert "cannot be loaded" in capsys.readouterr().err


def test_nonfinite_loss_stops_with_exit_3_and_a_diagnostic(tmp_path):
    result = run_cli(*ARGS, "--set", "train.nan_at_step=2", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 3
    assert "non-finite" in result.stderr and "Traceback" not in result.stderr
    diagnostic = json.loads((tmp_path / "run" / "nonfinite.json").read_text())
    assert diagnostic["step"] == 1


def test_a_nonfinite_step_read_back_late_stops_every_rank_before_any_checkpoint_holds_it(tmp_path):
    run_dir = tmp_path / "late"
    # The gradient norm is read every 50 steps or at a checkpoint (every 2): step 3 is bad, step 4 runs
    # on NaN weights, and the read at step 4's checkpoint stops the run before that checkpoint is written.
    # Every rank reads the same synchronised norm, so they stop together.
    result = run_torchrun(
        2,
        *ARGS,
        "--set",
        "train.nan_at_step=3",
        "--set",
        "train.log_every=50",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.keep_checkpoints=10",
        "--run-dir",
        str(run_dir),
        timeout=120,
    )
    assert "non-finite gradient norm (nan) at step 2" in result.stderr
    # torchrun's summary: the first rank to leave exited with code 3; it terminates any still running.
    codes = re.findall(r"exitcode\s*: (-?\d+)", result.stderr)
    assert "3" in codes and set(codes) <= {"3", "-15"}, result.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt")) == ["step-00000002.pt"]
    diagnostic = json.loads((run_dir / "nonfinite.json").read_text())
    assert diagnostic["step"] == 2 and diagnostic["last"]["step"] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # the bad step is not logged as a trained one
    assert all(isinstance(r["grad_norm"], float) for r in records)


def test_a_failure_elsewhere_still_writes_the_steps_read_so_far(tmp_path):
    cfg = load_config(
        "quickstart",
        [
            *NO_SKIP_ALLOWED,
            "train.nan_at_step=6",
            "train.log_every=50",
            "train.progress=false",
        ],
    )
    try:
        train(cfg, tmp_path / "run")
    except Exception as exc:  # noqa: BLE001
        assert "max_skips" in str(exc)
    else:
        raise AssertionError("the run should have stopped")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "run" / "nonfinite.json").read_text())["last"]["step"] == 5


def test_the_default_step_reads_nothing_back_to_the_host(monkeypatch):
    """Under on_nonfinite=stop, nothing in a step converts a tensor to a Python value: on an accelerator
    each such conversion waits for the device to finish all work queued so far."""
    from ssgd_dist.backends.local import LocalBackend
    from ssgd_dist.config import Config
    from ssgd_dist.methods import build_method

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clip_grad_norm=1.0)
    method = build_method(Config(method="ssgd"), model)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    backend.train_step(method, x, y, 0)  # the first step creates the optimizer's state

    def read_back(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host during the step")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, read_back)
        result = backend.train_step(method, x, y, 1)
    assert isinstance(result.loss, torch.Tensor) and isinstance(result.grad_norm, torch.Tensor)
    assert float(result.grad_norm) > 0 and not result.skipped


def test_nonfinite_step_is_skipped_consistently_on_every_rank(tmp_path):
    run_dir = tmp_path / "skip"
    result = run_torchrun(
        2,
        *ARGS,
        "--set",
        "train.on_nonfinite=skip",
        "--set",
        "train.nan_at_step=3",
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "train.keep_checkpoints=20",
        "--run-dir",
        str(run_dir),
    )
    assert result.returncode == 0, result.stderr
    load = lambda step: torch.load(run_dir / f"checkpoints/step-{step:08d}.pt", weights_only=True)["model"]  # noqa: E731
    before, after = load(2), load(3)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step left w untouched
    assert all(torch.isfinite(v).all() for v in final_params(run_dir).values())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == 1


def test_too_many_skips_stop_the_run(tmp_path):
    cfg = load_config(
        "quickstart",
        [
            *NO_SKIP_ALLOWED,
            "train.nan_at_step=1",
            "train.progress=false",
        ],
    )
    try:
        train(cfg, tmp_path / "run")
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ == "NonFiniteError" and "max_skips" in str(exc)
    else:
        raise AssertionError("the run should have stopped")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_thousands_of_steps_do_not_grow_memory(tmp_path):
    from ssgd_dist import distributed
    from ssgd_dist.train import Trainer

    cfg = load_config(
        "quickstart",
        [
            "data.name=synthetic",
            "data.batch_size=64",
            "model.hidden=[16]",
            "train.epochs=100",
            "train.eval_every=50",
            "train.progress=false",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "long", distributed.setup("cpu"))
    readings = []
    for step in range(3000):
        x, y = trainer.local_batch(step)
        trainer.backend.train_step(trainer.method, x, y, step)
        if step in (500, 2999):
            readings.append(rss_mib())
    assert readings[1] - readings[0] < 20, readings


def test_a_skipped_step_leaves_batchnorm_statistics_untouched():
    from torch import nn

    from ssgd_dist.backends.local import LocalBackend
    from ssgd_dist.config import Config
    from ssgd_dist.methods import build_method

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="skip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.full((8, 4), float("nan"))
    result = backend.train_step(build_method(Config(method="ssgd"), model), x, torch.zeros(8, dtype=torch.long), 0)
    assert result.skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
