"""Does memory grow over a long run? RSS of the driver, the scheduler and the workers every N rounds.

A tiny model, 10 clients a round, a snapshot every round: each round costs almost nothing, so whatever a
round leaves behind shows up as growth. Every ``--every`` rounds it prints the RSS of the driver, the
scheduler and the workers together, and the Python objects that became more numerous on the workers
(``gc`` counts by type), and how many entries the workers' profile history holds. With ``--trace`` the
workers (and the driver) run ``tracemalloc`` from the first report on, and the end prints the source lines
whose allocations grew the most. ``--dask KEY=VALUE`` sets a Dask config value for the embedded cluster
(e.g. ``distributed.worker.profile.enabled=False``).

    .venv/bin/python bench/memory_growth.py [--rounds 1500] [--every 250] [--trace] [--no-checkpoint] [--window N]

What grows, and where it stops: the driver's History holds at most ``History.default_window`` rows (older
ones are read back from the run directory). Each worker's statistical profiler keeps one profile tree per
``distributed.worker.profile.cycle`` (1 s) in ``Worker.profile_history`` and ``profile_keys_history``,
deques bounded by ``distributed.admin.low-level-log-length`` (1000): they fill during the first ~17 minutes
of a run, whatever its rounds, then stay. The scheduler's and workers' transition and event logs are
deques bounded by the same setting or by ``distributed.admin.log-length`` (10,000).

Prints one ``RESULT {json}`` line: MB per report, and the growth in KB a round after the first report
(the first rounds pay imports and warm-up).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import dask
import psutil

import flgraph as fg
from flgraph import stages as st

MB = 2**20


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def type_counts() -> dict[str, int]:
    gc.collect()
    return dict(collections.Counter(type(o).__qualname__ for o in gc.get_objects()))


def trace_start() -> None:
    tracemalloc.start(4)


def trace_top(limit: int = 12) -> list[str]:
    """Source lines whose allocated size grew the most since :func:`trace_start` (kept as a baseline)."""
    global _BASE
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    if "_BASE" not in globals():
        _BASE = snap
        return []
    stats = snap.compare_to(_BASE, "lineno")
    return [str(s) for s in stats[:limit]]


def profile_entries(dask_worker: Any) -> int:
    return len(dask_worker.profile_history)


def grown(now: dict[str, int], before: dict[str, int], limit: int = 8) -> list[tuple[str, int]]:
    d = [(k, v - before.get(k, 0)) for k, v in now.items() if v - before.get(k, 0) > 0]
    return sorted(d, key=lambda kv: -kv[1])[:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1500)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trace", action="store_true", help="tracemalloc on the workers and the driver")
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--window", type=int, default=None, help="History.default_window (rows kept in memory)")
    ap.add_argument("--dask", action="append", default=[], metavar="KEY=VALUE",
                    help="a Dask config value for the embedded cluster (repeatable)")
    args = ap.parse_args()
    for kv in args.dask:
        key, _, value = kv.partition("=")
        dask.config.set({key: {"True": True, "False": False}.get(value, value)})
    if args.window:
        fg.History.default_window = args.window
    t0 = time.perf_counter()

    data = fg.data.synthetic_classification(num_clients=100, samples_per_client=8, num_features=8,
                                            num_classes=3, seed=0, test_samples=30)
    pipeline = (st.Select(clients=10) >> st.Broadcast() >> st.LocalTrain(batch_size=8, lr=0.1)
                >> st.Aggregate(st.WeightedMean()))
    tmp = tempfile.TemporaryDirectory(prefix="flgraph-memory-")
    checkpoint = None if args.no_checkpoint else Path(tmp.name) / "run.zarr"
    reports: list[dict[str, Any]] = []
    with fg.Run(pipeline, model=fg.models.mlp(8, [8], 3), data=data, seed=0, workers=args.workers,
                progress=False, evaluate="never", checkpoint=checkpoint, checkpoint_every=1) as run:
        run.fit(rounds=args.every)
        assert run._handle is not None
        client = run._handle.client
        if args.trace:
            client.run(trace_start)
            client.run(trace_top)
            trace_start()
            trace_top()
        counts: dict[str, dict[str, int]] = client.run(type_counts)
        driver_counts = type_counts()
        while True:
            workers = client.run(rss)
            row = {"round": run.round, "seconds": round(time.perf_counter() - t0),
                   "driver_mb": rss() / MB, "scheduler_mb": client.run_on_scheduler(rss) / MB,
                   "workers_mb": sum(workers.values()) / MB,
                   "history_in_memory": len(getattr(run.history, "recent", run.history)),
                   "profile_entries": max(client.run(profile_entries).values())}
            reports.append(row)
            now = client.run(type_counts)
            driver_now = type_counts()
            more = {w.rsplit(":", 1)[-1]: grown(now[w], counts.get(w, {}), 5) for w in now}
            print(f"round {row['round']:5d}  {row['seconds']:5d} s  driver {row['driver_mb']:7.1f} MB  "
                  f"scheduler {row['scheduler_mb']:7.1f} MB  workers {row['workers_mb']:7.1f} MB  "
                  f"history rows in memory {row['history_in_memory']}  profile entries {row['profile_entries']}  "
                  f"objects grown: driver {grown(driver_now, driver_counts, 5)} workers {more}", flush=True)
            counts, driver_counts = now, driver_now
            if run.round >= args.rounds:
                break
            run.fit(rounds=min(args.every, args.rounds - run.round))
        if args.trace:
            for w, lines in client.run(trace_top).items():
                print(f"\nworker {w}: allocations grown most since round {args.every}")
                print("\n".join("  " + s for s in lines))
            print("\ndriver: allocations grown most")
            print("\n".join("  " + s for s in trace_top()))
        history_rows_in_memory = len(getattr(run.history, "recent", run.history))
    first, last = reports[0], reports[-1]
    span = max(1, last["round"] - first["round"])
    result = {"rounds": args.rounds, "reports": reports, "history_rows_in_memory": history_rows_in_memory,
              "kb_per_round": {k: (last[k] - first[k]) * 1024 / span for k in ("driver_mb", "scheduler_mb",
                                                                                "workers_mb")}}
    print("RESULT " + json.dumps(result))
    tmp.cleanup()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
