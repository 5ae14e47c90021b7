"""Files that survive kills and full disks: every rewrite is a temporary file, fsynced, then renamed.

A kill at any moment leaves the old file or the new one, never a mix and never an empty file. What a
kill leaves behind is a temporary ``.NAME.tmp<pid>`` beside the file, which the holder of the run
directory's lock deletes at start (``remove_stale_temporaries``). A write that runs out of space
removes its temporary file and raises ``DiskFullError`` (one line: where, how much is needed, how
much is free), leaving the file it was replacing as it was.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import DiskFullError

# ``.NAME.tmp<pid>``: what ``temporary_path`` makes, and nothing else.
_TEMPORARY = re.compile(r"^\..+\.tmp\d+$")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def temporary_path(path: Path) -> Path:
    """Where ``path``'s replacement is written first (one per process, so writers never share one)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse directory fsync)."""
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


def atomic_write(path: Path, write: Callable[[BinaryIO], object], needed: int | None = None) -> None:
    """Replace ``path`` with what ``write(file)`` writes: temporary file, fsync, rename, fsync of the folder.

    ``needed``: the bytes this write takes, for the message if the disk is full.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a kill signal too: the temporary file goes, the old file stays
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise_if_disk_full(exc, path, needed)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), len(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` atomically (a reader or a kill never sees half a copy)."""

    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)

    atomic_write(dst, copy, Path(src).stat().st_size)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, is ENOSPC or EDQUOT (torch.save wraps the
    OSError of a failed write in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def raise_if_disk_full(exc: BaseException, path: Path, needed: int | None) -> None:
    """Raise ``DiskFullError`` (from ``exc``) if ``exc`` means the disk holding ``path`` is full."""
    if not is_disk_full(exc):
        return
    folder = Path(path).parent
    try:
        free = _size(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    need = f"about {_size(needed)}" if needed else "more space"
    raise DiskFullError(
        f"no space left on the device of {folder} while writing {Path(path).name}: it needs {need}, "
        f"{free} free; free space there and run the same command again (it resumes from the last checkpoint)"
    ) from exc


def remove_stale_temporaries(*folders: Path) -> list[Path]:
    """Delete the ``.NAME.tmp<pid>`` files a killed writer left in ``folders``; returns them.

    Only the holder of the run directory's lock calls this: it is the only writer, so every temporary
    file it did not make itself is stale.
    """
    removed = []
    for folder in folders:
        try:
            entries = list(Path(folder).iterdir())
        except OSError:
            continue
        for entry in entries:
            if _TEMPORARY.match(entry.name) and entry.is_file():
                try:
                    entry.unlink()
                    removed.append(entry)
                except OSError:
                    pass
    return removed
