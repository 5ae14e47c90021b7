"""The run directory is never mixed, emptied or poisoned.

One live run per directory (a lock); only this run's checkpoints are resumed (its identity), and an
unusable one is skipped, never crashed on; rewrites are atomic; a full disk is reported as such;
non-finite weights never reach a checkpoint; SIGINT/SIGTERM stop cleanly; and SIGKILL at random
moments never loses a step before the last checkpoint.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssgd_dist.checkpoint import load_latest, step_of
from ssgd_dist.cli import main
from ssgd_dist.config import load_config
from ssgd_dist.errors import ConfigError, NonFiniteError
from ssgd_dist.metrics import MetricsWriter
from ssgd_dist.train import train
from tests.conftest import REPO, TINY, final_params, run_cli, sets

SMALL = [*TINY[1::2], "train.epochs=2", "train.checkpoint_every=3"]  # 16 steps; checkpoints 15 and 16 kept
ARGS = ["train", "--config", "quickstart", *sets(*SMALL)]
# Runs until it is stopped (a checkpoint every 5 steps).
ENDLESS = ["train", "--config", "quickstart", *sets(*TINY[1::2], "train.epochs=100000", "train.checkpoint_every=5")]


def cfg_of(*overrides: str):
    return load_config("quickstart", [*SMALL, *overrides])


def spawn(args: list[str], run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ssgd_dist.cli", *args, "--run-dir", str(run_dir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def holder_pid(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def metrics_records(run_dir: Path) -> list[dict]:
    """Every complete line; only the last one may be half-written (a kill in the middle of a write)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            assert i == len(lines) - 1, f"line {i + 1} of {len(lines)} is damaged"
    return records


def temporaries(run_dir: Path) -> list[str]:
    return [p.name for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.iterdir() if ".tmp" in p.name]


