"""Transport throughput for the W1 model (784-200-200-10 MLP: 199,210 float32 = 797 KB) against raw pyzmq.

    .venv/bin/python bench/zmq_throughput.py [--rounds 200] [--curve]

Both sides exchange the same bytes on the same machine (loopback TCP, the peer in another process): the
driver sends the params (797 KB), the peer answers with an update of the same size. "raw" is plain pyzmq
DEALER/ROUTER with bytes; "flgraph" is a Gateway round with one Agent (envelopes, checks, NaN scan, the
task call). With ``--curve`` both are measured again with CURVE encryption on (the same keys and socket
options), so the encrypted figure compares like with like. Prints MB/s both ways and the ratio
(target: flgraph >= 70 % of raw).
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
import zmq.auth
from flgraph.transports.zmq import Agent, EdgeResult, EdgeTask, Gateway, make_keypair

from flgraph.params import ParamSpec

SIZE = 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # 199,210
UPDATE = np.random.default_rng(0).standard_normal(SIZE).astype(np.float32) * 1e-3


def echo(endpoint: str, rounds: int, keys: str | None) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    if keys:
        s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(Path(keys) / "agent.key_secret")
        s.curve_serverkey, _ = zmq.auth.load_certificate(Path(keys) / "gateway.key")
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


def raw(rounds: int, curve: bool = False) -> list[float]:
    """Plain pyzmq ROUTER/DEALER round trips; with ``curve``, CURVE-encrypted the same way as the gateway."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    keys = None
    if curve:
        keys = tempfile.mkdtemp()
        make_keypair(keys, "gateway")
        make_keypair(keys, "agent")
        s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(Path(keys) / "gateway.key_secret")
        s.curve_server = True
    port = s.bind_to_random_port("tcp://127.0.0.1")
    p = mp.get_context("spawn").Process(target=echo, args=(f"tcp://127.0.0.1:{port}", rounds + 20, keys))
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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median of each is reported")
    args = ap.parse_args()
    nbytes = 2 * SIZE * 4
    kinds = [("raw pyzmq", lambda: raw(args.rounds)), ("flgraph edge", lambda: flgraph_rounds(args.rounds, False))]
    if args.curve:
        kinds += [("raw pyzmq+CURVE", lambda: raw(args.rounds, True)),
                  ("flgraph+CURVE", lambda: flgraph_rounds(args.rounds, True))]
    got: dict[str, list[float]] = {name: [] for name, _ in kinds}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every kind alike
        for name, fn in kinds:
            got[name].append(statistics.median(fn()))
    print(f"W1 params {SIZE * 4 / 1e3:.0f} KB down + update {SIZE * 4 / 1e3:.0f} KB up per round trip, "
          f"median round trip of {args.rounds}, median of {args.repeats} interleaved repeats")
    med = {name: statistics.median(v) for name, v in got.items()}
    for name, _ in kinds:
        m = med[name]
        ref = "raw pyzmq+CURVE" if "CURVE" in name else "raw pyzmq"
        tail = "" if name.startswith("raw") else f"  = {med[ref] / m * 100:.0f} % of {ref}"
        print(f"{name:16s} {m * 1e3:7.3f} ms  {nbytes / m / 1e6:8.1f} MB/s{tail}   "
              f"(repeats: {', '.join(f'{x * 1e3:.3f}' for x in got[name])} ms)")


if __name__ == "__main__":
    main()
