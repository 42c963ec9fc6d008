"""Shared fixtures: real Dask clusters (worker processes), started once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from distributed import Client

from flgraph.cluster import embedded


@pytest.fixture(scope="session")
def client2() -> Iterator[Client]:
    """A client of an embedded LocalCluster with 2 single-threaded worker processes."""
    cluster = embedded(2)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="session")
def client1() -> Iterator[Client]:
    """A client of an embedded LocalCluster with 1 worker process."""
    cluster = embedded(1)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()
