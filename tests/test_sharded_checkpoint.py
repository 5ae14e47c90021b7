"""Sharded checkpoint directories (``step-N.dcp/``): written whole or not at all, checked, pruned, and read
without running pickled code. One process (DCP without a process group); the FSDP runs that write and
resume them on 4 and 2 ranks are in tests/test_fsdp.py.
"""

from __future__ import annotations

import errno
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from ssgd_dist.backends.dcp import load_tensors, save_tensors
from ssgd_dist.checkpoint import (
    MANIFEST,
    find_latest,
    prepare_staging,
    publish_sharded,
    read_manifest,
    read_sharded_meta,
)
from ssgd_dist.errors import DiskFullError
from tests.test_reliability import Payload

pytestmark = pytest.mark.filterwarnings("ignore:.*(process group|torch.distributed).*:UserWarning")


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
    write(tmp_path, 6)
    assert not staging.exists()


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
