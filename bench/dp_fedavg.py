"""DP-FedAvg on W1-sized data: test accuracy against the (epsilon, delta) spent, for a few noise multipliers.

W1's data (1,000 clients of 64 samples, 784 features, 10 classes, Dirichlet(0.5) labels, generated on
demand: ``bench/w1.py``), its 2NN MLP (199,210 parameters) and its local step (1 epoch of plain SGD, lr
0.05, batch 32), run through ``fg.recipes.dp_fedavg``: Poisson sampling with ``q = 0.1`` (100 clients a
round on average), adaptive clipping at the median update norm (Andrew et al.), central Gaussian noise,
epsilon from dp-accounting's RDP accountant (and PLD, printed next to it) at ``delta = 1e-5``. The first
line per seed is FedAvg without clipping or noise on the same data and model (flgraph's uniform choice of
100 clients a round), for reference.

The noise here comes from ``insecure_seed=seed`` so that the figures can be reproduced; a private run
draws its keys from the operating system (the same distribution of noise, not reproducible).

Usage (from the repository root)::

    .venv/bin/python bench/dp_fedavg.py                                # z 0.5 1 2, seeds 0 1, 20 rounds
    .venv/bin/python bench/dp_fedavg.py --noise 1.0 --seeds 0 --rounds 10
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import w1
from flgraph.stages.accounting import epsilon, poisson_event

import flgraph as fg
from flgraph import recipes

Q, DELTA = 0.1, 1e-5


def run(pipeline: Any, seed: int, rounds: int, cluster: Any) -> tuple[list[dict[str, Any]], float]:
    """The history rows and the wall time of ``rounds`` rounds of ``pipeline`` on W1."""
    t0 = time.perf_counter()
    with fg.Run(pipeline, model=w1.initial_model("mlp"), data=w1.dataset(), seed=seed, cluster=cluster,
                progress=False, dashboard=False, metrics_log=None) as r:
        rows = [dict(row) for row in r.fit(rounds)]
    return rows, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    from flgraph.cluster import embedded, embedded_client

    warnings.simplefilter("ignore", fg.stages.InsecureNoiseWarning)  # on purpose: reproducible figures
    cluster = embedded(2)
    client = embedded_client(cluster)
    every = max(1, args.rounds // 4)
    try:
        print(f"W1 data and model, q={Q} (Poisson), {args.rounds} rounds, delta={DELTA:g}; accuracy every "
              f"{every} rounds")
        print(f"{'seed':>4} {'z':>5} {'eps RDP':>8} {'eps PLD':>8} {'final acc':>9} {'clip C':>7} {'time s':>7}  "
              "accuracy by round")
        for seed in args.seeds:
            base = recipes.fedavg(clients=round(Q * w1.NUM_CLIENTS), train_fn=w1.train_fn, evaluate_every=every)
            rows, dt = run(base, seed, args.rounds, client)
            curve = " ".join(f"{r['round']}:{r['accuracy']:.3f}" for r in rows if "accuracy" in r)
            print(f"{seed:>4} {'none':>5} {'inf':>8} {'inf':>8} {rows[-1]['accuracy']:>9.4f} {'-':>7} {dt:>7.1f}  "
                  f"{curve}", flush=True)
            for z in args.noise:
                p = recipes.dp_fedavg(fraction=Q, noise_multiplier=z, clip=0.5, target_delta=DELTA,
                                      train_fn=w1.train_fn, evaluate_every=every, insecure_seed=seed)
                rows, dt = run(p, seed, args.rounds, client)
                pld = epsilon([(poisson_event(Q, z), args.rounds)], DELTA, method="pld")
                curve = " ".join(f"{r['round']}:{r['accuracy']:.3f}" for r in rows if "accuracy" in r)
                print(f"{seed:>4} {z:>5.2f} {rows[-1]['epsilon']:>8.3f} {pld:>8.3f} {rows[-1]['accuracy']:>9.4f} "
                      f"{rows[-1]['dp_clip_norm']:>7.3f} {dt:>7.1f}  {curve}", flush=True)
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
