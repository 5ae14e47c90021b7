"""Checkpoints that survive crashes: atomic writes, checksums, safe loading, fallback to older ones.

Layout under ``RUN_DIR/checkpoints``: ``step-00000123.pt`` files (the newest ``num_to_keep``),
``last.pt`` (a hard link to the newest, or a copy where links are not supported) and
``manifest.json`` with each file's SHA-256. A checkpoint is a plain dict of tensors and numbers, so
``torch.load(..., weights_only=True)`` reads it and nothing in it can execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(ckpt_dir: Path) -> dict[str, str]:
    try:
        return json.loads((ckpt_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _step_of(path: Path) -> int:
    return int(path.stem.removeprefix("step-"))


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, num_to_keep: int = 2) -> Path:
    """Write ``step-N.pt`` atomically, point ``last.pt`` at it, record checksums, prune old ones."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    _atomic_torch_save(state, path)
    digest = sha256_of(path)

    tmp_last = ckpt_dir / f".{LAST}.tmp{os.getpid()}"
    tmp_last.unlink(missing_ok=True)
    try:
        os.link(path, tmp_last)
    except OSError:
        shutil.copyfile(path, tmp_last)
    os.replace(tmp_last, ckpt_dir / LAST)

    # Files past this step belong to a timeline abandoned after a fallback: they go first.
    for stale in ckpt_dir.glob("step-*.pt"):
        if _step_of(stale) > step:
            stale.unlink(missing_ok=True)
    steps = sorted(ckpt_dir.glob("step-*.pt"), key=_step_of)
    for old in steps[: max(0, len(steps) - max(1, num_to_keep))]:
        old.unlink(missing_ok=True)
    manifest = {name: d for name, d in _read_manifest(ckpt_dir).items() if (ckpt_dir / name).exists()}
    manifest[path.name] = digest
    manifest[LAST] = digest
    atomic_write_bytes(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return path


def load_checkpoint_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint carrying pickled code is refused, never run."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that matches its checksum and loads; corrupt ones are reported and skipped."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    manifest = _read_manifest(ckpt_dir)
    # Newest step file first: a crash between writing it and relinking last.pt loses nothing.
    candidates = sorted(ckpt_dir.glob("step-*.pt"), key=_step_of, reverse=True)
    if (ckpt_dir / LAST).exists():
        candidates.append(ckpt_dir / LAST)
    for path in candidates:
        expected = manifest.get(path.name)
        if expected is not None and sha256_of(path) != expected:
            print(
                f"ssgd-dist: checkpoint {path} fails its checksum (truncated or corrupted); trying an older one",
                file=sys.stderr,
            )
            continue
        try:
            return load_checkpoint_file(path, map_location), path
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: fall back to an older one
            print(
                f"ssgd-dist: checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc}); trying an older one",
                file=sys.stderr,
            )
    return None
