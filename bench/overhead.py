"""flgraph's own cost per client: rounds whose local step does nothing.

Each round selects 1,000 or 10,000 clients from a generated population of ``--population`` clients
(default 10,000; each client is 1 sample of 4 features, made on demand), broadcasts the global model,
runs a local step that does no work, and aggregates with ``WeightedMean``. Whatever the round costs is
the framework: selection, task submission, the broadcast, per-client bookkeeping, loading the global
weights into the worker's model, the delta and its finiteness check, the float64 leaf and the
tree reduction, the driver's finalize and apply.

Two no-op local steps (``--steps``):

* ``train_fn``: ``LocalTrain(train_fn=noop_train)``, a train_fn that returns 0.0 without touching the
  model: LocalTrain still loads the global weights, loads the client's data, computes the delta
  ``trained - global`` and checks it is finite (the real per-client path of every W1 client);
* ``zero``: a custom ``ClientStage`` that puts a fresh zero-delta ``Update`` in place without touching
  any model: the engine's bare per-client floor (ClientWork, stage timing, the reducer's leaf and the
  combining, which for a large model are memory traffic over the delta).

Two models: ``small`` = ``flgraph.models.mlp(4, [8], 2)`` (58 parameters) and ``w1`` = W1's 2NN MLP
(199,210 parameters), to separate the per-client cost that scales with the model from the rest.

All configurations run one after the other on ONE embedded cluster (``flgraph.cluster.connect(None)``,
the same cluster ``Run`` would start itself: ``--workers`` single-threaded processes), passed to each
``Run`` as the cluster object (a Run closes a ``distributed.Client`` it is given, but not a cluster). The figure is the
median round time over rounds 2..R divided by the clients per round, in microseconds per client. The
target is <= 200 us per client.

Usage (from the repository root)::

    .venv/bin/python bench/overhead.py                           # both models, 1,000 and 10,000 clients
    .venv/bin/python bench/overhead.py --rounds 3 --clients 1000 --models small
    .venv/bin/python bench/overhead.py --steps train_fn,zero
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import flgraph  # noqa: E402
from flgraph.context import ClientWork, Update  # noqa: E402

TARGET_US = 200.0


# The helpers below are defined in this script: cloudpickle ships functions and classes of ``__main__``
# by value, so the workers need not import this file.
def tiny_client(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``k``: one sample of 4 features (cheap, generated on demand)."""
    return np.full((1, 4), k % 7, dtype=np.float32), np.array([k % 2], dtype=np.int64)


def noop_train(model: Any, data: Any, ctx: Any) -> float:
    """A local step that does nothing: the model keeps the global weights (a zero delta)."""
    return 0.0


class ZeroUpdate(flgraph.ClientStage):
    """A client stage that produces a zero-delta update without touching a model."""

    requires: ClassVar[frozenset[str]] = frozenset({"model"})
    provides: ClassVar[frozenset[str]] = frozenset({"update"})

    def run(self, work: ClientWork) -> None:
        # A fresh buffer per client, as any real stage makes: the reducer may accumulate into it in place.
        delta = np.zeros_like(work.global_params.flat)
        work.update = Update(work.client, 1, work.round - 1, delta, {"loss": 0.0})


def build_model(kind: str) -> Any:
    if kind == "small":
        return flgraph.models.mlp(4, [8], 2)
    import w1

    return w1.initial_model("mlp")


def pipeline(clients: int, step: str) -> Any:
    from flgraph import stages as st

    local: flgraph.ClientStage = ZeroUpdate() if step == "zero" else st.LocalTrain(1, train_fn=noop_train)
    return st.Select(clients=clients) >> st.Broadcast() >> local >> st.Aggregate(st.WeightedMean())


def steady(values: list[float]) -> float:
    return float(statistics.median(values[1:] if len(values) > 1 else values))


