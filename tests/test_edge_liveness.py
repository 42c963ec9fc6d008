"""A transfer in progress counts as liveness: a model near the size limit over a slow link.

A TCP proxy on 127.0.0.1, written here, forwards each direction at a fixed rate (a slow link). The gateway
sends a 32 MiB model (limit 64 MiB) through it to an agent and gets a 32 MiB update back, with heartbeats
every 0.25 s and 4 missed beats counting as lost (1 s), while each transfer takes about 2 s. In parts
(PROTOCOL.md section 5.1) the round completes with the agent's exact update; sent whole, as before parts,
the agent declares the gateway lost mid-download, joins again, starts over, and the client fails.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
from flgraph.transports.zmq import Agent, Gateway, Limits
from flgraph.transports.zmq.agent import EdgeResult

from flgraph.params import ParamSpec

RATE = 16 << 20  # bytes per second, each direction
SIZE = 8 << 20  # float32 values: 32 MiB


class Throttle:
    """A TCP proxy: 127.0.0.1:<port> -> ``target``, each direction forwarded at ``rate`` bytes/s."""

    def __init__(self, target: tuple[str, int], rate: int) -> None:
        self.target, self.rate = target, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                a, _ = self.listener.accept()
            except OSError:
                continue
            b = socket.create_connection(self.target)
            self.conns += [a, b]
            for src, dst in ((a, b), (b, a)):
                th = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                th.start()
                self.threads.append(th)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        chunk = 64 << 10
        with contextlib.suppress(OSError):
            while not self.stopping.is_set():
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                time.sleep(len(data) / self.rate)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopping.set()
        for s in [self.listener, *self.conns]:
            with contextlib.suppress(OSError):
                s.close()
        for th in self.threads:
            th.join(5)


def nudge(task):
    """An update of random (incompressible) values, seeded by the round."""
    rng = np.random.default_rng(task.round)
    return EdgeResult(num_samples=3, delta=rng.standard_normal(task.params.spec.size, dtype=np.float32))


def one_round(keys, part_bytes: int, deadline_s: float = 15.0):
    limits = Limits(max_tensor_bytes=64 << 20, part_bytes=part_bytes)
    gw = Gateway("tcp://127.0.0.1:0", secret_key=keys / "gateway.key_secret", allow=keys / "allow",
                 heartbeat_s=0.25, liveness=4, limits=limits)
    port = int(gw.start().rsplit(":", 1)[1])
    proxy = Throttle(("127.0.0.1", port), RATE)
    agent = Agent(f"tcp://127.0.0.1:{proxy.port}", nudge, client_id=0, secret_key=keys / "agent-0.key_secret",
                  server_key=keys / "gateway.key", heartbeat_s=0.25, limits=limits, max_backoff_s=0.2)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        gw.wait_for(clients=[0], timeout=20)
        spec = ParamSpec.from_shapes([("w", (SIZE,), "float32")])
        flat = np.random.default_rng(0).standard_normal(SIZE, dtype=np.float32)
        t0 = time.monotonic()
        events = gw.begin_round(1, flat, spec, 0, {0: {}}, deadline_s=deadline_s)
        ev = events.get(timeout=30)
        took = time.monotonic() - t0
        gw.end_round()
        return ev, took, dict(gw.counters)
    finally:
        agent.stop()
        thread.join(10)
        gw.stop()
        proxy.close()


def test_a_model_near_the_limit_crosses_a_slow_link_in_parts(keys):
    ev, took, counters = one_round(keys, part_bytes=1 << 20)
    assert ev.kind == "result", ev.reason
    np.testing.assert_array_equal(ev.message.tensors[0],
                                  np.random.default_rng(1).standard_normal(SIZE, dtype=np.float32))
    assert took > 2 * SIZE * 4 / RATE * 0.8  # it did cross the slow link, both ways
    assert counters["lost"] == 0 and counters["joins"] == 1 and counters["params_sent"] == 1


def test_sent_whole_the_same_transfer_loses_the_peer(keys):
    """The behaviour before parts, kept as the check that the link above is slow enough to matter."""
    ev, _, counters = one_round(keys, part_bytes=0, deadline_s=5.0)
    assert ev.kind == "failed" and "deadline" in ev.reason
    # the agent heard nothing while the model was in transit, declared the gateway lost and joined again,
    # and each join started the download over
    assert counters["joins"] > 1 and counters["params_sent"] > 1
