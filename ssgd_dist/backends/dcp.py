"""Sharded checkpoint directories (``torch.distributed.checkpoint``) read without running pickled code.

DCP's own reader unpickles a directory's ``.metadata`` with plain ``pickle`` and loads non-tensor
values with ``torch.load(weights_only=False)``, so a hostile directory in a run directory would run
code on resume. Here the metadata is unpickled with an allowlist (DCP's own metadata classes, torch's
sizes, dtypes and layouts, paths), and only tensors are written and read: the small non-tensor rest
of a checkpoint goes into a plain file beside them (``checkpoint.publish_sharded``), read with
``weights_only=True``. That is the guarantee ``checkpoint.load_checkpoint_file`` gives the plain files.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

from ..checkpoint import read_sharded_meta
from ..files import raise_if_disk_full

_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _ALLOWED
            or (module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata cannot name anything but DCP's own metadata types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise ValueError(f".metadata holds a {type(metadata).__name__}, not a checkpoint's metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """Loads tensors only: a checkpoint's non-tensor value would be unpickled, so none is read."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise ValueError(f"{read_item.dest_index.fqn} is not a tensor: a sharded checkpoint holds only tensors")


class ShardedCheckpointError(RuntimeError):
    """A sharded read or write failed on some rank (raised on every rank, which DCP already agrees on)."""


@contextlib.contextmanager
def _failures_as_errors(what: str, path: Path):
    """DCP reports a failure on any rank to every rank as a ``CheckpointException``, a ``BaseException``
    that ``except Exception`` would let through: it becomes an ordinary error naming the first cause
    (``DiskFullError`` for a full disk, exit 4 like any other write)."""
    try:
        with warnings.catch_warnings():  # one process (flatness, your own code) is meant, not an oversight
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except CheckpointException as exc:
        rank, (cause, _) = min(exc.failures.items())
        raise_if_disk_full(cause, path / "shards", None)
        raise ShardedCheckpointError(f"{what} {path} failed on rank {rank}: {type(cause).__name__}: {cause}") from cause


def save_tensors(state: dict[str, Any], path: Path) -> None:
    """Every rank writes its shards of ``state`` (nested dicts of tensors) into ``path``; a collective."""
    with _failures_as_errors("writing", Path(path)):
        metadata = dcp.save(state, storage_writer=FileSystemWriter(path, sync_files=True))
    # Every rank gets the global metadata; if it cannot see every rank's file, the ranks do not share the
    # directory (local disks on several nodes) and rank 0 would publish an incomplete checkpoint.
    missing = sorted({info.relative_path for info in metadata.storage_data.values()} - set(os.listdir(path)))
    anywhere = torch.tensor([float(len(missing))])
    if dist.is_initialized():
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)  # every rank fails together, rank 0 before publishing
    if anywhere.item():
        where = f"lacks {', '.join(missing)} here" if missing else "lacks files on another rank"
        raise ShardedCheckpointError(
            f"{path} {where}: the ranks do not share the run directory, which sharded checkpoints need; use a "
            "shared --run-dir (or storage), or fsdp.checkpoint=full"
        )


def load_tensors(state: dict[str, Any], path: Path) -> None:
    """Fill ``state``'s tensors in place from ``path``, resharded to this run's layout; a collective.

    Every key of ``state`` must be in the checkpoint. A failure on any rank raises on every rank.
    """
    with _failures_as_errors("reading", Path(path)):
        dcp.load(state, storage_reader=SafeReader(path), planner=TensorsOnlyPlanner())


def read_whole_model(path: Path, like: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A sharded checkpoint's plain part and its model as whole tensors in this process (``flatness``, or
    your own code): DCP reshards to any layout, also to none. ``like`` (the model's ``state_dict``) gives
    the names, shapes and dtypes."""
    model = {name: torch.empty_like(t) for name, t in like.items()}
    load_tensors({"model": model}, path)
    return {**read_sharded_meta(path), "model": model}
