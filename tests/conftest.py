"""Shared fixtures: real Dask clusters (worker processes), started once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from distributed import Client

from flgraph.cluster import embedded, embedded_client


def _embedded_client(workers: int) -> Iterator[Client]:
    cluster = embedded(workers)
    client = embedded_client(cluster)  # in-process, as a Run with no cluster given makes it
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="session")
def client2() -> Iterator[Client]:
    """A client of an embedded LocalCluster with 2 single-threaded worker processes."""
    yield from _embedded_client(2)


@pytest.fixture(scope="session")
def client1() -> Iterator[Client]:
    """A client of an embedded LocalCluster with 1 worker process."""
    yield from _embedded_client(1)


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """CURVE key pairs for edge tests: ``gateway``, ``agent-0`` .. ``agent-5`` (on the allow-list ``allow/``)
    and ``rogue`` (not on it)."""
    from flgraph.transports.zmq import make_keypair

    d = tmp_path_factory.mktemp("keys")
    allow = d / "allow"
    allow.mkdir()
    make_keypair(d, "gateway")
    for i in range(6):
        public, _ = make_keypair(d, f"agent-{i}")
        (allow / public.name).write_bytes(public.read_bytes())
    make_keypair(d, "rogue")
    return d
