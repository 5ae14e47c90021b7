"""Checkpoints that survive crashes: atomic writes, checksums, safe loading, fallback to older ones.

Layout under ``RUN_DIR/checkpoints``: ``step-00000123.pt`` files (the newest ``num_to_keep``),
``last.pt`` (a hard link to the newest plain file, or a copy where links are not supported) and
``manifest.json`` with each checkpoint's SHA-256. A checkpoint is a plain dict of tensors and numbers, so
``torch.load(..., weights_only=True)`` reads it and nothing in it can execute code.

A sharded checkpoint is a directory ``step-00000123.dcp/``: every rank's shards
(``torch.distributed.checkpoint``, written by the backend) and ``meta.pt``, the plain rest (step,
configuration, random state). It is written as ``step-N.dcp.partial/`` and renamed once complete; its
manifest entry is the SHA-256 of its files' names and checksums. It never becomes ``last.pt``.

Finding the checkpoint to resume from never crashes on what it finds: a damaged manifest is ignored
(every file is then checked by loading it), and a candidate that fails its checksum, does not load,
has a name that does not parse, or that the caller's ``accept`` turns down (another run's
configuration, another model's shapes, a missing key) is reported and skipped for the next older one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import atomic_copy, atomic_write, atomic_write_bytes, fsync_dir, temporary_path

LAST = "last.pt"
MANIFEST = "manifest.json"
META = "meta.pt"  # a sharded checkpoint's plain part
SHARDED = ".dcp"
PARTIAL = ".partial"  # a sharded checkpoint still being written
_STEP_FILE = re.compile(r"^step-(\d+)\.(pt|dcp)$")

# Why a loaded checkpoint cannot be resumed (None: it can). Called with the loaded dict.
Accept = Callable[[dict[str, Any]], "str | None"]
# Loads a sharded checkpoint directory into the running model (a collective); returns it as a checkpoint dict.
ReadSharded = Callable[[Path], dict[str, Any]]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_nbytes(obj: Any) -> int:
    """About the bytes ``torch.save(obj)`` writes: its tensors' storage (what a full disk needs to know)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return len(obj) if isinstance(obj, (str, bytes)) else 8


def tree_sha256(path: Path) -> str:
    """One checksum for a directory: of its files' relative names and SHA-256s (a file added, removed,
    renamed or changed changes it)."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path).as_posix()}\0{sha256_of(file)}\n".encode())
    return h.hexdigest()


def checksum_of(path: Path) -> str:
    return tree_sha256(path) if Path(path).is_dir() else sha256_of(path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), needed=state_nbytes(obj) + (1 << 16))


def read_manifest(ckpt_dir: Path) -> tuple[dict[str, str], str | None]:
    """(file name -> SHA-256, what is wrong with the manifest or None). A missing manifest is not wrong."""
    try:
        data = json.loads((ckpt_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:
        return {}, f"cannot be read ({type(exc).__name__}: {exc})"
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return {}, "is not an object of file names to checksums"
    return data, None


def step_of(path: Path) -> int | None:
    """The step of a ``step-N.pt`` file or ``step-N.dcp`` directory; None for any other name."""
    match = _STEP_FILE.match(Path(path).name)
    return int(match.group(1)) if match else None


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, num_to_keep: int = 2) -> Path:
    """Write ``step-N.pt`` atomically, point ``last.pt`` at it, record checksums, prune old ones.

    A full disk raises ``DiskFullError`` and leaves the previous checkpoints as they were.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    _atomic_torch_save(state, path)
    digest = sha256_of(path)

    tmp_last = temporary_path(ckpt_dir / LAST)
    tmp_last.unlink(missing_ok=True)
    try:
        os.link(path, tmp_last)
    except OSError:
        atomic_copy(path, ckpt_dir / LAST)
    else:
        os.replace(tmp_last, ckpt_dir / LAST)
        fsync_dir(ckpt_dir)
    _record(ckpt_dir, path, digest, num_to_keep, {LAST: digest})
    return path


