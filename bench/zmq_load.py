"""Load: many lightweight agents (several per process) against one gateway, through a real fg.Run.

    .venv/bin/python bench/zmq_load.py [--agents 200] [--procs 4] [--rounds 10] [--curve]

Prints the round time (median, max) and the gateway's messages per second (received + sent).
Each agent's task returns a zero update at once, so the figures are the transport's, not training's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from flgraph.transports.zmq import Agent, EdgeResult, EdgeTask, ZmqTransport, make_keypair

import flgraph as fg
from flgraph import stages as st


def instant(task: EdgeTask) -> EdgeResult:
    return EdgeResult(num_samples=1, delta=np.zeros_like(task.params.flat), metrics={"loss": 1.0})


def host(endpoint: str, ids: list[int], keys: str | None, stop: mp.Event) -> None:  # type: ignore[valid-type]
    ctx = zmq.Context()
    kw = {}
    agents = []
    for c in ids:
        if keys:
            kw = {"secret_key": Path(keys) / f"agent-{c}.key_secret", "server_key": Path(keys) / "gateway.key"}
        agents.append(Agent(endpoint, instant, client_id=c, threaded=False, context=ctx, heartbeat_s=2.0, **kw))
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()
    stop.wait(600)
    for a in agents:
        a.stop()
    for t in threads:
        t.join(10)
    ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--curve", action="store_true")
    args = ap.parse_args()
    n = args.agents
    tmp = tempfile.mkdtemp()
    kw = {}
    if args.curve:
        make_keypair(tmp, "gateway")
        allow = Path(tmp) / "allow"
        allow.mkdir()
        for c in range(n):
            pub, _ = make_keypair(tmp, f"agent-{c}")
            (allow / pub.name).write_bytes(pub.read_bytes())
        kw = {"secret_key": Path(tmp) / "gateway.key_secret", "allow": allow}
    t = ZmqTransport("tcp://127.0.0.1:0", deadline_s=60, heartbeat_s=2.0, liveness=5, **kw)
    t.gateway.start()
    stop = mp.get_context("spawn").Event()
    procs = [mp.get_context("spawn").Process(target=host, args=(t.endpoint, list(range(i, n, args.procs)),
                                                                 tmp if args.curve else None, stop))
             for i in range(args.procs)]
    for p in procs:
        p.start()
    t0 = time.perf_counter()
    t.gateway.wait_for(count=n, timeout=120)
    print(f"{n} agents in {args.procs} processes joined in {time.perf_counter() - t0:.1f} s "
          f"(CURVE {'on' if args.curve else 'off'})")
    data = fg.data.synthetic_classification(num_clients=n, samples_per_client=4, num_features=8, num_classes=3,
                                            test_samples=0)
    pipe = st.Select(clients=n) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate(st.WeightedMean())
    with fg.Run(pipe, model=fg.models.mlp(8, [16], 3), data=data, transport=t, progress=False,
                evaluate="never") as run:
        c0 = dict(t.gateway.counters)
        t1 = time.perf_counter()
        history = run.fit(rounds=args.rounds)
        dt = time.perf_counter() - t1
        c1 = dict(t.gateway.counters)
        stop.set()
    msgs = (c1["received"] - c0["received"]) + (c1["sent"] - c0["sent"])
    times = history.column("round_time")
    done = history.column("clients_done")
    print(f"{args.rounds} rounds x {n} clients: round time median {statistics.median(times) * 1e3:.1f} ms, "
          f"max {max(times) * 1e3:.1f} ms; clients done per round {min(done)}..{max(done)}")
    print(f"gateway messages: {msgs:,} in {dt:.2f} s = {msgs / dt:,.0f} messages/s (received + sent)")
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()


if __name__ == "__main__":
    main()
