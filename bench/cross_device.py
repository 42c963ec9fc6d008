"""Cross-device scale (X1, X1-multi of the shared WORKLOAD.md; W1): vectorised flgraph against sequential training.

Four measurements, each taken in turns (A B B A per set, ``--sets`` sets) so that a shared machine's drift
weighs on both sides alike; ratios are the medians of the per-set ratios:

1. **X1**: 1,000,000 registered clients (``from_function``), ``--clients`` a round, the 676-parameter MLP, one
   local step. ``LocalTrain(clients_at_once=B)`` on ``--workers`` workers against the plain sequential loop
   (``x1_loop.py``'s functions, one thread, in this process), per client. Peak driver memory
   (``tracemalloc`` during the flgraph rounds, and the driver's peak RSS).
2. **X1-multi**: the same with 5 local epochs of batch 10 over 50 samples per client.
3. **W1** (199,210 parameters, 100 clients a round): flgraph vectorised against flgraph sequential, where
   vectorising stops paying.
4. **The sequential path** (``clients_at_once=1``) at ``--clients`` a round against its floor: the same clients
   split over the same number of plain processes, each running the plain loop (no framework, nothing
   aggregated). Twice: with LocalTrain's default step, and with ``optimizer=SGD(lr)`` (a torch.optim.SGD per
   client, as the plain loop makes), which isolates the framework's own cost from the lean default step.

The plain loop is timed on the round's first ``--loop-clients`` clients (its cost is linear in clients) and
compared per client. Not a timed test: it prints figures and one ``RESULT {json}`` line.

Usage (from the repository root)::

    .venv/bin/python bench/cross_device.py --sets 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "shared" / "bench"))
import w1common  # noqa: E402
import x1_loop  # noqa: E402

import flgraph as fg  # noqa: E402
from flgraph import stages as st  # noqa: E402


class X1Clients:
    """Client ``k``'s X1 data (picklable, so workers make it themselves)."""

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return x1_loop.client_data(int(k), self.samples)


def w1_client(k: int) -> tuple[np.ndarray, np.ndarray]:
    return w1common.client_data(int(k))


def x1_run(workload: str, clients: int, population: int, at_once: int, workers: int,
           torch_optimizer: bool = False) -> fg.Run:
    wl = x1_loop.WORKLOADS[workload]
    data = fg.data.FederatedDataset.from_function(X1Clients(wl["samples"]), population)
    opt = {"optimizer": st.SGD(x1_loop.LR)} if torch_optimizer else {}  # torch.optim.SGD, as the plain loop
    pipe = (st.Select(clients=clients) >> st.Broadcast()
            >> st.LocalTrain(wl["epochs"], batch_size=wl["batch"], lr=x1_loop.LR, clients_at_once=at_once, **opt)
            >> st.Aggregate(st.WeightedMean()))
    return fg.Run(pipe, model=x1_loop.initial_model(), data=data, seed=0, workers=workers, progress=False,
                  evaluate="never")


def w1_run(at_once: int, workers: int) -> fg.Run:
    data = fg.data.FederatedDataset.from_function(w1_client, w1common.NUM_CLIENTS)
    pipe = (st.Select(clients=100) >> st.Broadcast()
            >> st.LocalTrain(1, batch_size=w1common.BATCH_SIZE, lr=w1common.LR, clients_at_once=at_once)
            >> st.Aggregate(st.WeightedMean()))
    return fg.Run(pipe, model=w1common.initial_model("mlp"), data=data, seed=0, workers=workers, progress=False,
                  evaluate="never")


def flgraph_round(run: fg.Run) -> float:
    run.fit(rounds=1)
    return float(run.history[-1]["round_time"])


def loop_clients(workload: str, ids: np.ndarray, rnd: int = 1) -> float:
    """Seconds per client of x1_loop's plain loop over ``ids`` (one thread, this process)."""
    wl = x1_loop.WORKLOADS[workload]
    model = x1_loop.initial_model()
    glob = [p.detach().clone() for p in model.parameters()]
    acc = [torch.zeros_like(g) for g in glob]
    t = time.perf_counter()
    for k in ids:
        x, y = x1_loop.client_data(int(k), wl["samples"])
        with torch.no_grad():
            for p, g in zip(model.parameters(), glob):
                p.copy_(g)
        x1_loop.local_train(model, x, y, rnd, int(k), wl["epochs"], wl["batch"])
        with torch.no_grad():
            for s, p, g in zip(acc, model.parameters(), glob):
                s += len(y) * (p - g)
    return (time.perf_counter() - t) / len(ids)


def floor_serve(workload: str, conn: Any) -> None:
    """A plain process: train the clients it is sent with the plain loop, reply when done."""
    torch.set_num_threads(1)
    while True:
        ids = conn.recv()
        if ids is None:
            return
        conn.send(loop_clients(workload, ids))


