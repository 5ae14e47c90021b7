"""Per-step metrics: ``metrics.jsonl`` always, TensorBoard events when tensorboard is installed.

Records arrive a window at a time (``train.log_every`` steps): the window is one write and flush of the
file and one TensorBoard event per step (not one per scalar), so that logging stays a small share of
a small model's step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import atomic_write_text, raise_if_disk_full


class MetricsWriter:
    """Append-only JSONL, one object per step; on resume, lines past the checkpoint are dropped first
    (the file is replaced atomically: a kill at that moment leaves the old file or the new one)."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
            self._summary = Summary
        except ImportError:  # an install without tensorboard still writes metrics.jsonl
            pass

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text()
        kept = "".join(line + "\n" for line in text.splitlines() if (s := _step(line)) is not None and s <= step)
        if kept != text:
            atomic_write_text(self.path, kept)

    def write(self, records: list[dict[str, Any]]) -> None:
        """A window of records: in the file (flushed) when this returns, then in TensorBoard."""
        text = "".join(json.dumps(record) + "\n" for record in records)
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as exc:
            raise_if_disk_full(exc, self.path, len(text))
            raise
        if self._tb is not None:
            for record in records:
                values = [
                    self._summary.Value(tag=key, simple_value=value)
                    for key, value in scalars(record).items()
                    if key != "step"
                ]
                self._tb.file_writer.add_summary(self._summary(value=values), record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def scalars(record: dict[str, Any]) -> dict[str, int | float]:
    """The numeric entries of a record (what TensorBoard and Ray's metrics take; a bool is not one)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _step(line: str) -> int | None:
    """The step of a metrics line; None for a blank or half-written one (a crash mid-write)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``. A half-written last line (a crash mid-write; training drops it on
    resume) is left out; an unreadable line before it raises ``ConfigError`` naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); move the run directory aside or delete the file") from None
    records = []
    for i, (n, line) in enumerate(lines):
        if _step(line) is None:
            if i == len(lines) - 1:
                break  # half-written last line
            raise ConfigError(
                f"{path}: line {n} is not a metrics record ({line[:40]!r}); the file is damaged: "
                "move the run directory aside or delete the file"
            )
        records.append(json.loads(line))
    return records