def measure(cluster: Any, data: Any, model_kind: str, clients: int, step: str, rounds: int,
            workers: int, chunk_size: int | None) -> dict[str, Any]:
    """One configuration: ``rounds`` rounds on the shared cluster; per-client figures in microseconds."""
    load = os.getloadavg()[0]
    model = build_model(model_kind)
    params = sum(p.numel() for p in model.parameters())
    run = flgraph.Run(pipeline(clients, step), model=model, data=data, seed=0, cluster=cluster,
                      workers=workers, chunk_size=chunk_size, progress=False, evaluate="never")
    try:
        history = run.fit(rounds)
        warmup = float(run.warmup_s or 0.0)
    finally:
        run.close()
    rows = history.rows
    if any(r["clients_done"] != clients for r in rows):
        raise SystemExit(f"a round did not complete all {clients} clients: {[r['clients_done'] for r in rows]}")
    rt = steady([r["round_time"] for r in rows])
    wall = steady([r["time_clients_wall"] for r in rows])
    stage_key = "time_zero-update" if step == "zero" else "time_local-train"
    stage = steady([r.get(stage_key, 0.0) for r in rows])
    return {
        "model": model_kind,
        "params": params,
        "step": step,
        "clients": clients,
        "rounds": rounds,
        "median_round_s": round(rt, 4),
        "us_per_client": round(rt / clients * 1e6, 1),
        "clients_wall_us_per_client": round(wall / clients * 1e6, 1),
        "stage_us_per_client": round(stage / clients * 1e6, 1),  # worker time in the client stage
        "aggregate_s": round(steady([r["time_aggregate"] for r in rows]), 4),
        "select_s": round(steady([r["time_select"] for r in rows]), 4),
        "warmup_s": round(warmup, 3),
        "loadavg_1m_before": round(load, 2),
        "round_times": [round(r["round_time"], 4) for r in rows],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from flgraph.cluster import connect

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1000,10000", help="clients per round, comma-separated")
    ap.add_argument("--population", type=int, default=10_000, help="clients in the generated dataset")
    ap.add_argument("--models", default="small,w1", help="comma-separated: small, w1")
    ap.add_argument("--steps", default="train_fn", help="comma-separated: train_fn, zero")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per configuration (round 1 is not counted)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=None)
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    models = args.models.split(",")
    steps = args.steps.split(",")
    if max(counts) > args.population:
        raise SystemExit(f"--population {args.population} is smaller than {max(counts)} clients per round")
    if not set(models) <= {"small", "w1"} or not set(steps) <= {"train_fn", "zero"}:
        raise SystemExit("--models takes small,w1 and --steps takes train_fn,zero")

    data = flgraph.data.FederatedDataset.from_function(tiny_client, num_clients=args.population, num_samples=1)
    t0 = time.perf_counter()
    handle = connect(None, workers=args.workers)
    print(f"cluster of {args.workers} workers started in {time.perf_counter() - t0:.1f}s", flush=True)
    results: list[dict[str, Any]] = []
    try:
        for step in steps:
            for kind in models:
                for n in counts:
                    r = measure(handle.cluster, data, kind, n, step, args.rounds, args.workers, args.chunk_size)
                    results.append(r)
                    print(f"  {step:8s} {kind:5s} {n:6d} clients: median round {r['median_round_s']:.4f}s "
                          f"= {r['us_per_client']:.1f} us/client  (rounds {r['round_times']})", flush=True)
    finally:
        handle.close()

    print()
    print(f"flgraph per-client overhead: {args.workers} workers, {os.cpu_count()} cpus, "
          f"median of rounds 2..{args.rounds}, target <= {TARGET_US:.0f} us/client")
    head = (f"{'step':8s} {'model':5s} {'params':>8s} {'clients':>7s} {'round (s)':>9s} {'us/client':>9s} "
            f"{'wall us/cl':>10s} {'stage us/cl':>11s} {'target':>6s}")
    print(head)
    for r in results:
        ok = "met" if r["us_per_client"] <= TARGET_US else "NOT"
        print(f"{r['step']:8s} {r['model']:5s} {r['params']:8d} {r['clients']:7d} {r['median_round_s']:9.4f} "
              f"{r['us_per_client']:9.1f} {r['clients_wall_us_per_client']:10.1f} "
              f"{r['stage_us_per_client']:11.1f} {ok:>6s}")
    res = {"benchmark": "overhead", "workers": args.workers, "cpus": os.cpu_count(), "target_us": TARGET_US,
           "population": args.population, "results": results}
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
