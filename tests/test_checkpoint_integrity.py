"""Checkpoint checksums catch what loading cannot: damage that still unpickles into plausible tensors."""

from __future__ import annotations

import hashlib
import json

import torch

from ssgd_dist.checkpoint import load_checkpoint_file, load_latest, save_checkpoint


def weights(step: int) -> torch.Tensor:
    return torch.arange(64, dtype=torch.float32) * 0.25 + step


def test_the_manifest_records_each_files_sha256(tmp_path):
    save_checkpoint(tmp_path, {"model": {"w": weights(1)}, "step": 1}, 1, num_to_keep=2)
    ckpt = tmp_path / "checkpoints"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digest = hashlib.sha256((ckpt / "step-00000001.pt").read_bytes()).hexdigest()
    assert manifest["step-00000001.pt"] == manifest["last.pt"] == digest


def test_a_flipped_bit_inside_a_tensor_is_caught_by_the_checksum_not_loaded(tmp_path, capsys):
    for step in (1, 2):
        save_checkpoint(tmp_path, {"model": {"w": weights(step)}, "step": step}, step, num_to_keep=2)
    newest = tmp_path / "checkpoints" / "step-00000002.pt"
    needle = weights(2).numpy().tobytes()
    data = newest.read_bytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) == -1  # the tensor's stored values, found once
    with open(newest, "r+b") as f:  # in place: last.pt, a hard link to it where links work, is damaged too
        f.seek(at + 13)
        f.write(bytes([data[at + 13] ^ 0x04]))
    # The premise: such a file still loads, with one wrong value and no error. Only the checksum can tell.
    silently = load_checkpoint_file(newest)
    assert silently["step"] == 2 and not torch.equal(silently["model"]["w"], weights(2))

    loaded, path = load_latest(tmp_path)
    assert "step-00000002.pt fails its checksum" in capsys.readouterr().err
    assert path.name != newest.name
    assert torch.equal(loaded["model"]["w"], weights(loaded["step"]))  # never the damaged values
