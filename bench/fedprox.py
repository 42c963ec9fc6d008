"""FedProx vs FedAvg on Synthetic(1,1) with stragglers (Li et al., MLSys 2020, Fig. 1, 90% stragglers).

The paper's setting: 30 devices, 10 per round, 20 local epochs, batch 10, lr 0.01, multinomial logistic
regression, 200 rounds. 90% of each round's devices are stragglers: FedAvg drops them, FedProx (mu = 1)
keeps their partial work (a random 1..19 epochs each). Reports, per round, the training loss of the global
model over all devices' training data and its accuracy on all devices' test data, and writes the curves as
CSV (for ``notebooks/fedprox_stragglers.ipynb``).

Usage (from the repository root)::

    .venv/bin/python bench/fedprox.py                       # the paper's settings, 200 rounds
    .venv/bin/python bench/fedprox.py --rounds 20 --out /tmp/curves.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flgraph.recipes.compose import insert_after

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st

SETTINGS = {"clients": 10, "epochs": 20, "batch_size": 10, "lr": 0.01, "rounds": 200, "stragglers": 0.9}


def model() -> torch.nn.Module:
    """Multinomial logistic regression, 60 features -> 10 classes (the paper's model for the synthetic data)."""
    torch.manual_seed(0)
    return torch.nn.Linear(60, 10)


def pipelines(clients: int, epochs: int, batch_size: int, lr: float, stragglers: float,
              mu: float = 1.0) -> dict[str, fg.Pipeline]:
    """``{"fedavg": drops stragglers, "fedprox": mu with partial work}`` on the same client selection."""
    fedavg = insert_after(
        recipes.fedavg(clients, epochs=epochs, batch_size=batch_size, lr=lr, evaluate_every=1),
        st.Select, st.Stragglers(stragglers, epochs=epochs, policy="drop"))
    fedprox = recipes.fedprox(clients, mu=mu, epochs=epochs, batch_size=batch_size, lr=lr, stragglers=stragglers)
    return {"fedavg": fedavg, "fedprox": fedprox}


def training_loss(params: fg.Params, train: Any) -> float:
    """Mean cross-entropy of the global logistic regression over every device's training data (numpy)."""
    w, b = params["weight"].astype(np.float64), params["bias"].astype(np.float64)
    total, n = 0.0, 0
    for k in train.client_ids:
        d = train.load(int(k))
        z = d.x.astype(np.float64) @ w.T + b
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(len(d.y)), d.y].sum())
        n += len(d.y)
    return total / n


class Curves:
    """Run callback: the training loss after each round."""

    def __init__(self, train: Any) -> None:
        self.train = train
        self.loss: list[float] = []

    def on_round(self, run: Any, row: dict[str, Any]) -> None:
        self.loss.append(training_loss(run.params, self.train))


def run(name: str, pipeline: fg.Pipeline, rounds: int, seed: int = 0, cluster: Any = None,
        workers: int | None = None) -> dict[str, list[float]]:
    """Train ``pipeline`` for ``rounds`` on Synthetic(1,1); the per-round training loss and test accuracy."""
    train, _ = fg.data.fedprox_synthetic(1.0, 1.0, seed=0)
    curves = Curves(train)
    with fg.Run(pipeline, model=model(), data=train, seed=seed, cluster=cluster, workers=workers,
                progress=False, callbacks=[curves]) as r:
        h = r.fit(rounds=rounds)
    return {"train_loss": curves.loss, "test_accuracy": h.column("accuracy"), "steps": h.column("steps")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=SETTINGS["rounds"])
    ap.add_argument("--mu", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "notebooks/data/fedprox_stragglers.csv"))
    args = ap.parse_args(argv)
    s = SETTINGS
    rows: list[dict[str, Any]] = []
    for name, p in pipelines(int(s["clients"]), int(s["epochs"]), int(s["batch_size"]), float(s["lr"]),
                             float(s["stragglers"]), mu=args.mu).items():
        t0 = time.perf_counter()
        c = run(name, p, args.rounds, seed=args.seed, workers=args.workers)
        print(f"{name:8s} rounds={args.rounds} final train loss {c['train_loss'][-1]:.4f}  test accuracy "
              f"{c['test_accuracy'][-1]:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        for i, (loss, acc) in enumerate(zip(c["train_loss"], c["test_accuracy"]), start=1):
            rows.append({"method": name, "round": i, "train_loss": loss, "test_accuracy": acc})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "round", "train_loss", "test_accuracy"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
