"""Fixtures for the Kubernetes manifest tests: rendered overlays and the CRD directory."""

import shutil
import sys
from pathlib import Path

import pytest

# The helpers live beside the tests; make them importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))

import k8s_checks  # noqa: E402


@pytest.fixture(scope="session")
def rendered():
    """overlay name -> list of objects, rendered once per session."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: cannot render the kustomize overlays")
    return {name: k8s_checks.render(name) for name in k8s_checks.OVERLAYS}


@pytest.fixture(scope="session")
def crds():
    directory = k8s_checks.crd_dir()
    if not any(directory.glob("*.yaml")):
        pytest.skip(f"no CRD schemas in {directory} (set SSGD_K8S_CRDS to the k8s-crds directory)")
    return directory
