"""SCAFFOLD vs FedAvg under strong label skew: rounds to a target accuracy (Karimireddy et al., ICML 2020).

The paper's claim: with heterogeneous clients and several local epochs, client drift slows FedAvg, and
SCAFFOLD's control variates correct it, so SCAFFOLD reaches a given accuracy in fewer rounds. Setting here
(generated data, no download): ``synthetic_classification`` with Dirichlet(alpha=0.1) labels per client
(most clients see one or two classes), 100 clients, 10 a round, 5 local epochs of batch 16 at lr 0.05,
an MLP 20-32-10; the same seed gives both algorithms the same data, initial model and client draws.
Prints, per seed, the first round at which each reaches each target test accuracy and the accuracy
after the last round.

Usage (from the repository root)::

    .venv/bin/python bench/scaffold.py                      # 3 seeds, 40 rounds, targets 0.30 0.35 0.40
    .venv/bin/python bench/scaffold.py --seeds 0 --rounds 20 --targets 0.3
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import flgraph as fg
from flgraph import recipes

SETTINGS = {"clients": 10, "epochs": 5, "batch_size": 16, "lr": 0.05}


def run(recipe: Any, seed: int, rounds: int, cluster: Any) -> list[float]:
    """The test accuracy after each round."""
    data = fg.data.synthetic_classification(num_clients=100, samples_per_client=64, num_features=20,
                                            num_classes=10, alpha=0.1, seed=seed, test_samples=2000)
    torch.manual_seed(seed)
    model = fg.models.mlp(20, [32], 10)
    with fg.Run(recipe(**SETTINGS, evaluate_every=1), model=model, data=data, seed=seed, cluster=cluster,
                progress=False, dashboard=False, metrics_log=None) as r:
        return [float(row["accuracy"]) for row in r.fit(rounds)]


def first(curve: list[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy reaches ``target``."""
    hits = [i for i, a in enumerate(curve, 1) if a >= target]
    return hits[0] if hits else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.30, 0.35, 0.40])
    args = ap.parse_args()
    from flgraph.cluster import embedded, embedded_client

    cluster = embedded(2)
    client = embedded_client(cluster)
    try:
        heads = " ".join(f"{'to ' + format(t, '.2f'):>8}" for t in args.targets)
        print(f"{'seed':>4} {'algorithm':>9} {heads} {'final acc':>9} {'best acc':>8}  (rounds to each accuracy)")
        for seed in args.seeds:
            for name, recipe in (("fedavg", recipes.fedavg), ("scaffold", recipes.scaffold)):
                curve = run(recipe, seed, args.rounds, client)
                hits = " ".join(f"{first(curve, t) or '-':>8}" for t in args.targets)
                print(f"{seed:>4} {name:>9} {hits} {curve[-1]:>9.4f} {max(curve):>8.4f}", flush=True)
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
