"""What a robust reducer costs the driver with many clients a round: updates held in memory vs streamed to disk.

A round of ``--clients`` clients (default 2,000) of a ``784-256-10`` MLP (203,530 parameters), one local
step of 8 samples each, aggregated by ``--reducer`` (``median``, ``trimmed`` or ``krum``) on an embedded
cluster of 2 workers. Each mode runs in its own process (so one's peak does not hide the other's):

* ``memory``: the budget is set high (``FLGRAPH_ROBUST_MEMORY=1T``): every update is held in memory, the
  driver stacks them and computes;
* ``disk``: the budget is set to 0: each worker appends its updates to the round's files as they are made,
  the driver receives references and finalizes over blocks of coordinates.

Printed per mode: the plan (``run.holding``), round times (round 1 separately: first-touch costs), the
aggregation time (``time_aggregate``: the driver's finalize), and the driver's peak resident memory during
the rounds above its level before them (sampled every 10 ms with ``psutil``), and the final params'
checksum (the disk mode must print the memory mode's for ``median`` and ``trimmed``).

Usage::

    python bench/robust_memory.py                        # both modes, median, 2,000 clients
    python bench/robust_memory.py --reducer krum --clients 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import psutil


class PeakRSS:
    """The process's peak resident memory while running, sampled every 10 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_mode(args: argparse.Namespace) -> dict[str, object]:
    import flgraph as fg
    from flgraph import stages as st

    reducers = {"median": st.Median(), "trimmed": st.TrimmedMean(0.1), "krum": st.Krum(10, m=args.clients // 2)}
    data = fg.data.synthetic_classification(num_clients=args.clients, samples_per_client=8, num_features=784,
                                            num_classes=10, seed=1, test_samples=10)
    pipeline = (st.Select(clients=args.clients) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8, lr=0.05)
                >> st.Aggregate(reducers[args.reducer]))
    with fg.Run(pipeline, model=fg.models.mlp(784, [256], 10, seed=0), data=data, seed=0, workers=2,
                progress=False, evaluate="never", dashboard=False, metrics_log=None) as run:
        plan = [str(h) for h in run.holding]
        run.fit(rounds=1)  # warm: the cluster, torch in the workers, the first touch of every buffer
        with PeakRSS() as rss:
            hist = run.fit(rounds=args.rounds)
        rows = hist.rows[1:]
        flat = run.params.flat
    return {"plan": plan, "place": rows[-1]["updates_held_in"], "held_mib": rows[-1]["updates_held_bytes"] / 2**20,
            "round_s": [round(r["round_time"], 3) for r in rows],
            "aggregate_s": [round(r["time_aggregate"], 3) for r in rows],
            "peak_mib": (rss.peak - rss.base) / 2**20, "peak_abs_mib": rss.peak / 2**20,
            "crc": zlib.crc32(np.ascontiguousarray(flat).tobytes())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--reducer", choices=["median", "trimmed", "krum"], default="median")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds, after one warm-up round")
    ap.add_argument("--mode", choices=["both", "memory", "disk"], default="both")
    args = ap.parse_args()
    if args.mode != "both":
        print(json.dumps(one_mode(args)))
        return
    print(f"{args.clients} clients x 203,530 values ({args.clients * 203_530 * 4 / 2**20:.0f} MiB of updates a "
          f"round), {args.reducer}, 2 workers, {os.cpu_count()} cores")
    results = {}
    for mode, budget in (("memory", "1T"), ("disk", "0")):
        env = {**os.environ, "FLGRAPH_ROBUST_MEMORY": budget}
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--clients", str(args.clients),
                              "--reducer", args.reducer, "--rounds", str(args.rounds)],
                             env=env, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\n[{mode}] ({time.perf_counter() - t0:.0f} s in all)")
        for line in results[mode]["plan"]:
            print("  plan:", line)
        r = results[mode]
        print(f"  held {r['held_mib']:.0f} MiB ({r['place']}); round time {r['round_s']} s; "
              f"aggregate (driver) {r['aggregate_s']} s;\n  driver peak RSS {r['peak_abs_mib']:.0f} MiB, "
              f"{r['peak_mib']:.0f} MiB above its level before the measured rounds; params crc {r['crc']:08x}")
    same = results["memory"]["crc"] == results["disk"]["crc"]
    print(f"\nparams identical in both modes: {same}")
    modes = {m: {k: v for k, v in r.items() if k != "plan"} for m, r in results.items()}
    print("RESULT " + json.dumps({"benchmark": "robust_memory", "reducer": args.reducer, "clients": args.clients,
                                  "values": 203_530, "identical": same, "modes": modes}))


if __name__ == "__main__":
    main()
