"""The test harness itself: a missing tool or extra is a skip that says what to install, and an error in CI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, require


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_missing_tool_or_module_is_an_error(monkeypatch, tmp_path, ci):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(pytest.fail.Exception, match=r"no-such-tool-xyz is not on PATH and CI=true.*install it: get it"):
        require(tool="no-such-tool-xyz", install="get it")
    with pytest.raises(
        pytest.fail.Exception, match=r"'no_such_module_xyz' is not installed and CI=true.*pip install x"
    ):
        require(module="no_such_module_xyz", install="pip install x")


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_elsewhere_a_missing_tool_or_module_is_a_skip_that_says_what_to_install(monkeypatch, tmp_path, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match=r"no-such-tool-xyz is not on PATH; install it .*: get it"):
        require(tool="no-such-tool-xyz", install="get it")
    with pytest.raises(pytest.skip.Exception, match=r"'no_such_module_xyz' is not installed; .*: pip install x"):
        require(module="no_such_module_xyz", install="pip install x")


def test_what_is_there_is_found(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    tool = tmp_path / "some-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert require(tool="some-tool", install="-") == str(tool)
    assert require(module="yaml", install="-") is None


def test_ci_run_of_the_k8s_tests_without_kubectl_fails_naming_kubectl(tmp_path):
    """The acceptance check: ``CI=true pytest tests/k8s`` with kubectl hidden from PATH fails, saying so.

    PATH holds only a link to this Python; one test that renders the overlays is enough to show it.
    """
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(CI="true", PATH=str(bindir))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/k8s/test_k8s_manifests.py::test_overlay_renders",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "kubectl is not on PATH and CI=true" in proc.stdout, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("4 errors") and "skipped" not in summary, proc.stdout[-3000:]
