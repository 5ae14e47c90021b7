"""The run directory belongs to one run: its identity, and the lock the live run holds.

**Identity.** A run is its resolved configuration, normalised (validated, then dumped: keys added to
the schema since count as their defaults, keys that do not apply to the run are left out), minus
``RESUMABLE_DIFFERENCES``, the keys that may change on resume because they do not change what is
computed. The world size is not part of it. The same comparison checks ``config.yaml`` and the
configuration every checkpoint stores, so a checkpoint of another run is never resumed.

**Lock.** Rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for the life of the run. The
kernel drops it when its holder dies, so a restarted run (torchrun restart, Ray retry, the same
command again) takes it again, while a second run started while the first is alive is refused. The
lock file names its holder (pid, host) for that message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import safe_yaml
from .config import Config, validate
from .errors import ConfigError
from .files import remove_stale_temporaries

# Keys that may differ between a run and its resumption: they do not change what is computed.
RESUMABLE_DIFFERENCES = {
    ("device",),
    ("train", "progress"),
    ("train", "crash_at_step"),
    ("train", "nan_at_step"),
    ("train", "num_threads"),
    ("train", "keep_checkpoints"),
    ("train", "log_every"),
    ("fsdp", "checkpoint"),  # either format resumes a run written in the other
}
# What every checkpoint ``Trainer.state_dict`` writes holds.
REQUIRED_KEYS = ("model", "optimizer", "step", "torch_rng", "config")
LOCK = ".lock"
LOCK_WAIT_S = 5.0  # a restarted run may start while its predecessor is still exiting


# -- identity -----------------------------------------------------------------------------------------
def normalised(data: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration as this version writes it (validated, then dumped without the keys that do not
    apply, so an older ``config.yaml`` that lists them compares equal); as saved if it no longer validates
    (then it differs from any valid one, and the differences name the keys)."""
    try:
        return validate(data).applicable_dict()
    except ConfigError:
        return data


def resumable_differences(cfg: Config) -> set[tuple[str, ...]]:
    """``RESUMABLE_DIFFERENCES``, plus ``train.accumulation_steps`` where the trajectory does not depend
    on it: every method, unless BatchNorm normalises per micro-step (``bn_mode`` local or sync)."""
    invariant = not cfg.model.has_batchnorm or cfg.model.bn_mode == "ghost"
    return RESUMABLE_DIFFERENCES | ({("train", "accumulation_steps")} if invariant else set())


def config_differences(saved: dict, current: dict, allowed: set[tuple[str, ...]], prefix: tuple = ()) -> list[str]:
    """``key: saved -> current`` for every key outside ``allowed`` that differs."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        path = prefix + (key,)
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, allowed, path)
        elif a != b and path not in allowed:
            diffs.append(f"{'.'.join(path)}: {a!r} -> {b!r}")
    return diffs


def run_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """How a saved configuration differs from ``cfg`` as a run (both normalised alike)."""
    return config_differences(normalised(saved), cfg.applicable_dict(), resumable_differences(cfg))


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse (exit 2) a run directory whose ``config.yaml`` holds a different run, or cannot be read."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.exists():
        return
    try:  # bounded and strict, like every user YAML (safe_yaml)
        saved = safe_yaml.load(safe_yaml.read_text(saved_path, "config.yaml"), "config.yaml")
    except (ConfigError, yaml.YAMLError) as exc:
        saved = exc
    if not isinstance(saved, dict):
        raise ConfigError(
            f"--run-dir {run_dir}: its config.yaml is not a YAML mapping ({saved!r:.80}); delete it to let the "
            "checkpoints' own configurations decide, or use a new --run-dir"
        )
    diffs = run_differences(saved, cfg)
    if diffs:
        raise ConfigError(
            f"--run-dir {run_dir}: holds a run with a different configuration ({'; '.join(diffs[:3])}); "
            "use a new --run-dir, or the same settings to resume"
        )


def checkpoint_problem(state: dict[str, Any], cfg: Config, model_state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot be resumed by the run ``cfg`` whose model's ``state_dict`` is ``model_state``
    (None: it can): a missing key, another run's configuration, another model's tensors, non-finite weights."""
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        return f"lacks {', '.join(missing)} (not a complete ssgd-dist checkpoint)"
    try:
        saved = json.loads(state["config"])
    except (TypeError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        return "holds a configuration that cannot be read"
    diffs = run_differences(saved, cfg)
    if diffs:
        return f"belongs to another run ({'; '.join(diffs[:3])})"
    step = state["step"]
    if isinstance(step, torch.Tensor):
        step = step.item() if step.numel() == 1 else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"holds an invalid step ({state['step']!r:.40})"
    model = state["model"]
    if not isinstance(model, dict):
        return "holds no model state dict"
    for name in sorted(set(model) | set(model_state)):
        if name not in model or name not in model_state:
            where = "lacks" if name not in model else "has an unknown tensor"
            return f"holds another model ({where} {name})"
        ours, theirs = model_state[name], model[name]
        if not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) != tuple(ours.shape):
            shape = list(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            return f"holds another model ({name}: {shape}, this run's model: {list(ours.shape)})"
        if theirs.is_floating_point() and not bool(torch.isfinite(theirs).all()):
            return f"holds non-finite weights ({name})"
    return None


# -- lock ---------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``; ``acquire`` returns None once held, else why not.

    If this start created the run directory and it still holds nothing but the lock file at
    ``release``, both are removed: a run refused before writing anything leaves no trace.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []  # directories this start made, deepest first

    def acquire(self, wait_s: float = LOCK_WAIT_S) -> str | None:
        deadline = time.monotonic() + wait_s
        missing = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
        if self.run_dir.exists() and not self.run_dir.is_dir():
            return f"--run-dir {self.run_dir}: is an existing file, not a directory; pass a directory (new or a run's)"
        while True:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a parent that is a file, no permission, a read-only file system
                return (
                    f"--run-dir {self.run_dir}: cannot create it ({exc.strerror or exc}); "
                    "pass a directory that can be created (its parents must be directories you can write)"
                )
            self.created = [d for d in missing if d.exists()]
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return self._refusal()
                time.sleep(0.1)
                continue
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks
                os.close(fd)
                print(
                    f"ssgd-dist: warning: cannot lock {self.path} ({exc}); nothing stops a second run from "
                    "using this run directory at the same time",
                    file=sys.stderr,
                    flush=True,
                )
                return None
            if self._is_current(fd):
                break
            os.close(fd)  # locked a file that a previous holder removed on release: lock the new one
        self.fd = fd
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%FT%T%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        remove_stale_temporaries(self.run_dir, self.run_dir / "checkpoints")  # the holder is the only writer
        return None

    def _is_current(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _refusal(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            holder = f" (pid {info['pid']} on {info['host']}, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            holder = ""
        return (
            f"--run-dir {self.run_dir}: another run is using it{holder}; wait for it to finish or stop it, "
            "or use another --run-dir"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.created and [e.name for e in self.run_dir.iterdir()] == [LOCK]:
                self.path.unlink()  # still locked: a run waiting on this file retries on the new one
                for folder in self.created:
                    folder.rmdir()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None
