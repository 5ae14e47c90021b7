"""``ray job submit -- python launch/ray_job.py`` against a real token-authenticated local cluster.

The reference for every Ray run is an independent torchrun run of the same config and world size:
Ray must only change who starts the processes, never what they compute.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY as BASE
from tests.conftest import run_cli, run_torchrun, sets

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

WORKERS = 2
STEPS = 6
TINY = ["--config", "quickstart", *BASE, *sets(f"train.max_steps={STEPS}", "train.checkpoint_every=2")]


def params(run_dir: Path) -> dict:
    import torch

    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_params(run_dir: Path, reference: Path, tol: float = 1e-6) -> None:
    got, want = params(run_dir), params(reference)
    assert got.keys() == want.keys()
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want if want[k].is_floating_point())
    assert worst <= tol, f"final parameters differ from the torchrun run by up to {worst:.3g}"


def job_output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-8000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def submit_job(cluster, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return cluster.submit(["python", "launch/ray_job.py", "--num-workers", str(WORKERS), *args], timeout=timeout)


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory) -> Path:
    """The same tiny config on 2 torchrun ranks (gloo): the parameters every Ray run must reproduce."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    proc = run_torchrun(WORKERS, "train", *TINY, "--run-dir", str(run_dir))
    assert proc.returncode == 0, job_output(proc)
    return run_dir


def test_submit_two_workers_matches_torchrun(ray_cluster, torchrun_reference, tmp_path):
    storage = tmp_path / "storage"
    proc = submit_job(ray_cluster, *TINY, "--storage-path", str(storage), "--name", "equiv")
    assert proc.returncode == 0, job_output(proc)
    assert "succeeded" in proc.stdout, job_output(proc)

    run_dir = storage / "equiv"  # the CLI's run-directory contract, under the storage path
    assert (run_dir / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert "test_acc" in metrics[-1]
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    # Ray's checkpoints (every 2 steps, 2 kept), each a small run directory of its own.
    ray_ckpts = sorted(p.name for p in run_dir.glob("checkpoint-step-*"))
    assert ray_ckpts == ["checkpoint-step-00000004", "checkpoint-step-00000006"]
    assert (run_dir / "checkpoint-step-00000006" / "checkpoints" / "last.pt").is_file()

    assert_same_params(run_dir, torchrun_reference)
    assert_same_params(run_dir / "checkpoint-step-00000006", torchrun_reference)

    report = run_cli("report", str(run_dir), "--out", str(tmp_path / "report"), timeout=120)
    assert report.returncode == 0, report.stderr
    assert "| ssgd-halves | 200 | 1 |" in (tmp_path / "report" / "report.md").read_text()

    # Submitting the finished run again trains nothing and says so on one line.
    stamp = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = submit_job(ray_cluster, *TINY, "--storage-path", str(storage), "--name", "equiv")
    assert again.returncode == 0, job_output(again)
    assert again.stdout.count("already finished (nothing to train) at step 6") == 1, job_output(again)
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("shared", id="shared-fs"),  # resumes from the run directory's own checkpoint
        pytest.param("mirrored", id="local-dir-mirrored"),  # resumes from ray.train.get_checkpoint()
    ],
)
def test_worker_crash_restarts_and_resumes_exactly(ray_cluster, torchrun_reference, tmp_path, where):
    """The last rank os._exit()s once at step 3 (after the step-2 checkpoint); with max_failures=1
    Ray restarts the worker group, which must continue to the uninterrupted run's parameters."""
    storage = tmp_path / "storage"
    extra = ["--local-dir", str(tmp_path / "local")] if where == "mirrored" else []
    proc = submit_job(
        ray_cluster,
        *TINY,
        "--set",
        "train.crash_at_step=3",
        "--max-failures",
        "1",
        "--storage-path",
        str(storage),
        "--name",
        "ft",
        *extra,
    )
    assert proc.returncode == 0, job_output(proc)
    assert "succeeded" in proc.stdout, job_output(proc)
    assert "resumed from" in proc.stdout and "at step 2/6" in proc.stdout, job_output(proc)

    work_dir = tmp_path / "local" / "ft" if where == "mirrored" else storage / "ft"
    assert (work_dir / ".crash-injected-3").exists(), "the fault was never injected"
    run_dir = storage / "ft"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), "history must not repeat or skip steps"
    assert_same_params(run_dir, torchrun_reference)


def test_submit_without_token_is_refused(ray_cluster, tmp_path):
    """Auth is really on: a client without the token (none in env, none in ~/.ray) is turned away."""
    env = ray_cluster.client_env(token=False, home=tmp_path)
    proc = ray_cluster.submit(["python", "-c", "print('should never run')"], env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    # The server refused it (401), and Ray's client says so: not a connection or usage error.
    assert "AuthenticationError" in out and "Missing authentication token" in out, out
    assert "should never run" not in proc.stdout

    # The job API itself: no token 401, a wrong token 403, the right one 200 (and no job was made).
    assert ray_cluster.api_get("/api/jobs/", token="")[0] == 401
    assert ray_cluster.api_get("/api/jobs/", token="0" * 64)[0] == 403
    status, body = ray_cluster.api_get("/api/jobs/")
    assert status == 200
    assert not any("should never run" in job.get("entrypoint", "") for job in json.loads(body))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.batch_size=202"], "data.batch_size = 202"),
        (["--set", "optim.lr=-1"], "optim.lr"),
        (["--storage-path", "relative/dir"], "--storage-path relative/dir: must be absolute"),
        (["--set", "device=cuda"], "--use-gpu"),
        (["--name", "a/b"], "--name a/b"),
    ],
)
def test_bad_launch_exits_2_before_starting_ray(capsys, args, message):
    """Mistakes are reported on one line with exit code 2, before any cluster is contacted."""
    from ssgd_dist.launchers.ray_job import main

    assert main(["--config", "quickstart", "--num-workers", "2", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_resume_prefers_the_newest_loadable_snapshot(tmp_path):
    """After a restart every rank picks the same fallback: the highest step that loads, ties to the first."""
    import torch

    from ssgd_dist.launchers.ray import choose_snapshot as choose

    def snapshot(name: str, step: int | None) -> Path:
        path = tmp_path / name / "checkpoints" / "last.pt"
        path.parent.mkdir(parents=True)
        if step is None:
            path.write_bytes(b"truncated")
        else:
            torch.save({"step": step}, path)
        return tmp_path / name

    ray_ckpt, storage, broken = snapshot("ray", 4), snapshot("storage", 6), snapshot("broken", None)
    assert choose([("Ray checkpoint", ray_ckpt), ("storage", storage)])[1:] == (storage, 6)
    assert choose([("Ray checkpoint", ray_ckpt), ("broken", broken)])[1:] == (ray_ckpt, 4)
    assert choose([("a", ray_ckpt), ("b", snapshot("same", 4))])[0] == "a"
    assert choose([("broken", broken), ("missing", tmp_path / "nowhere")]) is None
