"""Issue 17: every user mistake exits 2 with one line ``ssgd-dist: error: ...`` and no traceback.

In-process calls of the real entry points (``ssgd_dist.cli.main``, ``ssgd_dist.launchers.ray_job.main``),
so each case costs well under a second; none of them trains a step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssgd_dist.cli import main
from ssgd_dist.config import dump_config, load_config
from ssgd_dist.data import load_dataset
from ssgd_dist.models import build_model
from tests.conftest import INSTALL, require, sets

# The brief's small run: never reaches a training step in these tests.
SMALL = sets(
    "train.max_steps=1",
    "data.num_samples=2000",
    "data.batch_size=200",
    "train.progress=false",
    "train.num_threads=1",
)


def train_args(run_dir: Path | str, *extra: str) -> list[str]:
    return ["train", "--config", "quickstart", *SMALL, *extra, "--run-dir", str(run_dir)]


@pytest.fixture(autouse=True)
def alone(monkeypatch):
    """A single process, whatever launched pytest."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def one_error(capsys, rc: int, *phrases: str, prefix: str = "ssgd-dist: error: ") -> str:
    """Exit 2, exactly one line on stderr starting with ``prefix`` and holding every phrase, no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for phrase in phrases:
        assert phrase in lines[0], err
    return lines[0]


# -- 1. the run directory ---------------------------------------------------------------------------
def test_run_dir_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    one_error(capsys, main(train_args(target)), f"--run-dir {target}", "is an existing file")
    assert target.read_text() == "x"


def test_run_dir_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "run"
    one_error(capsys, main(train_args(target)), f"--run-dir {target}", "cannot create it")


# -- 2. the data cache ------------------------------------------------------------------------------
def test_cache_dir_is_a_file(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("x")
    run_dir = tmp_path / "run"
    rc = main(train_args(run_dir, "--set", f"data.cache_dir={cache}"))
    one_error(capsys, rc, f"data.cache_dir = {cache}", "is a file, not a directory")
    assert not run_dir.exists()  # refused before anything was written


def test_corrupt_cached_data_is_regenerated_with_a_warning(tmp_path, capsys):
    cfg = load_config("quickstart", ["data.num_samples=1000", f"data.cache_dir={tmp_path}"]).data
    cached = tmp_path / "mnist1d-1000.npz"
    cached.write_bytes(b"garbage, not an npz")
    data = load_dataset(cfg)
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("ssgd-dist: warning: ")
    assert str(cached) in err and "regenerating" in err
    assert len(data.y_train) + len(data.y_test) == 1000
    with np.load(cached, allow_pickle=False) as f:  # the cache is whole again
        assert f["x"].shape[0] == len(data.y_train)


# -- 3. RANK / WORLD_SIZE ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env, phrase",
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK = 'abc': not an integer"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE = 'two': not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be < WORLD_SIZE"),
        ({"RANK": "-1", "WORLD_SIZE": "1"}, "RANK = -1: must be >= 0"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE = 0: must be >= 1"),
    ],
)
def test_bad_rank_environment(tmp_path, capsys, monkeypatch, env, phrase):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    one_error(capsys, main(train_args(run_dir)), phrase, "torchrun")
    assert not run_dir.exists()


# -- 4. backend=ddp alone ---------------------------------------------------------------------------
def test_ddp_backend_in_a_single_process(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(train_args(run_dir, "--set", "backend=ddp"))
    one_error(capsys, rc, "backend = ddp in a single process", "torchrun", "backend=local")
    assert not run_dir.exists()


# -- 5. report on damaged run directories -----------------------------------------------------------
def fake_run(run_dir: Path, metrics: str, config: str | None = None) -> Path:
    run_dir.mkdir(parents=True)
    cfg = load_config("quickstart", ["data.num_samples=2000", "data.batch_size=200"])
    (run_dir / "config.yaml").write_text(dump_config(cfg) if config is None else config)
    (run_dir / "metrics.jsonl").write_text(metrics)
    return run_dir


GOOD_METRICS = "".join(
    json.dumps({"step": s, "epoch": s / 10, "train_loss": 1.0, "test_acc": 0.5, "test_loss": 1.2}) + "\n"
    for s in (10, 20)
)


def test_report_tolerates_a_half_written_last_line(tmp_path, capsys):
    run = fake_run(tmp_path / "run", GOOD_METRICS + '{"step": 21, "train_lo')
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err
    assert (tmp_path / "report" / "report.md").is_file()


def test_report_on_a_config_without_method(tmp_path, capsys):
    run = fake_run(tmp_path / "run", GOOD_METRICS, config="seed: 0\ndata: {batch_size: 200}\n")
    rc = main(["report", str(run), "--out", str(tmp_path / "report")])
    one_error(capsys, rc, str(run / "config.yaml"), "method")


def test_report_on_garbage_metrics(tmp_path, capsys):
    run = fake_run(tmp_path / "run", "garbage\n" + GOOD_METRICS)
    rc = main(["report", str(run), "--out", str(tmp_path / "report")])
    one_error(capsys, rc, "line 1 is not a metrics record", prefix=f"ssgd-dist: error: {run / 'metrics.jsonl'}: ")


def test_report_skips_a_damaged_run_with_one_warning(tmp_path, capsys):
    good = fake_run(tmp_path / "runs" / "good", GOOD_METRICS)
    bad = fake_run(tmp_path / "runs" / "bad", GOOD_METRICS, config="seed: 0\nmethod: sgd\n")
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("ssgd-dist: warning: skipping"), err
    assert str(bad) in err and str(good) not in err


# -- 6. flatness with another model's checkpoint ----------------------------------------------------
def test_flatness_checkpoint_of_another_model(tmp_path, capsys):
    run = fake_run(tmp_path / "mlp-run", GOOD_METRICS)
    other = load_config("quickstart", ["model.name=cnn1d"])
    ckpt = tmp_path / "cnn1d.pt"
    torch.save({"model": build_model(other.model, (40,), 10).state_dict(), "step": 1}, ckpt)
    rc = main(["flatness", str(run), "--checkpoint", str(ckpt), "--samples", "100"])
    one_error(capsys, rc, f"checkpoint {ckpt}", "does not fit the model", "model.name = mlp")


# -- 7. launch/ray_job.py flags ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--cpus-per-worker", "-1"], "--cpus-per-worker -1.0: must be >= 0"),
        (["--use-gpu", "--gpus-per-worker", "-0.5"], "--gpus-per-worker -0.5: must be >= 0"),
        (["--num-to-keep", "0"], "--num-to-keep 0: keep at least 1"),
        (["--max-failures", "-2"], "--max-failures -2: a count >= 0, or -1"),
        (["--storage-path", "FILE"], "is an existing file"),
    ],
)
def test_ray_job_flags(tmp_path, capsys, monkeypatch, flags, phrase):
    require(module="ray", install=INSTALL["ray"])  # the launcher imports ray; ray.init must never be reached
    import ray

    from ssgd_dist.launchers import ray_job

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called"))
    storage = tmp_path / "storage-file"
    storage.write_text("x")
    flags = [str(storage) if f == "FILE" else f for f in flags]
    if "--storage-path" not in flags:
        flags += ["--storage-path", str(tmp_path / "runs")]
    rc = ray_job.main(["--config", "quickstart", "--num-workers", "1", *flags])
    one_error(capsys, rc, phrase)


# -- 8. bench --------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", ["-4", "0"])
def test_bench_batch_size_not_positive(capsys, batch):
    one_error(capsys, main(["bench", "--batch-size", batch]), f"--batch-size {batch}: must be at least 1")
