"""The multinode fixture: one cluster (bridge, namespaces, Ray nodes, MLflow server) per module."""

from __future__ import annotations

import pytest

from tests.multinode.harness import Cluster, can_build


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = can_build()
    if why:
        pytest.skip(why)
    with Cluster(tmp_path_factory.mktemp("cluster")) as built:
        yield built
