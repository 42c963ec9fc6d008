"""FedBuff against synchronous FedAvg on simulated devices: simulated time to a target accuracy.

A population of 1,000 clients with log-normal device speeds (spread well over 10x) and bandwidths.
Synchronous FedAvg selects ``concurrency`` clients per round and waits for the slowest; FedBuff keeps the
same number in flight and steps every ``buffer`` arrivals. Both run on flgraph's virtual clock, so the
figures are simulated seconds, reproducible from the seed.

    .venv/bin/python bench/fedbuff_vs_fedavg.py [--concurrency 100] [--target 0.6] [--csv PATH]

Prints the time each reaches the target, the factor, and one ``RESULT {json}`` line; ``--csv`` writes the
accuracy curves (notebooks/fedbuff_vs_fedavg.ipynb plots them).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import flgraph as fg
from flgraph import stages as st
from flgraph.sim import DevicePopulation


def curve(history: fg.History) -> list[tuple[float, float]]:
    return [(r["sim_time"], r["accuracy"]) for r in history if "accuracy" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--buffer", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30, help="FedAvg rounds")
    ap.add_argument("--steps", type=int, default=150, help="FedBuff server steps")
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args()

    data = fg.data.synthetic_classification(num_clients=args.clients, samples_per_client=32, num_features=20,
                                            num_classes=5, alpha=0.5, seed=0, signal=0.6, test_samples=1000)
    devices = DevicePopulation.lognormal(data.client_ids, seed=1, speed=20.0, speed_sigma=1.0,
                                         down_bps=2.5e5, up_bps=1.0e5)
    speeds = sorted(p.speed for p in devices.profiles.values())
    spread = speeds[int(0.95 * len(speeds))] / speeds[int(0.05 * len(speeds))]
    common: dict[str, Any] = {"model": fg.models.mlp(20, [32], 5, seed=0), "data": data, "seed": 0,
                              "workers": args.workers, "progress": False, "dashboard": False}

    histories: dict[str, fg.History] = {}
    for name, over in (("fedavg", 1.0), ("fedavg-over1.3", 1.3)):
        sync = (st.Select(clients=args.concurrency, over_select=over) >> st.Simulate(devices) >> st.Broadcast()
                >> st.LocalTrain(batch_size=8, lr=0.05) >> st.Aggregate() >> st.Evaluate(every=1))
        with fg.Run(sync, **common) as run:
            histories[name] = run.fit(rounds=args.rounds)
    fedbuff = fg.recipes.fedbuff(concurrency=args.concurrency, buffer=args.buffer, devices=devices,
                                 batch_size=8, lr=0.05, evaluate_every=5)
    with fg.Run(fedbuff, **common) as run:
        histories["fedbuff"] = run.fit(rounds=args.steps)

    print(f"population {args.clients} clients, device speed spread (95th/5th percentile) {spread:.1f}x, "
          f"{args.concurrency} clients in flight / per round")
    curves = {k: curve(h) for k, h in histories.items()}
    reach: dict[str, dict[str, Any]] = {}
    for name, h in histories.items():
        c = curves[name]
        t = h.time_to(args.target)
        updates = None
        if t is not None:
            updates = sum(r["clients_done"] + r.get("clients_stale", 0) for r in h if r["sim_time"] <= t)
        reach[name] = {"time_s": t, "client_updates": updates, "final_acc": c[-1][1], "end_s": c[-1][0]}
        reached = f"{t / 60:.1f} simulated min, {updates} client updates" if t is not None else "not reached"
        print(f"{name:15s} final accuracy {c[-1][1]:.4f} at {c[-1][0] / 60:.1f} simulated min; "
              f"target {args.target}: {reached}")
    t_sync, t_buff = reach["fedavg"]["time_s"], reach["fedbuff"]["time_s"]
    c_sync, c_buff = curves["fedavg"], curves["fedbuff"]
    factor = (t_sync / t_buff) if (t_sync and t_buff) else None
    t_over = reach["fedavg-over1.3"]["time_s"]
    if factor:
        print(f"FedBuff reaches {args.target} {factor:.2f}x sooner in simulated time than synchronous FedAvg"
              + (f" ({t_over / t_buff:.2f}x sooner than FedAvg with over-selection)" if t_over else ""))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "sim_time_s", "accuracy"])
            w.writerows([(name, t, a) for name, c in curves.items() for t, a in c])
    print("RESULT " + json.dumps({"benchmark": "fedbuff_vs_fedavg", "clients": args.clients,
                                  "speed_spread_p95_p5": round(spread, 1), "concurrency": args.concurrency,
                                  "target": args.target, "fedavg_time_to_target_s": t_sync,
                                  "fedbuff_time_to_target_s": t_buff, "factor": factor,
                                  "fedavg_final_acc": c_sync[-1][1], "fedbuff_final_acc": c_buff[-1][1],
                                  "reach": reach}))


if __name__ == "__main__":
    main()
