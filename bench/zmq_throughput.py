"""Transport throughput for the W1 model (784-200-200-10 MLP: 199,210 float32 = 797 KB) against raw pyzmq.

    .venv/bin/python bench/zmq_throughput.py [--rounds 400] [--block 10] [--curve] [--agents 4]

Both sides exchange the same bytes on the same machine (loopback TCP, the peer in another process): the
driver sends the params (797 KB), the peer answers with an update of the same size. "raw" is plain pyzmq
DEALER/ROUTER with bytes; "flgraph" is a Gateway round with one Agent (envelopes, checks, NaN scan, the
task call). With ``--curve`` both are measured again with CURVE encryption on (the same keys and socket
options), so the encrypted figure compares like with like. ``--agents N`` serves N agents at once (raw: N
DEALER peers), each round sending the params to all and waiting for all N updates: the transport's
throughput, where one agent measures one lock-step round trip (its latency).

Every peer is set up first; then the kinds take turns, ``--block`` round trips each, until each has done
``--rounds``. This machine's speed drifts by up to 2x over minutes (a shared VM), and turns of a few
milliseconds put every kind in the same phase. Prints each kind's median round trip, its MB/s both ways,
the ratio of medians, and the median of the per-turn ratios (target: flgraph >= 70 % of raw).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth
from flgraph.transports.zmq import Agent, EdgeResult, EdgeTask, Gateway, make_keypair

from flgraph.params import ParamSpec

SIZE = 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # 199,210
UPDATE = np.random.default_rng(0).standard_normal(SIZE).astype(np.float32) * 1e-3
PARAMS = np.random.default_rng(1).standard_normal(SIZE).astype(np.float32)


def echo(endpoint: str, keys: str | None, peers: int = 1) -> None:
    """``peers`` raw peers (a thread each, one process): answer every message with the update's bytes until
    told to stop (an empty message)."""
    ctx = zmq.Context()

    def one() -> None:
        s = ctx.socket(zmq.DEALER)
        if keys:
            s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(Path(keys) / "agent.key_secret")
            s.curve_serverkey, _ = zmq.auth.load_certificate(Path(keys) / "gateway.key")
        s.connect(endpoint)
        s.send(b"hello")
        answer = UPDATE.tobytes()
        while True:
            got = s.recv(copy=False)
            if len(got) == 0:
                break
            s.send(answer, copy=False)
        s.close(0)

    threads = [threading.Thread(target=one) for _ in range(peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctx.term()


def reply(task: EdgeTask) -> EdgeResult:
    return EdgeResult(num_samples=1, delta=UPDATE)


def agent(endpoint: str, keys: str | None, agents: int = 1) -> None:
    """``agents`` agents (clients 0..agents-1, a thread each, one process and one zmq context)."""
    kw: dict[str, Any] = ({"secret_key": Path(keys) / "agent.key_secret", "server_key": Path(keys) / "gateway.key"}
                          if keys else {})
    ctx = zmq.Context()
    threads = [threading.Thread(target=Agent(endpoint, reply, client_id=c, threaded=False, heartbeat_s=1.0,
                                             context=ctx, **kw).run, daemon=True) for c in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def keys_dir() -> str:
    d = tempfile.mkdtemp()
    make_keypair(d, "gateway")
    make_keypair(d, "agent")
    return d


class Raw:
    """Plain pyzmq ROUTER/DEALER round trips; with ``keys``, CURVE-encrypted the same way as the gateway."""

    def __init__(self, keys: str | None, peers: int = 1) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.ROUTER)
        if keys:
            self.s.curve_publickey, self.s.curve_secretkey = zmq.auth.load_certificate(
                Path(keys) / "gateway.key_secret")
            self.s.curve_server = True
        port = self.s.bind_to_random_port("tcp://127.0.0.1")
        self.p = mp.get_context("spawn").Process(target=echo, args=(f"tcp://127.0.0.1:{port}", keys, peers))
        self.p.start()
        self.rids = [self.s.recv_multipart()[0] for _ in range(peers)]

    def trip(self, i: int) -> None:
        """The params to every peer, then every peer's answer."""
        for rid in self.rids:
            self.s.send_multipart([rid, PARAMS], copy=False)
        for _ in self.rids:
            _, data = self.s.recv_multipart(copy=False)
            assert len(data) == SIZE * 4

    def close(self) -> None:
        for rid in self.rids:
            self.s.send_multipart([rid, b""])
        self.p.join(30)
        self.s.close(0)
        self.ctx.term()


