"""The practical floor of a W1 round on P single-threaded processes: no framework at all.

``--procs`` plain Python processes (default 2, like flgraph's default workers) each train their share of
every round's clients (100 for W1; our ``w1.py``: load the global weights, generate the client, local SGD,
copy the weights out), in lock step: all start a round together (a barrier) and the round takes as long
as the slowest. Nothing is aggregated or exchanged (the work per client does not depend on the weights'
values), so this is the lower bound any orchestration of P processes can reach on this machine; compare
it with ``bare_loop.py --threads 1`` (one process) and with ``w1_flgraph.py --workers P``.

Prints one human line and one ``RESULT {json}`` line (``median_round_s`` over rounds 2..R).

Usage (from the repository root)::

    .venv/bin/python bench/floor_w1.py [--procs 2] [--rounds 20] [--workload W1-heavy]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _setup(workload: str) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """This process's W1 module, workload settings, model and the weights every client starts from."""
    import torch
    import w1

    torch.set_num_threads(1)
    wl = w1.WORKLOADS[workload]
    model = w1.initial_model(wl["model"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    return w1, wl, model, start


def _rounds(setup: tuple[Any, dict[str, Any], Any, dict[str, Any]], index: int, procs: int, first: int,
            last: int, barrier: Any) -> list[float]:
    """Train this process's share (positions index, index + procs, ...) of rounds ``first..last``'
    clients, each round started together with the other processes (``barrier``); its seconds a round."""
    w1, wl, model, start = setup
    clients, epochs = int(wl["clients"]), int(wl["epochs"])
    times: list[float] = []
    for rnd in range(first, last + 1):
        mine = w1.sample_clients(rnd, clients)[index::procs]
        barrier.wait()
        t0 = time.perf_counter()
        for k in mine:
            model.load_state_dict(start)
            x, y = w1.client_data(k)
            w1.local_train(model, x, y, epochs, rnd, k)
            _ = [v.detach().numpy().copy() for v in model.state_dict().values()]
        times.append(time.perf_counter() - t0)
    return times


def worker(index: int, procs: int, workload: str, rounds: int, barrier: Any, out: Any) -> None:
    """Run rounds 1..``rounds`` and put ``(index, seconds a round)`` on ``out``."""
    out.put((index, _rounds(_setup(workload), index, procs, 1, rounds, barrier)))


def serve(index: int, procs: int, workload: str, barrier: Any, conn: Any) -> None:
    """Stay alive and run the rounds asked for: ``(first, last)`` received on ``conn``, this process's
    seconds a round sent back; None ends it (``paired_w1.py`` interleaves the floor with other runs)."""
    setup = _setup(workload)
    conn.send("ready")
    while (asked := conn.recv()) is not None:
        conn.send(_rounds(setup, index, procs, asked[0], asked[1], barrier))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import w1

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="W1", choices=list(w1.WORKLOADS))
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=0, help="rounds (0 = the workload's)")
    args = ap.parse_args(argv)
    wl = w1.WORKLOADS[args.workload]
    rounds_n = args.rounds or int(wl["rounds"])
    clients = int(wl["clients"])
    load = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.procs)
    out = ctx.Queue()
    ps = [ctx.Process(target=worker, args=(i, args.procs, args.workload, rounds_n, barrier, out))
          for i in range(args.procs)]
    for p in ps:
        p.start()
    per_proc = dict(out.get() for _ in ps)
    for p in ps:
        p.join()
    rounds = [max(per_proc[i][r] for i in per_proc) for r in range(rounds_n)]
    med = statistics.median(rounds[1:] if len(rounds) > 1 else rounds)
    res = {
        "framework": "floor",
        "workload": args.workload,
        "variant": f"procs={args.procs}",
        "rounds": rounds_n,
        "clients_per_round": clients,
        "round1_s": round(rounds[0], 4),
        "median_round_s": round(med, 4),
        "updates_per_s_steady": round(clients / med, 2),
        "loadavg_1m_start": round(load, 2),
        "round_times": [round(t, 4) for t in rounds],
    }
    print(f"[floor {args.workload} procs={args.procs}] median(rounds 2..)={med:.4f}s  "
          f"round1={rounds[0]:.3f}s", flush=True)
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
