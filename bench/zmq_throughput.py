"""Transport throughput for the W1 model (784-200-200-10 MLP: 199,210 float32 = 797 KB) against raw pyzmq.

    .venv/bin/python bench/zmq_throughput.py [--rounds 200] [--curve]

Both sides exchange the same bytes on the same machine (loopback TCP, the peer in another process): the
driver sends the params (797 KB), the peer answers with an update of the same size. "raw" is plain pyzmq
DEALER/ROUTER with bytes; "flgraph" is a Gateway round with one Agent (envelopes, checks, NaN scan, the
task call). Prints MB/s both ways and the ratio (target: flgraph >= 70 % of raw).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from flgraph.transports.zmq import Agent, EdgeResult, EdgeTask, Gateway, make_keypair

from flgraph.params import ParamSpec

SIZE = 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # 199,210
UPDATE = np.random.default_rng(0).standard_normal(SIZE).astype(np.float32) * 1e-3


def echo(endpoint: str, rounds: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    s.send(b"hello")
    answer = UPDATE.tobytes()
    for _ in range(rounds):
        s.recv(copy=False)
        s.send(answer, copy=False)
    s.close(0)
    ctx.term()


def reply(task: EdgeTask) -> EdgeResult:
    return EdgeResult(num_samples=1, delta=UPDATE)


def agent(endpoint: str, keys: str | None) -> None:
    kw = {"secret_key": Path(keys) / "agent.key_secret", "server_key": Path(keys) / "gateway.key"} if keys else {}
    Agent(endpoint, reply, client_id=0, threaded=False, heartbeat_s=1.0, **kw).run()  # type: ignore[arg-type]


def raw(rounds: int) -> list[float]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    p = mp.get_context("spawn").Process(target=echo, args=(f"tcp://127.0.0.1:{port}", rounds + 20))
    p.start()
    rid, _ = s.recv_multipart()
    params = np.random.default_rng(1).standard_normal(SIZE).astype(np.float32)
    out = []
    for i in range(rounds + 20):
        t0 = time.perf_counter()
        s.send_multipart([rid, params], copy=False)
        _, data = s.recv_multipart(copy=False)
        got = np.frombuffer(data.buffer, np.float32)
        assert got.size == SIZE
        if i >= 20:
            out.append(time.perf_counter() - t0)
    p.join(30)
    s.close(0)
    ctx.term()
    return out


def flgraph_rounds(rounds: int, curve: bool) -> list[float]:
    tmp = tempfile.mkdtemp()
    kw = {}
    if curve:
        make_keypair(tmp, "gateway")
        make_keypair(tmp, "agent")
        kw = {"secret_key": Path(tmp) / "gateway.key_secret", "allow": Path(tmp)}
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=1.0, **kw)  # type: ignore[arg-type]
    gw.start()
    p = mp.get_context("spawn").Process(target=agent, args=(gw.endpoint, tmp if curve else None), daemon=True)
    p.start()
    gw.wait_for(clients=[0], timeout=60)
    spec = ParamSpec.from_shapes([("w", (SIZE,), "float32")])
    params = np.random.default_rng(1).standard_normal(SIZE).astype(np.float32)
    out = []
    for i in range(rounds + 20):
        t0 = time.perf_counter()
        events = gw.begin_round(i + 1, params, spec, 0, {0: {}}, deadline_s=30)
        try:
            ev = events.get(timeout=30)
        except queue.Empty:
            raise SystemExit("no result in 30 s") from None
        assert ev.kind == "result" and ev.message is not None and ev.message.tensors[0].size == SIZE
        gw.end_round()
        if i >= 20:
            out.append(time.perf_counter() - t0)
    gw.stop()
    p.kill()
    p.join(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--curve", action="store_true", help="also measure flgraph with CURVE encryption")
    args = ap.parse_args()
    nbytes = 2 * SIZE * 4
    r = statistics.median(raw(args.rounds))
    f = statistics.median(flgraph_rounds(args.rounds, False))
    print(f"W1 params {SIZE * 4 / 1e3:.0f} KB down + update {SIZE * 4 / 1e3:.0f} KB up per round trip, "
          f"median of {args.rounds}")
    print(f"raw pyzmq      {r * 1e3:7.3f} ms  {nbytes / r / 1e6:8.1f} MB/s")
    print(f"flgraph edge   {f * 1e3:7.3f} ms  {nbytes / f / 1e6:8.1f} MB/s  = {r / f * 100:.0f} % of raw")
    if args.curve:
        c = statistics.median(flgraph_rounds(args.rounds, True))
        print(f"flgraph+CURVE  {c * 1e3:7.3f} ms  {nbytes / c / 1e6:8.1f} MB/s  = {r / c * 100:.0f} % of raw")


if __name__ == "__main__":
    main()
