"""FedNova vs FedAvg under heterogeneous local work: the global training loss they converge to (Wang et al.,
NeurIPS 2020).

The paper's claim: when clients do different numbers of local steps ``tau_i``, FedAvg's update weights
client i's objective by ``p_i tau_i`` instead of ``p_i``, so it converges to the stationary point of an
inconsistent objective; FedNova normalises each update by ``tau_i`` and reaches a lower value of the true
objective ``F(x) = sum_i p_i F_i(x)``. Setting here (generated data, no download): the FedProx paper's
Synthetic(1, 1) (30 devices with power-law sample counts, multinomial logistic regression 60 -> 10), each
round ``--clients`` devices, each drawing its epochs uniformly in ``--epochs LOW HIGH`` per round (so
``tau_i = E_i ceil(n_i / B)`` varies with both the draw and the device's size), batch 10, lr 0.01; the same
seed gives both algorithms the same data, initial model, client draws and epoch draws. Prints, per seed,
the global model's loss over all devices' training data (``F(x)``, sample-weighted) at four points of the
run, and the final test accuracy.

Usage (from the repository root)::

    .venv/bin/python bench/fednova.py                       # 3 seeds, 200 rounds
    .venv/bin/python bench/fednova.py --seeds 0 --rounds 40
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st
from flgraph.graph import Pipeline


def fedavg(clients: int, epochs: tuple[int, int], batch_size: int, lr: float) -> Pipeline:
    """FedAvg with the same heterogeneous work as :func:`flgraph.recipes.fednova`'s ``epochs=(low, high)``."""
    p = recipes.fedavg(clients, epochs=epochs[1], batch_size=batch_size, lr=lr, evaluate_every=None)
    return Pipeline([p.stages[0], st.RandomEpochs(*epochs), *p.stages[1:]])


def fednova(clients: int, epochs: tuple[int, int], batch_size: int, lr: float) -> Pipeline:
    return recipes.fednova(clients, epochs=epochs, batch_size=batch_size, lr=lr, evaluate_every=None)


def train_loss(flat: np.ndarray, model: torch.nn.Module, data: fg.data.FederatedDataset) -> float:
    """``F(x)``: the mean cross-entropy of the model ``flat`` over every device's training samples."""
    torch.nn.utils.vector_to_parameters(torch.from_numpy(flat.copy()), model.parameters())
    total, n = 0.0, 0
    with torch.no_grad():
        for k in data.client_ids.tolist():
            d = data.load(k)
            total += float(F.cross_entropy(model(torch.as_tensor(d.x)), torch.as_tensor(d.y), reduction="sum"))
            n += len(d.y)
    return total / n


def run(make: Any, seed: int, rounds: int, args: argparse.Namespace, cluster: Any) -> tuple[list[float], float]:
    """The training loss at each quarter of the run, and the final test accuracy."""
    train, _ = fg.data.fedprox_synthetic(1.0, 1.0, seed=seed)
    model = fg.models.mlp(60, [], 10, seed=seed)
    pipeline = make(args.clients, tuple(args.epochs), args.batch_size, args.lr)
    losses = []
    with fg.Run(pipeline, model=model, data=train, seed=seed, cluster=cluster, progress=False, dashboard=False,
                metrics_log=None, evaluate="never") as r:
        for _ in range(4):
            r.fit(rounds // 4)
            losses.append(train_loss(r.state.params.flat, model, train))
        flat = r.state.params.flat
    torch.nn.utils.vector_to_parameters(torch.from_numpy(flat.copy()), model.parameters())
    assert train.test is not None
    with torch.no_grad():
        acc = float((model(torch.as_tensor(train.test.x)).argmax(1) == torch.as_tensor(train.test.y)).float().mean())
    return losses, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--epochs", type=int, nargs=2, default=[1, 5], metavar=("LOW", "HIGH"))
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args()
    from flgraph.cluster import embedded, embedded_client

    cluster = embedded(2)
    client = embedded_client(cluster)
    q = args.rounds // 4
    try:
        heads = " ".join(f"{'F @ ' + str(q * i):>9}" for i in range(1, 5))
        print(f"{'seed':>4} {'algorithm':>9} {heads} {'test acc':>8}  (F: global training loss)")
        finals: dict[int, dict[str, float]] = {}
        for seed in args.seeds:
            for name, make in (("fedavg", fedavg), ("fednova", fednova)):
                losses, acc = run(make, seed, args.rounds, args, client)
                finals.setdefault(seed, {})[name] = losses[-1]
                print(f"{seed:>4} {name:>9} " + " ".join(f"{v:>9.4f}" for v in losses) + f" {acc:>8.4f}", flush=True)
        wins = sum(f["fednova"] < f["fedavg"] for f in finals.values())
        print(f"FedNova's final training loss is lower in {wins} of {len(finals)} seeds")
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
