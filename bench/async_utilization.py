"""How busy the asynchronous engine keeps the worker slots (target: at least 95%).

A no-op local step that only takes a random real time (``--min-ms`` to ``--max-ms``; no training), on
simulated devices with random durations, ``--concurrency`` clients in flight. Slot occupancy is read from
Dask's own task stream: per worker, the time spent computing client tasks over the span from the first
client task's start to the last one's end.

    .venv/bin/python bench/async_utilization.py [--concurrency 32] [--steps 60] [--workers 2]

Prints the occupancy per worker and one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

import flgraph as fg
from flgraph.sim import DevicePopulation


class SleepStep:
    """A no-op training step that takes a random real time (seeded per client update)."""

    def __init__(self, min_ms: float, max_ms: float) -> None:
        self.min_ms, self.max_ms = min_ms, max_ms

    def __call__(self, model: Any, data: Any, ctx: Any) -> float:
        time.sleep(ctx.rng.uniform(self.min_ms, self.max_ms) / 1000.0)
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--buffer", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--min-ms", type=float, default=20.0)
    ap.add_argument("--max-ms", type=float, default=80.0)
    args = ap.parse_args()

    data = fg.data.synthetic_classification(num_clients=2000, samples_per_client=4, num_features=4, num_classes=2,
                                            seed=0, test_samples=0)
    devices = DevicePopulation.lognormal(data.client_ids, seed=3, speed=5.0, speed_sigma=1.0)
    p = fg.recipes.fedbuff(concurrency=args.concurrency, buffer=args.buffer, devices=devices, evaluate_every=None,
                           train_fn=SleepStep(args.min_ms, args.max_ms))
    with fg.Run(p, model=fg.models.mlp(4, [4], 2), data=data, seed=0, workers=args.workers, progress=False,
                dashboard=False) as run:
        run.fit(rounds=1)  # warm
        client = run._ensure_started().client
        t0 = time.time()
        with __import__("distributed").get_task_stream(client=client) as ts:
            h = run.fit(rounds=args.steps)
        wall = time.time() - t0
    busy: dict[str, float] = defaultdict(float)
    first, last = float("inf"), 0.0
    for task in ts.data:
        if not str(task["key"]).startswith("local-train"):
            continue
        for ss in task["startstops"]:
            if ss["action"] == "compute":
                busy[task["worker"]] += ss["stop"] - ss["start"]
                first, last = min(first, ss["start"]), max(last, ss["stop"])
    span = last - first
    occupancy = {w: b / span for w, b in busy.items()}
    updates = sum(r["clients_done"] + r["clients_stale"] for r in h)
    print(f"{args.workers} workers x 1 slot, {args.concurrency} clients in flight, {args.steps} server steps, "
          f"{updates} updates in {wall:.1f} s wall ({updates / wall:.0f} updates/s)")
    for w, o in sorted(occupancy.items()):
        print(f"  {w}: busy {100 * o:.1f}% of {span:.1f} s")
    mean = sum(occupancy.values()) / max(len(occupancy), 1)
    print(f"mean slot occupancy {100 * mean:.1f}% (target >= 95%)")
    print("RESULT " + json.dumps({"benchmark": "async_utilization", "workers": args.workers,
                                  "concurrency": args.concurrency, "occupancy_mean": round(mean, 4),
                                  "occupancy": {k: round(v, 4) for k, v in occupancy.items()},
                                  "updates_per_s": round(updates / wall, 1)}))


if __name__ == "__main__":
    main()
