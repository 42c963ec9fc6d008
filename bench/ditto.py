"""Ditto's personal models vs FedAvg's global model and FedAvg + local fine-tuning, under label skew
(Li, Hu, Beirami, Smith, ICML 2021).

The paper's claim: on heterogeneous clients, Ditto's personal models ``v_k`` are more accurate on each
client's own test data than the global FedAvg model, and than the global model fine-tuned locally.
Setting here (generated data, no download): ``synthetic_classification`` with Dirichlet(alpha) labels per
client, 50 clients of 50 samples, 10 a round, 20% of each client's samples held out (the same split for
every method; no method trains on it), 1 local epoch of batch 10 at lr 0.05, an MLP 20-32-10. The same
seed gives every method the same data, initial model and client draws.

Figures, all on every client's held-out part, weighted by held-out samples, after the last round:

* ``fedavg``: FedAvg's global model (``PersonalizedEvaluate``'s figure before fine-tuning);
* ``fedavg+ft``: FedAvg's global model fine-tuned on each client's training part (``PersonalizedEvaluate``,
  ``--ft-epochs`` epochs of SGD at lr 0.05, batch 10);
* ``ditto``: each client's personal model ``v_k`` (lambda ``--lam``, ``--personal-epochs`` passes a round at
  lr 0.05), read from the run's client state; a client never selected has none and is scored with the
  global model (the count is printed).

The defaults (lam 0.5, 3 personal epochs, 60 rounds) come from a small sweep on seeds 0 and 1 over
lam in {0.05, 0.1, 0.5, 1} and 1 or 3 personal epochs; with lam 0.1 and 1 personal epoch, Ditto is 1-5
points below fine-tuning. Each client holds out 10 samples (500 in all): differences of 1-2 points are
within the noise of the held-out set.

Usage (from the repository root)::

    .venv/bin/python bench/ditto.py                          # 3 seeds, alpha 0.1 and 0.3, 60 rounds
    .venv/bin/python bench/ditto.py --seeds 0 --rounds 10 --alphas 0.1
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from flgraph.stages.ditto import personal_models
from flgraph.stages.split import heldout

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st

CLIENTS, PER_ROUND, SAMPLES, HOLDOUT = 50, 10, 50, 0.2
TRAIN = {"clients": PER_ROUND, "epochs": 1, "batch_size": 10, "lr": 0.05, "holdout": HOLDOUT}


def setup(seed: int, alpha: float) -> tuple[fg.data.FederatedDataset, torch.nn.Module]:
    data = fg.data.synthetic_classification(num_clients=CLIENTS, samples_per_client=SAMPLES, num_features=20,
                                            num_classes=10, alpha=alpha, seed=seed)
    torch.manual_seed(seed)
    return data, fg.models.mlp(20, [32], 10)


def fedavg(seed: int, alpha: float, rounds: int, ft_epochs: int, cluster: Any) -> tuple[float, float]:
    """(accuracy of the global model, accuracy after local fine-tuning) on the clients' held-out parts."""
    data, model = setup(seed, alpha)
    pipeline = recipes.fedavg(**TRAIN, evaluate_every=None) >> st.PersonalizedEvaluate(
        every=rounds, holdout=HOLDOUT, epochs=ft_epochs, lr=TRAIN["lr"], finetune_batch_size=10)
    with fg.Run(pipeline, model=model, data=data, seed=seed, cluster=cluster, progress=False, dashboard=False,
                metrics_log=None) as r:
        row = r.fit(rounds)[-1]
    return float(row["personal_accuracy_before"]), float(row["personal_accuracy"])


def ditto(seed: int, alpha: float, rounds: int, lam: float, personal_epochs: int, cluster: Any) -> tuple[float, int]:
    """(accuracy of the personal models on the clients' held-out parts, clients never selected)."""
    data, model = setup(seed, alpha)
    pipeline = recipes.ditto(**TRAIN, lam=lam, personal_epochs=personal_epochs, evaluate_every=None)
    with fg.Run(pipeline, model=model, data=data, seed=seed, cluster=cluster, progress=False, dashboard=False,
                metrics_log=None) as r:
        r.fit(rounds)
        v = personal_models(r)
        w = r.state.params.flat.copy()
    correct = held = 0
    for k in data.client_ids:
        x, y = data.load(int(k))
        ho = heldout(seed, int(k), len(y), HOLDOUT)
        flat = v.get(int(k), w)
        torch.nn.utils.vector_to_parameters(torch.from_numpy(np.asarray(flat, np.float32)), model.parameters())
        model.eval()
        with torch.no_grad():
            correct += int((model(torch.as_tensor(x[ho])).argmax(1) == torch.as_tensor(y[ho])).sum())
        held += int(ho.sum())
    return correct / held, CLIENTS - len(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--personal-epochs", type=int, default=3)
    ap.add_argument("--ft-epochs", type=int, default=5)
    args = ap.parse_args()
    from flgraph.cluster import embedded, embedded_client

    cluster = embedded(2)
    client = embedded_client(cluster)
    try:
        print(f"{'alpha':>5} {'seed':>4} {'fedavg':>7} {'fedavg+ft':>9} {'ditto':>7} {'ditto - best other':>18}"
              f" {'never selected':>14}   (held-out accuracy, all {CLIENTS} clients, after {args.rounds} rounds)")
        for alpha in args.alphas:
            for seed in args.seeds:
                glob, ft = fedavg(seed, alpha, args.rounds, args.ft_epochs, client)
                pers, unseen = ditto(seed, alpha, args.rounds, args.lam, args.personal_epochs, client)
                print(f"{alpha:>5} {seed:>4} {glob:>7.4f} {ft:>9.4f} {pers:>7.4f} {pers - max(glob, ft):>+18.4f}"
                      f" {unseen:>14}", flush=True)
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