def paired(a: Callable[[], float], b: Callable[[], float], sets: int) -> tuple[list[float], list[float]]:
    """``sets`` sets of A B B A: each side's figures, taken in turns."""
    fa, fb = [], []
    for _ in range(sets):
        fa.append(a())
        fb.append(b())
        fb.append(b())
        fa.append(a())
    return fa, fb


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    r = [x / y for x, y in zip(num, den)]
    return {"median": round(statistics.median(r), 4), "min": round(min(r), 4), "max": round(max(r), 4)}


def x1_measure(workload: str, a: argparse.Namespace) -> dict[str, Any]:
    ids = x1_loop.select(1, a.population, a.clients)[: a.loop_clients]
    with x1_run(workload, a.clients, a.population, a.block, a.workers) as run:
        flgraph_round(run)  # warm-up: start, first block, torch's first steps
        loop_clients(workload, ids[:50])
        tracemalloc.start()
        fl, lp = paired(lambda: flgraph_round(run) / a.clients, lambda: loop_clients(workload, ids), a.sets)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        vec = float(run.history[-1].get("vectorised", 0.0))
    out = {"flgraph_us_per_client": round(statistics.median(fl) * 1e6, 1),
           "loop_us_per_client": round(statistics.median(lp) * 1e6, 1), "flgraph_over_loop": ratio(fl, lp),
           "vectorised": vec, "driver_traced_peak_mb": round(peak / 2**20, 1)}
    print(f"{workload}: flgraph vectorised {out['flgraph_us_per_client']} us/client, plain loop "
          f"{out['loop_us_per_client']} us/client, ratio {out['flgraph_over_loop']}, driver peak (traced) "
          f"{out['driver_traced_peak_mb']} MB", flush=True)
    return out


def w1_measure(a: argparse.Namespace) -> dict[str, Any]:
    with w1_run(64, a.workers) as vec, w1_run(1, a.workers) as seq:
        flgraph_round(vec), flgraph_round(seq)
        fv, fs = paired(lambda: flgraph_round(vec), lambda: flgraph_round(seq), a.sets)
    out = {"vectorised_round_s": round(statistics.median(fv), 4), "sequential_round_s": round(statistics.median(fs), 4),
           "vectorised_over_sequential": ratio(fv, fs)}
    print(f"W1: vectorised {out['vectorised_round_s']} s/round, sequential {out['sequential_round_s']} s/round, "
          f"ratio {out['vectorised_over_sequential']}", flush=True)
    return out


def floor_measure(a: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(a.workers):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=floor_serve, args=("X1", theirs), daemon=True)
        p.start()
        pipes.append(mine)
        procs.append(p)
    rnd_ids = {"r": 0}

    def floor_round() -> float:
        rnd_ids["r"] += 1
        ids = x1_loop.select(rnd_ids["r"], a.population, a.clients)
        t = time.perf_counter()
        for conn, part in zip(pipes, np.array_split(ids, a.workers)):
            conn.send(part)
        for conn in pipes:
            conn.recv()
        return time.perf_counter() - t

    try:
        with x1_run("X1", a.clients, a.population, 1, a.workers) as run, \
                x1_run("X1", a.clients, a.population, 1, a.workers, torch_optimizer=True) as run_t:
            flgraph_round(run), flgraph_round(run_t), floor_round()
            fs, fl = paired(lambda: flgraph_round(run), floor_round, a.sets)
            ft, fl2 = paired(lambda: flgraph_round(run_t), floor_round, a.sets)
    finally:
        for conn in pipes:
            conn.send(None)
        for p in procs:
            p.join(10)
    out = {"sequential_round_s": round(statistics.median(fs), 3), "floor_round_s": round(statistics.median(fl), 3),
           "sequential_over_floor": ratio(fs, fl),
           "torch_optimizer_round_s": round(statistics.median(ft), 3),
           "torch_optimizer_over_floor": ratio(ft, fl2)}
    print(f"sequential flgraph at {a.clients} clients/round: {out['sequential_round_s']} s, floor "
          f"{out['floor_round_s']} s, ratio {out['sequential_over_floor']}; with LocalTrain(optimizer=SGD(lr)) "
          f"(torch.optim.SGD, as the floor's loop) {out['torch_optimizer_round_s']} s, ratio "
          f"{out['torch_optimizer_over_floor']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sets", type=int, default=2)
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--population", type=int, default=1_000_000)
    ap.add_argument("--loop-clients", type=int, default=1000)
    ap.add_argument("--block", type=int, default=512, help="clients_at_once of the vectorised runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=["x1", "x1-multi", "w1", "floor"], action="append")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    parts = a.only or ["x1", "x1-multi", "w1", "floor"]
    result: dict[str, Any] = {"benchmark": "cross_device", "clients_per_round": a.clients,
                              "population": a.population, "block": a.block, "workers": a.workers, "sets": a.sets}
    if "x1" in parts:
        result["X1"] = x1_measure("X1", a)
    if "x1-multi" in parts:
        result["X1-multi"] = x1_measure("X1-multi", a)
    if "w1" in parts:
        result["W1"] = w1_measure(a)
    if "floor" in parts:
        result["sequential_vs_floor"] = floor_measure(a)
    result["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
