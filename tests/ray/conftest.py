"""The Ray fixture: one real local Ray head per test session, token auth on, stopped even on failure.

Reuse elsewhere: build the same fixture from ``tests.ray_cluster.start_cluster()`` (the helper behind
this one) in your directory's conftest.py; it returns a ``RayCluster`` with ``dashboard_url``,
``gcs_address``, ``token``, ``env`` (a client environment holding the token) and ``submit()``.
(No ``__init__.py`` here on purpose: a package named ``ray`` could shadow the real one.)
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.ray_cluster import RayCluster, start_cluster


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> RayCluster:
    """A head with 2 CPUs on free ports, ``RAY_AUTH_MODE=token`` and a fresh token.

    ``ray_cluster.env`` is a client environment holding the token and ``RAY_ADDRESS``;
    ``ray_cluster.submit([...])`` runs ``ray job submit --working-dir <repo>`` and waits.
    """
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]'): the Ray tests need a real local cluster")
    logs = tmp_path_factory.mktemp("ray-head")
    cluster = start_cluster(num_cpus=2, log_dir=logs)
    try:
        yield cluster
    finally:
        cluster.stop()
