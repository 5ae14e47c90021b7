"""Fixtures for the Kubernetes manifest tests: rendered overlays and the CRD directory."""

import sys
from pathlib import Path

import pytest

# The helpers live beside the tests; make them importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))

import k8s_checks  # noqa: E402

from tests.conftest import INSTALL, require  # noqa: E402


@pytest.fixture(scope="session")
def rendered():
    """overlay name -> list of objects, rendered once per session."""
    kubectl = require(tool="kubectl", install=INSTALL["kubectl"])
    return {name: k8s_checks.render(name, kubectl) for name in k8s_checks.OVERLAYS}


@pytest.fixture(scope="session")
def crds():
    """The CRD schemas: vendored in tests/k8s/crds (SSGD_K8S_CRDS overrides), so these tests never skip."""
    require(module="jsonschema", install=INSTALL["k8s"])  # crd_errors validates with it
    directory = k8s_checks.crd_dir()
    if not any(directory.glob("*.yaml")):
        pytest.fail(f"no CRD schemas (*.yaml) in {directory}: unset SSGD_K8S_CRDS to use the vendored tests/k8s/crds")
    return directory
