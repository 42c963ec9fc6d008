"""Run W1 (or W1-heavy) through flgraph on the embedded Dask cluster and report its timings.

The round is ``w1.pipeline()``: W1's seeded sampler, Broadcast, W1's local SGD step as a ``train_fn``,
and sample-weighted FedAvg, run by ``flgraph.Run(..., seed=0, progress=False, evaluate="never")`` on an
embedded LocalCluster of ``--workers`` single-threaded worker processes. Each round's ``round_time`` comes
from flgraph's history; the final model is evaluated with ``w1.evaluate`` on the test set.

Prints one human line and one ``RESULT {json}`` line with the keys of the shared ``w1common.report``
where they make sense (``round1_s``, ``median_round_s`` over rounds 2..R, ``rounds_total_s``,
``updates_per_s_steady``, ``final_acc`` ...) plus flgraph's per-stage medians over rounds 2..R:
``time_clients_wall`` (driver wall time of the client segment: broadcast, chunk tasks, reduction),
``time_local-train`` (the LocalTrain stage summed over the round's clients, i.e. worker CPU seconds,
data generation included) and ``time_aggregate`` (finalize + apply in the driver).

Usage (from the repository root)::

    .venv/bin/python bench/w1_flgraph.py                       # W1, 20 rounds, 2 workers
    .venv/bin/python bench/w1_flgraph.py --rounds 5
    .venv/bin/python bench/w1_flgraph.py --workload W1-heavy --workers 2 --chunk-size 5

W1 after 20 rounds must end at accuracy 0.7650 (0.1810 after 3 rounds), as in WORKLOAD.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def process_start_epoch() -> float:
    """When this process started (epoch seconds)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return time.time()


class TreeRSS:
    """Peak summed RSS of this process and its descendants (the cluster's nannies and workers).

    A daemon thread samples every ``interval`` seconds (one sample costs about 1.4 ms of the driver's
    time, which also runs the Dask scheduler; every 0.5 s that is 0.3%).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tree-rss")
        self._thread.start()

    def _loop(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = [root]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> float | None:
        """Stop sampling; the peak in MiB (None when psutil is missing)."""
        self._stop.set()
        self._thread.join(timeout=2)
        return self.peak / 2**20 if self.peak else None


def median_over_steady(values: list[float]) -> float:
    """Median over rounds 2..R (all rounds when there is only one)."""
    steady = values[1:] if len(values) > 1 else values
    return float(statistics.median(steady))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start_epoch = process_start_epoch()
    import torch
    import w1

    import flgraph

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="W1", choices=list(w1.WORKLOADS))
    ap.add_argument("--rounds", type=int, default=0, help="rounds (0 = the workload's)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the embedded cluster")
    ap.add_argument("--chunk-size", type=int, default=None, help="clients per Dask task (default: flgraph's)")
    args = ap.parse_args(argv)

    wl = dict(w1.WORKLOADS[args.workload])
    rounds = args.rounds or int(wl["rounds"])
    clients = int(wl["clients"])
    load_start = os.getloadavg()[0]
    rss = TreeRSS()
    model = w1.initial_model(wl["model"])
    pipeline = w1.pipeline(clients=clients, epochs=int(wl["epochs"]))
    run = flgraph.Run(pipeline, model=model, data=w1.dataset(), seed=0, workers=args.workers,
                      chunk_size=args.chunk_size, progress=False, evaluate="never")
    try:
        t_fit = time.time()
        history = run.fit(rounds)
        t_fit_end = time.time()
        final = run.model
        warmup_s = float(run.warmup_s or 0.0)
    finally:
        run.close()

    rows = history.rows
    round_times = [float(r["round_time"]) for r in rows]
    xt, yt = w1.test_data()
    acc, loss = w1.evaluate(final, xt, yt)
    tree_mb = rss.stop()

    rounds_total = sum(round_times)
    med = median_over_steady(round_times)
    first_round_start = t_fit_end - rounds_total  # rounds run back to back at the end of fit()
    stage_keys = [k for k in rows[0] if k.startswith("time_")]
    stage_medians = {k: round(median_over_steady([float(r.get(k, 0.0)) for r in rows]), 4) for k in stage_keys}
    res: dict[str, Any] = {
        "label": os.environ.get("W1_LABEL", ""),
        "framework": "flgraph",
        "workload": args.workload,
        "variant": f"workers={args.workers},chunk={args.chunk_size or 'auto'}",
        "rounds": rounds,
        "clients_per_round": clients,
        "round1_s": round(round_times[0], 4),
        "median_round_s": round(med, 4),
        "rounds_total_s": round(rounds_total, 3),
        "startup_s": round(first_round_start - start_epoch, 3),
        "wall_total_s": round(time.time() - start_epoch, 3),
        "warmup_s": round(warmup_s, 3),
        "cluster_start_s": round(first_round_start - t_fit - warmup_s, 3),
        "updates_per_s_steady": round(clients / med, 2),
        "updates_per_s_overall": round(clients * rounds / rounds_total, 2),
        "peak_rss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_tree_mb": round(tree_mb, 1) if tree_mb is not None else None,
        "final_acc": round(acc, 4),
        "final_loss": round(loss, 4),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "loadavg_1m_start": round(load_start, 2),  # other work on the machine makes timings noisy
        "time_clients_wall": stage_medians.get("time_clients_wall"),
        "time_local-train": stage_medians.get("time_local-train"),
        "time_aggregate": stage_medians.get("time_aggregate"),
        "stage_medians_s": stage_medians,
        "round_times": [round(t, 4) for t in round_times],
    }
    print(f"[flgraph {args.workload} {res['variant']}] round1={res['round1_s']:.3f}s  "
          f"median(rounds 2..)={med:.4f}s  rounds_total={res['rounds_total_s']:.2f}s  "
          f"warmup={res['warmup_s']:.2f}s  wall={res['wall_total_s']:.2f}s  "
          f"updates/s={res['updates_per_s_steady']:.1f}  local-train(sum)={res['time_local-train']}s  "
          f"aggregate={res['time_aggregate']}s  peakRSS tree={res['peak_rss_tree_mb']}MiB  "
          f"acc={acc:.4f} loss={loss:.4f}", flush=True)
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
