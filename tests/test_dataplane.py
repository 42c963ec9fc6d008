"""The data plane between the driver and local workers: real ZeroMQ ipc sockets, real worker processes."""

from __future__ import annotations

import os
import stat
import time

import numpy as np
import pytest
import zmq

import flgraph as fg
from flgraph import dataplane
from flgraph import stages as st
from flgraph.dataplane import DataPlane, fetch, push

pytestmark = pytest.mark.skipif(not dataplane.available(), reason="no ipc:// sockets on this platform")


@pytest.fixture
def plane():
    p = DataPlane()
    yield p
    p.close()


def test_params_out_partials_in(plane):
    flat = np.arange(10, dtype=np.float32)
    plane.publish("p1", flat)
    got = fetch(plane.endpoint, "p1")
    assert got.dtype == np.float32 and np.array_equal(got, flat)
    assert fetch(plane.endpoint, "p1") is got  # once per process and key
    plane.expect(["c0", "c1"])
    big = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
    assert push(plane.endpoint, "c1", [((0, 5), (big, 5.0))])
    assert push(plane.endpoint, "c0", {"x": 1})
    got2: dict = {}
    end = time.monotonic() + 10
    while len(got2) < 2 and time.monotonic() < end:
        got2.update(plane.take(["c0", "c1"], timeout=1.0))
    assert got2["c0"] == {"x": 1}
    (node, (arr, w)), = got2["c1"]
    assert node == (0, 5) and w == 5.0 and np.array_equal(arr, big)


def test_unexpected_and_late_pushes_are_dropped(plane):
    plane.expect(["mine"])
    assert push(plane.endpoint, "stale-attempt", 1)
    assert push(plane.endpoint, "mine", 2)
    assert plane.take(["mine"], timeout=5.0) == {"mine": 2}
    assert push(plane.endpoint, "mine", 3)  # a second push of a key already taken: nobody expects it
    assert plane.take(["mine", "stale-attempt"], timeout=0.3) == {}


def test_a_retracted_key_is_refused_clearly(plane):
    plane.publish("gone", np.zeros(3, np.float32))
    plane.retract(["gone"])
    with pytest.raises(LookupError, match="no longer serves 'gone'"):
        fetch(plane.endpoint, "gone")


def test_a_malformed_message_does_not_stop_the_plane(plane):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(plane.endpoint)
    plane.expect(["k"])
    sock.send_multipart([b"put", b"k", b"not a pickle"])
    sock.send_multipart([b"\xff"])
    sock.close()
    plane.publish("p", np.ones(2, np.float32))
    assert np.array_equal(fetch(plane.endpoint, "p"), np.ones(2, np.float32))
    assert push(plane.endpoint, "k", "fine")
    assert plane.take(["k"], timeout=5.0) == {"k": "fine"}


def test_the_socket_is_private_and_removed_at_close():
    p = DataPlane()
    directory = os.path.dirname(p.endpoint[len("ipc://"):])
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    p.close()
    assert not os.path.exists(directory)


def test_fetch_times_out_with_a_clear_error(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody"
    with pytest.raises(TimeoutError, match="did not send 'p'"):
        fetch(endpoint, "p", timeout=0.3)
    dataplane.forget(endpoint)


def _final(client, monkeypatch, plane: str, chunk: int | None = None) -> tuple[np.ndarray, bool]:
    monkeypatch.setenv("FLGRAPH_DATA_PLANE", plane)
    data = fg.data.synthetic_classification(num_clients=30, samples_per_client=16, num_features=6,
                                            num_classes=3, alpha=0.5, seed=2, test_samples=50)
    p = st.Select(clients=9) >> st.Broadcast() >> st.LocalTrain(2, batch_size=4, lr=0.1) >> st.Aggregate()
    with fg.Run(p, model=fg.models.mlp(6, [8], 3, seed=0), data=data, seed=4, cluster=client,
                progress=False, evaluate="never", chunk_size=chunk) as run:
        run.fit(rounds=3)
        return run.params.flat.copy(), run._transport._plane is not None


def test_rounds_over_the_plane_equal_rounds_over_dask(client2, monkeypatch):
    a, on = _final(client2, monkeypatch, "1")
    b, off = _final(client2, monkeypatch, "0")
    c, _ = _final(client2, monkeypatch, "1", chunk=2)  # more chunks than workers, still <= FAN_IN partials
    assert on and not off
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert np.array_equal(a.view(np.uint32), c.view(np.uint32))
