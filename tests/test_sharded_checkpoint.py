"""Sharded checkpoint directories (``step-N.dcp/``): written whole or not at all, checked, pruned, and read
without running pickled code. One process (DCP without a process group); the FSDP runs that write and
resume them on 4 and 2 ranks are in tests/test_fsdp.py.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from ssgd_dist.backends.dcp import ShardedCheckpointError, load_tensors, save_tensors
from ssgd_dist.checkpoint import (
    MANIFEST,
    find_latest,
    prepare_staging,
    publish_sharded,
    read_manifest,
    read_sharded_meta,
    save_checkpoint,
)
from ssgd_dist.errors import DiskFullError
from tests.conftest import free_port
from tests.dist_workers import leave_group
from tests.test_reliability import Payload


def write(run_dir: Path, step: int, keep: int = 2) -> Path:
    """A sharded checkpoint of step ``step``: one tensor holding the step, and a plain part."""
    staging = prepare_staging(run_dir, step)
    save_tensors({"model": {"w": torch.full((3, 2), float(step))}}, staging)
    return publish_sharded(staging, {"step": step}, keep)


def read(path: Path) -> dict:
    tensors = {"model": {"w": torch.zeros(3, 2)}}
    load_tensors(tensors, path)
    return {**read_sharded_meta(path), **tensors}


def test_the_newest_complete_directory_is_read_and_old_ones_are_pruned(tmp_path):
    for step in (2, 4, 6):
        write(tmp_path, step)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [MANIFEST, "step-00000004.dcp", "step-00000006.dcp"]
    assert set(read_manifest(ckpts)[0]) == {"step-00000004.dcp", "step-00000006.dcp"}
    found = find_latest(tmp_path, read_sharded=read)
    assert found.path.name == "step-00000006.dcp" and found.state["step"] == 6
    assert torch.equal(found.state["model"]["w"], torch.full((3, 2), 6.0))


def test_a_directory_left_half_written_by_a_kill_is_never_read_and_is_removed_by_the_next_save(tmp_path):
    write(tmp_path, 2)
    staging = prepare_staging(tmp_path, 4)
    save_tensors({"model": {"w": torch.full((3, 2), 4.0)}}, staging)  # killed before publishing
    found = find_latest(tmp_path, read_sharded=read)
    assert found.state["step"] == 2 and not found.skipped
    (staging.parent / "step-00000006.dcp.partial").write_text("x")  # even a file where the staging goes
    write(tmp_path, 6)
    assert not staging.exists() and sorted(p.name for p in staging.parent.glob("*.partial")) == []
    save_checkpoint(tmp_path, {"step": 7}, 7)  # plain checkpoints (fsdp.checkpoint=full) clean up too
    staging.mkdir()
    save_checkpoint(tmp_path, {"step": 8}, 8)
    assert not staging.exists()


def test_a_file_where_a_directory_belongs_is_skipped_not_taken_for_no_checkpoint(tmp_path):
    write(tmp_path, 2)
    (tmp_path / "checkpoints" / "step-00000004.dcp").write_text("junk")
    found = find_latest(tmp_path, read_sharded=read)
    assert found.state["step"] == 2
    assert found.skipped[0][1] == "is not a directory (a sharded checkpoint is one)"


@pytest.mark.parametrize("damage", ["shard", "meta", "extra file"])
def test_a_damaged_directory_fails_its_checksum_and_the_older_one_is_used(tmp_path, damage):
    write(tmp_path, 2)
    newest = write(tmp_path, 4)
    if damage == "shard":
        shard = next(newest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:-8])
    elif damage == "meta":
        torch.save({"step": 40}, newest / "meta.pt")
    else:
        (newest / "stray").write_text("x")
    found = find_latest(tmp_path, read_sharded=read)
    assert found.state["step"] == 2
    assert [(p.name, why) for p, why in found.skipped] == [(newest.name, "fails its checksum (truncated or corrupted)")]


def test_a_backend_without_sharded_reading_skips_the_directory_and_says_why(tmp_path):
    write(tmp_path, 2)
    found = find_latest(tmp_path)
    assert found.state is None
    assert "only backend=fsdp reads" in found.skipped[0][1]


def _unchecked(run_dir: Path) -> None:
    """Forget the checksums: what an attacker who can write the run directory can do anyway."""
    (run_dir / "checkpoints" / MANIFEST).unlink()


def test_metadata_that_carries_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, 2)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    _unchecked(tmp_path)
    found = find_latest(tmp_path, read_sharded=read)
    assert found.state is None and not marker.exists()
    assert "posix.system is not part of a checkpoint's metadata" in found.skipped[0][1]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_value_that_carries_pickled_code_is_refused_without_running_it(tmp_path):
    """DCP stores a non-tensor value with ``torch.save`` and reads it with ``weights_only=False``."""
    marker = tmp_path / "pwned"
    path = write(tmp_path, 2)
    shutil.rmtree(path)
    dcp.save({"model": {"w": Payload(marker)}}, checkpoint_id=path)  # where the tensor should be
    torch.save({"step": 2}, path / "meta.pt")
    _unchecked(tmp_path)
    found = find_latest(tmp_path, read_sharded=read)
    assert found.state is None and not marker.exists()
    assert "cannot be loaded" in found.skipped[0][1]


def test_a_full_disk_while_writing_shards_is_a_disk_full_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    write(tmp_path, 2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(DiskFullError, match=r"no space left on the device of .*step-00000004\.dcp\.partial"):
        write(tmp_path, 4)
    monkeypatch.undo()
    assert find_latest(tmp_path, read_sharded=read).state["step"] == 2


def _save_into_a_directory_of_its_own(rank: int, world_size: int, port: int, base: str) -> None:
    """Each rank writes "the same" directory on a disk of its own, as nodes with local run directories do."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        save_tensors({f"rank{rank}": torch.ones(2)}, Path(base) / f"node{rank}" / "step-00000002.dcp.partial")
    except ShardedCheckpointError as exc:
        (Path(base) / f"refused{rank}").write_text(str(exc))
    finally:
        leave_group()


def test_ranks_that_do_not_share_the_directory_all_refuse_to_publish(tmp_path):
    torch.multiprocessing.spawn(_save_into_a_directory_of_its_own, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert "the ranks do not share the run directory" in (tmp_path / f"refused{rank}").read_text()
