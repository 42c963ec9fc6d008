"""W1 on the bare loop, the floor and flgraph, taking turns every few rounds: ratios that hold on a noisy VM.

``compare_w1.py`` runs each side for a whole run, one after the other. On a shared VM the machine's speed
drifts by 20-60% from one minute to the next, and the ratio of two runs taken minutes apart drifts with it.
Here the three sides stay alive side by side and take turns every ``--block`` rounds (default 5):

* **bare**: one process running the shared ``w1common``'s functions in ``bare_loop.py``'s order (for each
  client: ``client_data``, ``set_weights``, ``local_train``, ``get_weights``; then ``fedavg``), torch on one
  thread: the reference of the 0.6x target;
* **floor**: ``--workers`` plain processes in lock step, ``floor_w1.py``'s loop (the same client work, no
  framework, nothing aggregated): the best any orchestration of that many processes can do;
* **flgraph**: ``Run.fit(block)`` of W1 on an embedded cluster of ``--workers`` single-threaded workers
  (``w1_flgraph.py``'s run), each round's ``round_time`` from the history.

Only one side works at a time; the others wait on a pipe (the bare and floor processes use no CPU then;
flgraph's idle cluster keeps about 3.5% of one core busy with Dask's heartbeats and monitors, which the
floor's two processes feel most: its figures may be 1-2% slower than alone, flgraph/floor that much lower). A
first, uncounted set warms every side up (torch's first steps, the cluster's first rounds). A *set* is one
block of each side, in the order bare, floor, flgraph, then reversed in the next set, so that a steady drift
of the machine's speed weighs on every side alike. Each block's figure is the median of its rounds after the
first (the first round of a block is also the first of a ``fit``, with nothing prepared ahead). The ratios are
taken within each set (seconds apart) and their median over the sets is reported, with the lowest and highest.
Noise only ever slows a block down, so the ratios of each side's *fastest* block are reported too: the sides
as they run on a quiet machine. The floor's fastest block against the bare loop's says whether the machine
gave two processes two cores at all during the run (at most 0.55x). Above 0.6x no orchestration of two
processes could reach the 0.6x target and the figure to read is flgraph / floor; below, the script says how
close to the floor 0.6x requires.

Both W1 runs go on from round to round across blocks; after round 20 the bare loop and flgraph are both
evaluated on the test set (W1: accuracy 0.7650 on both), when ``--block`` divides 20. Exit 1 when that
accuracy is not met.

Usage (from the repository root)::

    .venv/bin/python bench/paired_w1.py                 # W1, 10 sets of 5 rounds each
    .venv/bin/python bench/paired_w1.py --sets 16 --block 4
    .venv/bin/python bench/paired_w1.py --sets 24 --block 4 --csv notebooks/data/w1_paired.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
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

EXPECTED_ACC_AT_20 = {"W1": 0.7650}
SIDES = ("bare", "floor", "flgraph")


def bare_serve(shared: str, workload: str, conn: Any) -> None:
    """The bare loop, kept alive: ``(first, last)`` on ``conn`` runs those rounds as ``bare_loop.py`` does
    and sends back the seconds of each; ``"evaluate"`` sends (accuracy, loss) of the current global
    weights; None ends it."""
    sys.path.insert(0, shared)
    import torch
    import w1common as w

    torch.set_num_threads(1)
    wl = w.WORKLOADS[workload]
    model = w.initial_model(wl["model"])
    global_w = w.get_weights(model)
    conn.send("ready")
    while (asked := conn.recv()) is not None:
        if asked == "evaluate":
            w.set_weights(model, global_w)
            xt, yt = w.test_data()
            conn.send(w.evaluate(model, xt, yt))
            continue
        times: list[float] = []
        for rnd in range(asked[0], asked[1] + 1):
            ts = time.perf_counter()
            results = []
            for k in w.sample_clients(rnd, wl["clients_per_round"]):
                x, y = w.client_data(k)
                w.set_weights(model, global_w)
                w.local_train(model, x, y, wl["epochs"], rnd, k)
                results.append((w.get_weights(model), len(y)))
            global_w = w.fedavg(results)
            times.append(time.perf_counter() - ts)
        conn.send(times)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def write_csv(path: Path, sets: list[dict[str, Any]]) -> None:
    """One row a set: its rounds, each side's steady median and the three ratios."""
    cols = ["set", "first_round", "last_round", "bare_s", "floor_s", "flgraph_s", "flgraph_bare", "floor_bare",
            "flgraph_floor", "order"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(cols)
        for row in sets:
            out.writerow([row["set"], *row["rounds"], *(row[c] for c in cols[3:9]), "-".join(row["order"])])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import w1
    from check_w1 import shared_bench_dir
    from compare_w1 import CALM_FLOOR  # two processes got two cores: the floor's fastest block at most this x bare
    from floor_w1 import serve
    from w1_flgraph import median_over_steady

    import flgraph

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="W1", choices=list(w1.WORKLOADS))
    ap.add_argument("--sets", type=int, default=10, help="sets of blocks (one block of each side a set)")
    ap.add_argument("--block", type=int, default=5, help="rounds a block (at least 3: a block's first is left out)")
    ap.add_argument("--workers", type=int, default=2, help="flgraph's worker processes and the floor's processes")
    ap.add_argument("--csv", type=Path, default=None,
                    help="also write one row a set here (notebooks/w1_performance.ipynb plots "
                         "notebooks/data/w1_paired.csv)")
    args = ap.parse_args(argv)
    if args.block < 3 or args.sets < 1:
        raise SystemExit("--block must be at least 3 (a block's first round is left out) and --sets at least 1")

    wl = w1.WORKLOADS[args.workload]
    ctx = mp.get_context("spawn")
    bare_conn, bare_end = ctx.Pipe()
    bare = ctx.Process(target=bare_serve, args=(str(shared_bench_dir()), args.workload, bare_end), daemon=True)
    barrier = ctx.Barrier(args.workers)
    floor_conns, floors = [], []
    for i in range(args.workers):
        conn, end = ctx.Pipe()
        floors.append(ctx.Process(target=serve, args=(i, args.workers, args.workload, barrier, end), daemon=True))
        floor_conns.append(conn)
    for p in [bare, *floors]:
        p.start()
    for conn in [bare_conn, *floor_conns]:
        try:
            ready = conn.recv()
        except EOFError:
            ready = None
        if ready != "ready":
            raise SystemExit("a bare-loop or floor process did not start (its error is above)")

    run = flgraph.Run(w1.pipeline(clients=int(wl["clients"]), epochs=int(wl["epochs"])),
                      model=w1.initial_model(wl["model"]), data=w1.dataset(), seed=0, workers=args.workers,
                      progress=False, evaluate="never")
    xt, yt = w1.test_data()
    acc: dict[str, float] = {}

    def block(side: str, first: int, last: int) -> list[float]:
        if side == "bare":
            bare_conn.send((first, last))
            return list(bare_conn.recv())
        if side == "floor":
            for conn in floor_conns:
                conn.send((first, last))
            per_proc = [conn.recv() for conn in floor_conns]
            return [max(t) for t in zip(*per_proc)]
        rows = run.fit(last - first + 1).rows[-(last - first + 1):]
        return [float(r["round_time"]) for r in rows]

    sets: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    t_start = time.perf_counter()
    try:
        for s in range(-1, args.sets):  # set -1 warms every side up (torch, the cluster's first rounds)
            first, last = (s + 1) * args.block + 1, (s + 2) * args.block
            order = SIDES if s % 2 == 0 else SIDES[::-1]
            times = {side: block(side, first, last) for side in order}
            if last == 20:
                bare_conn.send("evaluate")
                acc["bare"] = round(float(bare_conn.recv()[0]), 4)
                acc["flgraph"] = round(float(w1.evaluate(run.model, xt, yt)[0]), 4)
                print(f"after round 20: accuracy bare {acc['bare']:.4f}, flgraph {acc['flgraph']:.4f}", flush=True)
            if s < 0:
                continue
            med = {side: median_over_steady(times[side]) for side in SIDES}  # the block's rounds after its first
            row = {"set": s + 1, "rounds": [first, last], **{f"{k}_s": round(v, 4) for k, v in med.items()},
                   "flgraph_bare": round(med["flgraph"] / med["bare"], 4),
                   "floor_bare": round(med["floor"] / med["bare"], 4),
                   "flgraph_floor": round(med["flgraph"] / med["floor"], 4),
                   "order": list(order)}
            sets.append(row)
            print(f"set {s + 1:2d} rounds {first:3d}-{last:3d}  bare {med['bare']:.4f}s  floor {med['floor']:.4f}s  "
                  f"flgraph {med['flgraph']:.4f}s   flgraph/bare {row['flgraph_bare']:.3f}  "
                  f"floor/bare {row['floor_bare']:.3f}  flgraph/floor {row['flgraph_floor']:.3f}", flush=True)
    finally:
        run.close()
        for conn in [bare_conn, *floor_conns]:
            with contextlib.suppress(OSError):  # a process that died has closed its end
                conn.send(None)
        for p in [bare, *floors]:
            p.join(timeout=30)

    ratios = {k: summary([row[k] for row in sets]) for k in ("flgraph_bare", "floor_bare", "flgraph_floor")}
    best = {side: min(row[f"{side}_s"] for row in sets) for side in SIDES}
    best_ratios = {"flgraph_bare": round(best["flgraph"] / best["bare"], 4),
                   "floor_bare": round(best["floor"] / best["bare"], 4),
                   "flgraph_floor": round(best["flgraph"] / best["floor"], 4)}
    seconds = {side: summary([row[f"{side}_s"] for row in sets]) for side in SIDES}
    expected = EXPECTED_ACC_AT_20.get(args.workload)
    acc_ok = not acc or expected is None or all(abs(v - expected) < 5e-5 for v in acc.values())
    res: dict[str, Any] = {
        "benchmark": "paired_w1", "workload": args.workload, "sets": args.sets, "block": args.block,
        "workers": args.workers, "ratios": ratios, "seconds": seconds,
        "fastest_block_ratios": best_ratios, "two_cores": best_ratios["floor_bare"] <= CALM_FLOOR,
        "bare_drift": round(seconds["bare"]["max"] / seconds["bare"]["min"] - 1, 3),
        "target_ratio": 0.6, "target_met": ratios["flgraph_bare"]["median"] <= 0.6,
        "accuracy_after_20": acc, "expected_acc": expected, "acc_ok": acc_ok,
        "loadavg_1m_start": round(load, 2), "wall_s": round(time.perf_counter() - t_start, 1), "per_set": sets,
    }
    if args.csv is not None:
        write_csv(args.csv, sets)
    r = ratios
    print(f"\nW1 paired: {args.sets} sets of {args.block} rounds, flgraph on {args.workers} workers, "
          f"{os.cpu_count()} cpus, {res['wall_s']} s")
    print(f"  flgraph/bare  median {r['flgraph_bare']['median']:.3f}  (sets: {r['flgraph_bare']['min']:.3f}-"
          f"{r['flgraph_bare']['max']:.3f})  target <= 0.6: {'met' if res['target_met'] else 'NOT met'}")
    print(f"  floor/bare    median {r['floor_bare']['median']:.3f}  (sets: {r['floor_bare']['min']:.3f}-"
          f"{r['floor_bare']['max']:.3f})")
    print(f"  flgraph/floor median {r['flgraph_floor']['median']:.3f}  (sets: {r['flgraph_floor']['min']:.3f}-"
          f"{r['flgraph_floor']['max']:.3f})")
    b = best_ratios
    print(f"  fastest blocks: flgraph/bare {b['flgraph_bare']:.3f}, floor/bare {b['floor_bare']:.3f}, "
          f"flgraph/floor {b['flgraph_floor']:.3f}")
    floor_best = b["floor_bare"]
    if floor_best > 0.6:
        print(f"  the floor's fastest block was {floor_best:.3f}x the bare loop's: no framework could reach 0.6x "
              "on the machine as it was; read flgraph/floor")
    else:
        print(f"  the floor's fastest block was {floor_best:.3f}x the bare loop's: 0.6x needs flgraph within "
              f"{100 * (0.6 / floor_best - 1):.0f}% of the floor" + ("" if res["two_cores"] else
              f" (the machine gave two processes less than two cores: floor > {CALM_FLOOR}x)"))
    print(f"  the bare loop's block medians drifted by {100 * res['bare_drift']:.0f}% over the run "
          f"({seconds['bare']['min']:.4f}-{seconds['bare']['max']:.4f} s)")
    if acc:
        print(f"  accuracy after round 20: bare {acc['bare']:.4f}, flgraph {acc['flgraph']:.4f} "
              f"(expected {expected}): {'ok' if acc_ok else 'WRONG'}")
    print("RESULT " + json.dumps(res), flush=True)
    if not acc_ok:
        raise SystemExit(1)
    return res


if __name__ == "__main__":
    main()