class Edge:
    """One flgraph Gateway round per trip, answered by one Agent process."""

    def __init__(self, keys: str | None, agents: int = 1) -> None:
        kw: dict[str, Any] = {"secret_key": Path(keys) / "gateway.key_secret", "allow": Path(keys)} if keys else {}
        self.gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=1.0, **kw)
        self.gw.start()
        self.p = mp.get_context("spawn").Process(target=agent, args=(self.gw.endpoint, keys, agents), daemon=True)
        self.p.start()
        self.gw.wait_for(clients=range(agents), timeout=60)
        self.spec = ParamSpec.from_shapes([("w", (SIZE,), "float32")])
        self.configs: dict[int, dict[str, Any]] = {c: {} for c in range(agents)}

    def trip(self, i: int) -> None:
        """One round: the params to every agent (one encoding), then every agent's result."""
        events = self.gw.begin_round(i + 1, PARAMS, self.spec, 0, self.configs, deadline_s=30)
        for _ in self.configs:
            try:
                ev = events.get(timeout=30)
            except queue.Empty:
                raise SystemExit("no result in 30 s") from None
            assert ev.kind == "result" and ev.message is not None and ev.message.tensors[0].size == SIZE
        self.gw.end_round()

    def close(self) -> None:
        self.gw.stop()
        self.p.kill()
        self.p.join(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=400, help="measured round trips per kind")
    ap.add_argument("--block", type=int, default=10, help="round trips per turn")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured round trips per kind first")
    ap.add_argument("--curve", action="store_true", help="also measure both with CURVE encryption")
    ap.add_argument("--agents", type=int, default=1,
                    help="agents (raw: peers) served at once, a thread each in one process: a round sends the "
                         "params to all and waits for all their updates (throughput rather than one round trip)")
    args = ap.parse_args()
    keys = keys_dir() if args.curve else None
    n = args.agents
    peers: dict[str, Any] = {"raw pyzmq": Raw(None, n), "flgraph edge": Edge(None, n)}
    if keys:
        peers.update({"raw pyzmq+CURVE": Raw(keys, n), "flgraph+CURVE": Edge(keys, n)})
    ref = {"flgraph edge": "raw pyzmq", "flgraph+CURVE": "raw pyzmq+CURVE"}
    times: dict[str, list[float]] = {k: [] for k in peers}
    turns: dict[str, list[float]] = {k: [] for k in peers}  # median of each turn
    counter = 0
    try:
        for peer in peers.values():
            for _ in range(args.warmup):
                counter += 1
                peer.trip(counter)
        while min(len(v) for v in times.values()) < args.rounds:
            for name, peer in peers.items():
                got = []
                for _ in range(args.block):
                    counter += 1
                    t0 = time.perf_counter()
                    peer.trip(counter)
                    got.append(time.perf_counter() - t0)
                times[name] += got
                turns[name].append(statistics.median(got))
    finally:
        for peer in peers.values():
            peer.close()
    nbytes = 2 * SIZE * 4 * n
    print(f"W1 params {SIZE * 4 / 1e3:.0f} KB down + update {SIZE * 4 / 1e3:.0f} KB up, {n} agent(s) per round; "
          f"{args.rounds} rounds per kind, in turns of {args.block}")
    med: dict[str, float] = {k: statistics.median(v) for k, v in times.items()}
    show: Callable[[float], str] = lambda m: f"{m * 1e3:7.3f} ms  {nbytes / m / 1e6:8.1f} MB/s"  # noqa: E731
    for name in peers:
        line = f"{name:16s} {show(med[name])}"
        if name in ref:
            r = ref[name]
            per_turn = statistics.median(a / b for a, b in zip(turns[r], turns[name]))
            line += f"  = {med[r] / med[name] * 100:.0f} % of {r} (median of per-turn ratios {per_turn * 100:.0f} %)"
        print(line)


if __name__ == "__main__":
    main()
