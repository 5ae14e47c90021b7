"""The README's torchrun, DeepSpeed, FSDP2 and "Reports and sharpness" examples, read from the README and run as
written, in order, in one fresh directory, each with a tiny-step suffix.

The rule that decides what runs (README, "torchrun"): a ``# needs several nodes``, ``# needs GPUs`` or
``# needs docker`` line marks the rest of its code block as what one CPU machine cannot run; every other
command of those sections runs. The suffix appended to each command, by kind:

- ``... train ...`` (any launcher): ``--set train.max_steps=2 --set train.progress=false``
- ``ssgd-dist flatness``: ``FLATNESS_SUFFIX`` (a handful of loss evaluations instead of about a thousand)
- ``ssgd-dist report``: nothing

A command of another kind fails the test: a new example must be given a suffix here, not skipped silently.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

SECTIONS = ("### torchrun (one node or many)", "### DeepSpeed", "### Sharded: FSDP2", "## Reports and sharpness")
NEEDS = re.compile(r"^# needs (several nodes|GPUs|docker)\b")
TRAIN_SUFFIX = " --set train.max_steps=2 --set train.progress=false"
FLATNESS_SUFFIX = " --samples 200 --draws 1 --power-iters 2 --hutchinson 2 --landscape-1d 3 --landscape-2d 2"


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level (outside code)."""
    level = len(heading.split()[0])
    lines = text.splitlines()
    start = lines.index(heading) + 1
    fenced = False
    for end in range(start, len(lines)):
        fenced ^= lines[end].startswith("```")
        hashes = len(lines[end]) - len(lines[end].lstrip("#"))
        if not fenced and 0 < hashes <= level and lines[end][hashes : hashes + 1] == " ":
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def commands(text: str) -> tuple[list[str], list[str]]:
    """The commands of the ```bash blocks in ``text``, continuation lines joined: (to run, marked)."""
    run, marked = [], []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        needs = False
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = line.strip()
            needs = needs or bool(NEEDS.match(line))
            if line and not line.startswith("#"):
                (marked if needs else run).append(line)
    return run, marked


def with_suffix(command: str) -> str:
    if re.search(r"(^|\s)train(\s|$)", command):
        return command + TRAIN_SUFFIX
    if command.startswith("ssgd-dist flatness"):
        return command + FLATNESS_SUFFIX
    if command.startswith("ssgd-dist report"):
        return command
    pytest.fail(f"README example of no known kind (give it a suffix in tests/test_readme.py): {command}")


@pytest.mark.deepspeed
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_readme_launch_and_report_examples_run_in_order_in_a_fresh_directory(tmp_path):
    readme = (REPO / "README.md").read_text()
    run, marked = [], []
    for heading in SECTIONS:
        section_run, section_marked = commands(section(readme, heading))
        run += section_run
        marked += section_marked
    assert len(run) >= 6 and any(c.startswith("deepspeed ") for c in marked), (run, marked)
    bin_dir = str(Path(sys.executable).parent)  # torchrun and ssgd-dist of this environment
    # torchrun's default rendezvous port (29500) may be taken by another job on this machine.
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PET_MASTER_PORT": str(free_port())}
    for command in run:
        full = with_suffix(command)
        # A command that hangs fails here, named, before the test's own timeout.
        result = subprocess.run(
            ["bash", "-c", full], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=250
        )
        assert result.returncode == 0, f"{full}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    runs = tmp_path / "runs"
    for name in ("torchrun", "ds-zero0", "ds-zero2-bf16", "fsdp"):
        assert (runs / name / "checkpoints" / "last.pt").is_file(), name
    assert (runs / "report" / "report.md").is_file()
    assert (runs / "torchrun" / "flatness" / "flatness.json").is_file()
    assert "λ_max" in (runs / "torchrun" / "report" / "report.md").read_text()