# -- one live run per directory ---------------------------------------------------------------------
def test_a_second_run_on_a_live_run_directory_is_refused_with_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    first = spawn(ENDLESS, run_dir)
    try:
        wait_until(lambda: holder_pid(run_dir) == first.pid and (run_dir / "checkpoints" / "last.pt").exists())
        start = time.monotonic()
        second = run_cli(*ENDLESS, "--run-dir", str(run_dir), timeout=120)  # the same command: no config conflict
        assert second.returncode == 2, second.stderr
        assert time.monotonic() - start < 60
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ssgd-dist: error:"), second.stderr
        assert str(run_dir) in err[0] and f"pid {first.pid}" in err[0] and "another run is using it" in err[0]
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [r["step"] for r in metrics_records(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, once each, in order


def test_the_lock_is_released_at_the_end_and_a_refused_start_leaves_no_trace(tmp_path):
    from ssgd_dist.rundir import RunLock

    run_dir = tmp_path / "run"
    train(cfg_of(), run_dir)
    held = RunLock(run_dir)
    assert held.acquire(wait_s=0) is None  # train released it
    try:
        refused = RunLock(run_dir).acquire(wait_s=0.2)
        assert refused is not None and f"pid {os.getpid()}" in refused
        with pytest.raises(ConfigError, match="another run is using it"):
            train(cfg_of(), run_dir)
    finally:
        held.release()
    fresh = tmp_path / "a" / "b" / "fresh"
    lock = RunLock(fresh)
    assert lock.acquire(wait_s=0) is None and fresh.is_dir()
    lock.release()  # nothing was written but the lock: the directories it made go with it
    assert not (tmp_path / "a").exists()


# -- identity ------------------------------------------------------------------------------------------
def test_deleting_config_yaml_does_not_let_another_configuration_resume_the_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(cfg_of(), run_dir)
    (run_dir / "config.yaml").unlink()
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    code = main([*ARGS, "--set", "noise.alpha=0.5", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "belongs to another run (noise.alpha: 0.3 -> 0.5)" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ssgd-dist: error:") and "none can be resumed" in last and "move" in last
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # kept, not emptied
    assert not (run_dir / "config.yaml").exists()


def test_a_checkpoint_of_another_run_dropped_into_checkpoints_is_skipped(tmp_path, capsys):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    train(cfg_of(), ours)
    train(cfg_of("model.hidden=[16]", "noise.alpha=0.5"), theirs)  # another model: resuming it would crash
    (ours / "checkpoints" / "step-00000099.pt").write_bytes((theirs / "checkpoints" / "last.pt").read_bytes())
    capsys.readouterr()
    summary = train(cfg_of(), ours)
    out, err = capsys.readouterr()
    assert summary["step"] == 16 and "resumed from" in out and "step-00000016.pt" in out
    assert "step-00000099.pt belongs to another run (model.hidden: [16] -> [32, 32]; noise.alpha: 0.5 -> 0.3)" in err


def test_old_run_directories_whose_config_lacks_newer_keys_keep_resuming(tmp_path, capsys):
    import yaml

    run_dir = tmp_path / "run"
    train(cfg_of(), run_dir)

    def drop_new_keys(cfg: dict) -> dict:
        del cfg["noise"]["restore"], cfg["data"]["eval_batch_size"]  # as if written before these keys existed
        return cfg

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(drop_new_keys(saved)))
    (run_dir / "checkpoints" / "manifest.json").unlink()
    for path in (run_dir / "checkpoints").glob("step-*.pt"):
        state = torch.load(path, weights_only=True)
        state["config"] = json.dumps(drop_new_keys(json.loads(state["config"])))
        torch.save(state, path)
    capsys.readouterr()
    assert train(cfg_of(), run_dir)["step"] == 16
    assert "resumed from" in capsys.readouterr().out


def test_a_config_yaml_that_is_not_a_mapping_is_refused_not_crashed_on(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(cfg_of(), run_dir)
    (run_dir / "config.yaml").write_text("- a list\n")
    capsys.readouterr()
    assert main([*ARGS, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its config.yaml is not a YAML mapping" in err and "delete it" in err


# -- discovery -------------------------------------------------------------------------------------------
def _own_checkpoint_changed(change):
    def damage(ckpt_dir: Path) -> None:
        state = torch.load(ckpt_dir / "step-00000016.pt", weights_only=True)
        change(state)
        torch.save(state, ckpt_dir / "step-00000099.pt")

    return damage


def _reshape_first_weight(state):
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)


DAMAGE = {
    "manifest not an object": (
        lambda d: (d / "manifest.json").write_text("[1, 2, 3]"),
        "manifest.json is not an object",
    ),
    "a stray step-*.pt name": (
        lambda d: (d / "step-best.pt").write_bytes(b"not ours"),
        "step-best.pt has a name that is not step-<number>.pt",
    ),
    "a missing key": (
        _own_checkpoint_changed(lambda s: s.pop("torch_rng")),
        "step-00000099.pt lacks torch_rng",
    ),
    "another model's shapes": (
        _own_checkpoint_changed(_reshape_first_weight),
        "step-00000099.pt holds another model",
    ),
    "non-finite weights": (
        _own_checkpoint_changed(lambda s: next(iter(s["model"].values())).fill_(float("nan"))),
        "step-00000099.pt holds non-finite weights",
    ),
}


@pytest.mark.parametrize("damage, reported", DAMAGE.values(), ids=DAMAGE.keys())
def test_an_unusable_candidate_is_reported_and_skipped_never_crashed_on(tmp_path, capsys, damage, reported):
    run_dir = tmp_path / "run"
    train(cfg_of(), run_dir)
    damage(run_dir / "checkpoints")
    capsys.readouterr()
    summary = train(cfg_of(), run_dir)
    out, err = capsys.readouterr()
    assert summary["step"] == 16 and "resumed from" in out and "step-00000016.pt at step 16/16" in out
    assert reported in err


def test_when_no_checkpoint_is_usable_the_run_refuses_and_keeps_its_metrics(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(cfg_of(), run_dir)
    for path in (run_dir / "checkpoints").glob("*.pt"):
        path.write_bytes(b"garbage" * 10)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*ARGS, "--run-dir", str(run_dir)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ssgd-dist: error:") and "none can be resumed" in last
    assert "step-00000016.pt: fails its checksum" in last and "step-00000015.pt: fails its checksum" in last
    assert f"move {run_dir / 'checkpoints'}" in last
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


# -- atomic rewrites, stale temporaries, full disk ----------------------------------------------------
class Killed(BaseException):
    pass


def test_a_kill_while_resume_rewrites_metrics_never_empties_them(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 6))
    path.write_text(original)
    real_open, real_replace = builtins.open, os.replace

    def killing_open(file, mode="r", *args, **kwargs):  # a kill right after metrics.jsonl is truncated
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and isinstance(file, (str, os.PathLike)) and Path(file) == path:
            handle.close()
            raise Killed
        return handle

    def killing_replace(src, dst, *args, **kwargs):  # a kill right before the new file is renamed in
        if Path(dst) == path:
            raise Killed
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", killing_open)
    monkeypatch.setattr(io, "open", killing_open)
    monkeypatch.setattr(os, "replace", killing_replace)
    with pytest.raises(Killed):
        MetricsWriter(tmp_path, resume_step=3)
    monkeypatch.undo()
    assert path.read_text() == original
    assert temporaries(tmp_path) == []
    MetricsWriter(tmp_path, resume_step=3).close()
    assert path.read_text() == original[: original.index('{"step": 4}')]


def test_temporary_files_a_kill_left_are_removed_at_start(tmp_path):
    run_dir = tmp_path / "run"
    train(cfg_of(), run_dir)
    left = [
        run_dir / "checkpoints" / ".step-00000018.pt.tmp4242",
        run_dir / "checkpoints" / ".last.pt.tmp4242",
        run_dir / "checkpoints" / ".manifest.json.tmp17",
        run_dir / ".metrics.jsonl.tmp99",
        run_dir / ".config.yaml.tmp99",
    ]
    for path in left:
        path.write_bytes(b"half a file")
    (run_dir / "notes.tmp").write_text("the user's")
    train(cfg_of(), run_dir)
    assert temporaries(run_dir) == ["notes.tmp"]


def test_a_full_disk_while_saving_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_save = torch.save

    class FullDisk(io.RawIOBase):  # the device fills up after 100 bytes of the file
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 6:
            return real_save(obj, FullDisk(f), *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code = main([*ARGS, "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    monkeypatch.undo()
    assert code == 4
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("ssgd-dist: error: no space left on the device of")
    assert str(run_dir / "checkpoints") in err and "step-00000006.pt" in err and "needs about" in err and "free" in err
    assert load_latest(run_dir)[0]["step"] == 3 and temporaries(run_dir) == []
    assert [r["step"] for r in metrics_records(run_dir)] == list(range(1, 7))
    assert main([*ARGS, "--run-dir", str(run_dir)]) == 0
    assert "at step 3/16" in capsys.readouterr().out
    assert [r["step"] for r in metrics_records(run_dir)] == list(range(1, 17))


# -- non-finite weights -----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_weights_stop_the_run_before_any_checkpoint_holds_them(tmp_path, policy):
    run_dir = tmp_path / "run"
    # The gradient norm of the first step is finite; with the largest float32 learning rate and a large weight
    # decay, its update (lr x (gradient + weight_decay x w)) overflows float32.
    huge = ["optim.lr=3.0e+38", "optim.weight_decay=100", "optim.schedule=constant"]
    cfg = cfg_of(*huge, f"train.on_nonfinite={policy}", "train.checkpoint_every=1")
    with pytest.raises(NonFiniteError, match="non-finite weights after the update of step 0") as info:
        train(cfg, run_dir)
    assert "lower optim.lr" in info.value.hint
    assert json.loads((run_dir / "nonfinite.json").read_text())["step"] == 0
    assert metrics_records(run_dir) == []  # the step that made them is not logged as a trained one
    for path in (run_dir / "checkpoints").glob("*.pt") if (run_dir / "checkpoints").exists() else []:
        for name, value in torch.load(path, weights_only=True)["model"].items():
            assert torch.isfinite(value).all(), f"{path.name}: {name}"


# -- signals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_without_a_traceback_and_it_resumes(tmp_path, sig):
    run_dir = tmp_path / "run"
    args = ["train", "--config", "quickstart", *sets(*TINY[1::2], "train.epochs=40", "train.checkpoint_every=5")]
    proc = spawn(args, run_dir)
    try:
        wait_until(lambda: (run_dir / "checkpoints" / "last.pt").exists())
        sent = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert time.monotonic() - sent < 10
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        f"ssgd-dist: stopped by {sig.name}; run the same command again to resume from the last checkpoint"
    ]
    stopped_at = load_latest(run_dir)[0]["step"]
    resumed = run_cli(*args, "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at}/320" in resumed.stdout
    assert [r["step"] for r in metrics_records(run_dir)] == list(range(1, 321))


def test_a_run_that_cannot_unwind_after_a_signal_is_ended_by_the_watchdog():
    # The handler is replaced by one that does nothing: as if the main thread were stuck in a call that
    # never returns to Python (a collective waiting for a peer that is gone).
    code = (
        "import signal, time\n"
        "from ssgd_dist.signals import StopOnSignals\n"
        "with StopOnSignals(grace_s=1):\n"
        "    signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.monotonic() - start < 10
    assert b"stopped by SIGTERM (the run did not unwind within 1 s)" in stderr


@pytest.mark.distributed
def test_sigterm_to_torchrun_reaches_the_workers_which_stop_cleanly_and_resume(tmp_path):
    from ssgd_dist.launchers.torchrun import torchrun_command

    run_dir = tmp_path / "run"
    args = ["train", "--config", "quickstart", *sets(*TINY[1::2], "train.epochs=40", "train.checkpoint_every=5")]
    args += ["--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        torchrun_command(2, args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        wait_until(lambda: (run_dir / "checkpoints" / "last.pt").exists())
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # Rank 0's one line; no worker traceback (torchrun prints its own SignalException, not the workers').
    assert stderr.count("ssgd-dist: stopped by SIGTERM; run the same command again") == 1, stderr[-3000:]
    assert "ssgd_dist/" not in stderr, stderr[-3000:]
    stopped_at = load_latest(run_dir)[0]["step"]
    resumed = subprocess.run(torchrun_command(2, args), cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}/320" in resumed.stdout
    assert [r["step"] for r in metrics_records(run_dir)] == list(range(1, 321))


# -- SIGKILL at random moments ----------------------------------------------------------------------------
def newest_step_file(run_dir: Path) -> int:
    steps = [step_of(p) for p in (run_dir / "checkpoints").glob("step-*.pt")]
    return max([s for s in steps if s is not None], default=0)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_checkpointed_step(tmp_path):
    """20 SIGKILLs at random moments, restarting each time, in turn: right after the run says it resumed
    (rewriting config.yaml and metrics.jsonl), while training and checkpointing, and anywhere after start."""
    assignments = [*TINY[1::2], "train.epochs=150", "train.checkpoint_every=4", "train.log_every=3"]  # 1200 steps
    reference_dir = tmp_path / "reference"
    train(load_config("quickstart", assignments), reference_dir)
    reference = [{k: v for k, v in r.items() if k != "time"} for r in metrics_records(reference_dir)]
    args = ["train", "--config", "quickstart", *sets(*assignments), "--run-dir", str(tmp_path / "killed")]
    run_dir = tmp_path / "killed"
    rng = random.Random(2009)
    log = tmp_path / "stderr.log"
    for kill in range(20):
        moment = "training" if kill == 0 else ("resuming", "training", "anywhere")[kill % 3]
        before = newest_step_file(run_dir)
        with open(log, "w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ssgd_dist.cli", *args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            if moment == "resuming":  # its first line; printed just before config.yaml and the metrics are rewritten
                assert "resumed from" in proc.stdout.readline(), log.read_text()
                time.sleep(rng.uniform(0, 0.05))
            elif moment == "training":
                wait_until(lambda: newest_step_file(run_dir) > before or proc.poll() is not None)
                time.sleep(rng.uniform(0, 0.3))
            else:
                wait_until(lambda: holder_pid(run_dir) == proc.pid or proc.poll() is not None)
                time.sleep(rng.uniform(0, 1.0))
            assert proc.poll() is None, f"ended before kill {kill + 1}: {log.read_text()}"
            proc.kill()
            proc.wait()
            proc.stdout.close()
        found = load_latest(run_dir)
        checkpointed = found[0]["step"] if found else 0
        records = metrics_records(run_dir)
        assert [r["step"] for r in records] == list(range(1, len(records) + 1))
        assert len(records) >= checkpointed  # no line before the last checkpoint is lost
        for record in records[:checkpointed]:
            assert {k: v for k, v in record.items() if k != "time"} == reference[record["step"] - 1]
    final = run_cli(*args)
    assert final.returncode == 0, final.stderr
    assert [{k: v for k, v in r.items() if k != "time"} for r in metrics_records(run_dir)] == reference
    expected = final_params(reference_dir)
    for name, value in final_params(run_dir).items():
        assert torch.equal(value, expected[name]), name
    assert temporaries(run_dir) == []