def staging_path(run_dir: Path, step: int) -> Path:
    """Where every rank writes its shards of step ``step``'s sharded checkpoint before it is published."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}{SHARDED}{PARTIAL}"


def prepare_staging(run_dir: Path, step: int) -> Path:
    """An empty staging directory for step ``step`` (what a killed run left there is removed); rank 0 only."""
    staging = staging_path(run_dir, step)
    staging.parent.mkdir(parents=True, exist_ok=True)
    _remove_partials(staging.parent)
    staging.mkdir()
    return staging


def _remove_partials(ckpt_dir: Path) -> None:
    """Delete what killed sharded saves left (only rank 0 writes here, and not while this runs)."""
    for stale in ckpt_dir.glob(f"step-*{SHARDED}{PARTIAL}"):
        _remove(stale)


def publish_sharded(staging: Path, meta: dict[str, Any], num_to_keep: int = 2) -> Path:
    """Complete a sharded checkpoint every rank has written into ``staging``: ``meta.pt`` beside the shards,
    then one rename to ``step-N.dcp``, its checksum in the manifest, old ones pruned; rank 0 only.

    A kill before the rename leaves a ``.partial`` directory that nothing reads and the next save removes.
    """
    _atomic_torch_save(meta, staging / META)  # fsynced, as DCP's own files are (sync_files=True)
    fsync_dir(staging)  # and their directory entries
    digest = tree_sha256(staging)
    path = staging.with_name(staging.name.removesuffix(PARTIAL))
    _remove(path)  # a step written again after a fallback
    os.replace(staging, path)
    fsync_dir(path.parent)
    _record(path.parent, path, digest, num_to_keep)
    return path


def read_sharded_meta(path: Path) -> dict[str, Any]:
    """A sharded checkpoint's plain part (``weights_only``)."""
    meta = load_checkpoint_file(Path(path) / META)
    if not isinstance(meta, dict):
        raise ValueError(f"{META} holds a {type(meta).__name__}, not a checkpoint's dict")
    return meta


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _record(ckpt_dir: Path, path: Path, digest: str, num_to_keep: int, extra: dict[str, str] | None = None) -> None:
    """Prune checkpoints past ``path``'s step and beyond the newest ``num_to_keep``, then write the manifest."""
    step = step_of(path)
    # Checkpoints past this step belong to a timeline abandoned after a fallback: they go first. Names that
    # are not ``step-N.pt``/``step-N.dcp`` are not ours: they stay.
    steps = sorted((p for p in ckpt_dir.glob("step-*") if step_of(p) is not None), key=step_of)
    for stale in [p for p in steps if step_of(p) > step]:
        _remove(stale)
    steps = [p for p in steps if step_of(p) <= step]
    for old in steps[: max(0, len(steps) - max(1, num_to_keep))]:
        _remove(old)
    _remove_partials(ckpt_dir)  # also after a switch from sharded to plain checkpoints
    manifest = {name: d for name, d in read_manifest(ckpt_dir)[0].items() if (ckpt_dir / name).exists()}
    manifest[path.name] = digest
    manifest.update(extra or {})
    atomic_write_bytes(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def load_checkpoint_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint carrying pickled code is refused, never run."""
    return torch.load(path, map_location=map_location, weights_only=True)


@dataclass
class Found:
    """What ``find_latest`` found: the newest usable checkpoint (or None) and every candidate it skipped."""

    state: dict[str, Any] | None = None
    path: Path | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _report(path: Path, reason: str) -> None:
    print(f"ssgd-dist: checkpoint {path} {reason}; trying an older one", file=sys.stderr, flush=True)


def try_candidate(
    path: Path,
    expected_sha: str | None,
    map_location: str | torch.device,
    accept: Accept | None,
    read_sharded: ReadSharded | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """(the loaded checkpoint, None) if ``path`` is usable, else (None, why not).

    A sharded directory is read by ``read_sharded``; without one it is refused, never unpickled.
    """
    sharded = Path(path).suffix == SHARDED
    if sharded and read_sharded is None:
        return None, "is a sharded checkpoint (torch.distributed.checkpoint), which only backend=fsdp reads"
    if sharded and not Path(path).is_dir():
        return None, "is not a directory (a sharded checkpoint is one)"
    try:
        if expected_sha is not None and checksum_of(path) != expected_sha:
            return None, "fails its checksum (truncated or corrupted)"
    except OSError as exc:
        return None, f"cannot be read ({type(exc).__name__}: {exc})"
    try:
        state = read_sharded(path) if sharded else load_checkpoint_file(path, map_location)
    except Exception as exc:  # noqa: BLE001 - any unreadable file means: fall back to an older one
        return None, f"cannot be loaded ({type(exc).__name__}: {exc})".replace("\n", " ")
    if not isinstance(state, dict):
        return None, f"cannot be loaded (it holds a {type(state).__name__}, not a checkpoint's dict)"
    reason = accept(state) if accept is not None else None
    return (None, reason) if reason else (state, None)


def find_latest(
    run_dir: Path,
    map_location: str | torch.device = "cpu",
    accept: Accept | None = None,
    read_sharded: ReadSharded | None = None,
) -> Found:
    """The newest checkpoint that matches its checksum, loads and that ``accept`` takes; each one skipped on
    the way is reported on stderr and listed in ``Found.skipped``. Every rank that calls it with a
    ``read_sharded`` decides alike (same files, same order), as the collective reads need."""
    found = Found()
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return found
    manifest, problem = read_manifest(ckpt_dir)
    if problem:
        print(
            f"ssgd-dist: {ckpt_dir / MANIFEST} {problem}; every checkpoint is checked by loading it instead",
            file=sys.stderr,
            flush=True,
        )

    def skip(path: Path, reason: str) -> None:
        _report(path, reason)
        found.skipped.append((path, reason))

    files = sorted([*ckpt_dir.glob("step-*.pt"), *ckpt_dir.glob(f"step-*{SHARDED}")])
    for stray in [p for p in files if step_of(p) is None]:
        skip(stray, "has a name that is not step-<number>.pt or .dcp (not written by ssgd-dist)")
    # Newest step file first: a crash between writing it and relinking last.pt loses nothing.
    candidates = sorted((p for p in files if step_of(p) is not None), key=step_of, reverse=True)
    last = ckpt_dir / LAST
    if last.is_file() and not any(_same_file(last, p) for p in candidates):
        candidates.append(last)  # a link to a step file already tried would only repeat it
    for path in candidates:
        state, reason = try_candidate(path, manifest.get(path.name), map_location, accept, read_sharded)
        if state is not None:
            found.state, found.path = state, path
            return found
        skip(path, reason)
    return found


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_latest(
    run_dir: Path,
    map_location: str | torch.device = "cpu",
    accept: Accept | None = None,
    read_sharded: ReadSharded | None = None,
) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint and its path (``find_latest``), or None."""
    found = find_latest(run_dir, map_location, accept, read_sharded)
    return (found.state, found.path) if found.state is not None else None
