"""Work sharing between a round's chunks (``flgraph/local/sharing.py``), on and off, on W1 and on unbalanced clients.

Two workloads, each run with sharing on and with ``FLGRAPH_SHARE_WORK=0``, alternately, ``--repeats``
times, in fresh processes (each its own embedded cluster of ``--workers`` workers):

* ``W1``: the reference workload (``w1.py``): every client has 64 samples, so the chunks differ only by
  the machine's noise;
* ``unbalanced``: W1's model and training step on a population of 400 clients whose sample counts
  follow a log-normal law (seeded; here 5 to 366 samples, median 45, mean 61), 100 clients a round: a chunk's work then
  depends on which clients it drew, as with real federated data (Dirichlet or natural partitions).

Prints, per workload and setting, the median round time over rounds 2..R of each run, the median over the
runs, and the ratio on/off; then one ``RESULT {json}`` line. The final params are checked to be
bit-identical with sharing on and off (the reduction tree is fixed: see ``flgraph/tree.py``).

Usage (from the repository root)::

    .venv/bin/python bench/work_sharing.py [--repeats 3] [--rounds 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def unbalanced_dataset(population: int = 400, seed: int = 0) -> Any:
    """W1-like clients (784 features, 10 classes, Dirichlet(0.5) labels) with log-normal sample counts."""
    import numpy as np

    import flgraph as fg

    rng = np.random.default_rng([7, seed])
    sizes = np.clip(np.round(rng.lognormal(mean=np.log(48), sigma=0.9, size=population)), 5, 640).astype(int)
    mu = np.random.default_rng(0).standard_normal((10, 784)).astype(np.float32)
    xs, ys = [], []
    for k, size in enumerate(sizes):
        r = np.random.default_rng([1, k])
        p = r.dirichlet([0.5] * 10)
        y = r.choice(10, size=int(size), p=p)
        xs.append(0.3 * mu[y] + r.standard_normal((int(size), 784), dtype=np.float32))
        ys.append(y.astype(np.int64))
    keys = np.repeat(np.arange(population), sizes)
    return fg.data.FederatedDataset.from_arrays(np.concatenate(xs), np.concatenate(ys), fg.data.by_key(keys))


def one_run(workload: str, rounds: int, workers: int) -> dict[str, Any]:
    """One run in this process; the sharing setting comes from FLGRAPH_SHARE_WORK."""
    import w1

    import flgraph as fg
    from flgraph import stages as st

    if workload == "W1":
        data, pipeline = w1.dataset(), w1.pipeline(clients=100, epochs=1)
    else:  # flgraph's own seeded sampler over the 400 clients, W1's local step
        data = unbalanced_dataset()
        pipeline = (st.Select(clients=100) >> st.Broadcast() >> st.LocalTrain(1, train_fn=w1.train_fn)
                    >> st.Aggregate(st.WeightedMean()))
    run = fg.Run(pipeline, model=w1.initial_model("mlp"), data=data, seed=0,
                 workers=workers, progress=False, evaluate="never")
    with run:
        history = run.fit(rounds)
        times = [row["round_time"] for row in history.rows[1:]]
        digest = hashlib.sha256(run.params.flat.tobytes()).hexdigest()[:16]
    return {"median_round_s": statistics.median(times), "params_sha256": digest}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("WORKLOAD", "SHARE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        out = one_run(args.one[0], args.rounds, args.workers)
        print("RUN " + json.dumps(out), flush=True)
        return out
    result: dict[str, Any] = {"benchmark": "work_sharing", "rounds": args.rounds, "workers": args.workers}
    for workload in ("W1", "unbalanced"):
        runs: dict[str, list[float]] = {"on": [], "off": []}
        digests: set[str] = set()
        for i in range(args.repeats):
            for share in ("on", "off") if i % 2 == 0 else ("off", "on"):
                env = {**os.environ, "FLGRAPH_SHARE_WORK": "1" if share == "on" else "0"}
                proc = subprocess.run([sys.executable, __file__, "--one", workload, share, "--rounds",
                                       str(args.rounds), "--workers", str(args.workers)],
                                      env=env, capture_output=True, text=True, timeout=900, check=True)
                line = next(x for x in proc.stdout.splitlines() if x.startswith("RUN "))
                out = json.loads(line[4:])
                runs[share].append(out["median_round_s"])
                digests.add(out["params_sha256"])
                print(f"  {workload:<10} sharing {share:<3} run {i + 1}: median round {out['median_round_s']:.4f} s",
                      flush=True)
        on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
        print(f"{workload:<10} sharing on {on:.4f} s, off {off:.4f} s: on/off = {on / off:.3f}; "
              f"final params identical: {len(digests) == 1}", flush=True)
        result[workload] = {"on": runs["on"], "off": runs["off"], "ratio_on_off": round(on / off, 3),
                            "params_identical": len(digests) == 1}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
