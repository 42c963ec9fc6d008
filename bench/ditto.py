"""Ditto's personal models vs FedAvg's global model and FedAvg + local fine-tuning, with Byzantine clients
(attack mode, the bench's claim) and on benign label-skewed clients (Li, Hu, Beirami, Smith, ICML 2021).

The paper's headline claim (robustness and fairness): when a share of the clients is corrupted, the global
model degrades, and Ditto's personal models keep the BENIGN clients' accuracy high, above the global model
and above fine-tuning the corrupted global model locally.

Setting (generated data, no download): ``synthetic_classification`` with Dirichlet(alpha) labels per
client, 50 clients of 50 samples, 10 a round, 20% of each client's samples held out (the same split for
every method; no method trains on it), 1 local epoch of batch 10 at lr 0.05, an MLP 20-32-10, 60 rounds.
The same seed gives every method the same data, initial model, client draws and Byzantine clients.

Attack mode (``--attack sign_flip``): ``st.Byzantine(0.2, attack="sign_flip", scale=4)`` after LocalTrain in
BOTH FedAvg's and Ditto's rounds: a fixed seeded 20% of the population (10 of 50 clients) send
``-4 * delta`` instead of their update. The paper's attacks (label poisoning, random updates, boosted model
replacement; not checked offline here) all aim at a useless global model; a flip boosted 4x by the expected
2 attackers of a round's 10 cancels the 8 honest updates in expectation (0.8 - 0.2 * 4 = 0), so the global model stalls
near chance yet stays finite, and fine-tuning it is a fair baseline (at scale 10 the global model
diverges and fine-tuning cannot recover: on the tuning seeds FedAvg + fine-tuning scores 0.08-0.16, Ditto
0.14-0.29). A second setting, half the clients Byzantine with a plain flip (``--byzantine 0.5 --scale 1``),
cancels the honest mean the same way. Ditto's personal step does not touch the update, so its global model
is as corrupted as FedAvg's; the personal models of the Byzantine clients are not scored. Figures are over
the benign clients' held-out parts (400 samples at 20%, 250 at 50%), weighted by held-out samples:

* ``fedavg``: FedAvg's global model;
* ``fedavg+ft``: it, fine-tuned on each benign client's training part (``--ft-epochs`` 5 epochs of SGD at lr
  0.05, batch 10; plain torch in this script, seeded per client);
* ``ditto``: each benign client's personal model ``v_k`` (lambda ``--lam``, 3 personal epochs a round at lr
  0.05), read from the run's client state; a client never selected is scored with the global model
  (count printed; none here).

With ``--byzantine 0 --lam 0.5`` the attack mode's code reproduces the benign mode's figures (seeds 0, 1 at
alpha 0.1: FedAvg 0.388, 0.346 and Ditto 0.740, 0.666 identical; this script's fine-tuning 0.728, 0.664
against ``PersonalizedEvaluate``'s 0.730, 0.664), so the attack mode's own evaluation does not weaken the baselines.

Tuning protocol: lam in {0.05, 0.1, 0.5}, 1 or 3 personal epochs and scale 4 or 10 were chosen on seeds 10
and 11 only (alpha 0.1 / 0.3, Ditto - best other: lam 0.05 +0.21 +0.13 / +0.11 +0.12; lam 0.1 +0.20 +0.13 /
+0.12 +0.11; lam 0.5 +0.12 +0.05 / +0.05 +0.03; lam 0.1 with 1 personal epoch +0.20 +0.11 / +0.12 +0.09);
the smaller lambdas win under attack (lam 0.5 is the benign mode's choice), so attack mode runs
lam 0.1 (in the paper's grid), 3 personal epochs, scale 4, 60 rounds. Seeds 0, 1, 2 were run once,
after the settings were fixed. Tuning seeds, 20% x4 (fedavg / fedavg+ft / ditto)::

    alpha 0.1  seed 10  0.153 / 0.500 / 0.703      alpha 0.3  seed 10  0.158 / 0.343 / 0.465
               seed 11  0.233 / 0.603 / 0.735                 seed 11  0.223 / 0.443 / 0.555

Reported seeds, 20% x4 (the claim: Ditto above both on every seed and alpha)::

    alpha 0.1  seed 0   0.145 / 0.500 / 0.643      alpha 0.3  seed 0   0.165 / 0.350 / 0.543
               seed 1   0.173 / 0.583 / 0.645                 seed 1   0.195 / 0.470 / 0.528
               seed 2   0.163 / 0.533 / 0.683                 seed 2   0.113 / 0.380 / 0.523

Half Byzantine, plain flip (same lam 0.1, 3 personal epochs, not tuned further; tuning seeds 10 / 11: Ditto - best other
+0.048 / +0.064 at alpha 0.1, +0.064 / +0.072 at alpha 0.3). Reported seeds::

    alpha 0.1  seed 0   0.216 / 0.592 / 0.700      alpha 0.3  seed 0   0.180 / 0.480 / 0.568
               seed 1   0.176 / 0.588 / 0.672                 seed 1   0.116 / 0.424 / 0.532
               seed 2   0.140 / 0.696 / 0.704                 seed 2   0.188 / 0.408 / 0.536

Ditto is above both on every seed here too, but at alpha 0.1 seed 2 by 0.008 (2 of 250 held-out
samples), within the held-out noise.

Benign mode (no ``--attack``; all 50 clients scored; ``fedavg``/``fedavg+ft`` from ``PersonalizedEvaluate``):
lam 0.5, 3 personal epochs, from a sweep on seeds 0 and 1 over lam in {0.05, 0.1, 0.5, 1} and 1 or 3
personal epochs (so the reported seeds were looked at). Ditto TIES fine-tuning there and beats only the
global model: alpha 0.1, seeds 0, 1, 2: Ditto 0.740, 0.666, 0.738; FedAvg + fine-tuning 0.730, 0.664,
0.764; FedAvg 0.388, 0.346, 0.352; alpha 0.3: Ditto 0.604, 0.558, 0.606; fine-tuning 0.602, 0.568, 0.604;
FedAvg 0.366, 0.336, 0.384. Each client holds out 10 samples: differences of 1-2 points are within the
noise of the held-out set. No local-only baseline (lam 0) is run in either mode.

Usage (from the repository root)::

    .venv/bin/python bench/ditto.py --attack sign_flip       # the claim: 20% Byzantine, seeds 0-2 (~1 min)
    .venv/bin/python bench/ditto.py --attack sign_flip --byzantine 0.5 --scale 1
    .venv/bin/python bench/ditto.py                          # benign: 3 seeds, alpha 0.1 and 0.3, 60 rounds
    .venv/bin/python bench/ditto.py --seeds 10 11 --attack sign_flip --lam 0.5   # a tuning run
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


def attacked(seed: int, alpha: float, rounds: int, lam: float, personal_epochs: int, ft_epochs: int,
             attack: str, fraction: float, scale: float, cluster: Any) -> tuple[float, float, float, int, int]:
    """Attack mode: FedAvg and Ditto under the same ``Byzantine(fraction, attack, scale)`` clients.

    Returns (FedAvg global, FedAvg + fine-tuning, Ditto) held-out accuracy over the BENIGN clients only,
    the number of Byzantine clients and of benign clients Ditto never selected.
    """
    data, model = setup(seed, alpha)
    init = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    byz = st.Byzantine(fraction, attack=attack, scale=scale)
    bad = byz.attackers(seed, data.client_ids)
    benign = [int(k) for k in data.client_ids if int(k) not in bad]
    train = {k: v for k, v in TRAIN.items() if k != "clients"}
    personal = st.DittoPersonal(lam, lr=TRAIN["lr"], batch_size=TRAIN["batch_size"], epochs=personal_epochs,
                                holdout=HOLDOUT, evaluate=False)
    finals: dict[str, Any] = {}
    for name, extra in (("fedavg", []), ("ditto", [personal])):
        pipeline = fg.Pipeline([st.Select(PER_ROUND), st.Broadcast(), st.LocalTrain(**train), byz, *extra,
                                st.Aggregate(st.WeightedMean())])
        torch.nn.utils.vector_to_parameters(init.clone(), model.parameters())
        with fg.Run(pipeline, model=model, data=data, seed=seed, cluster=cluster, progress=False,
                    dashboard=False, metrics_log=None) as r:
            r.fit(rounds)
            finals[name] = r.state.params.flat.copy()
            if name == "ditto":
                finals["v"] = personal_models(r)
    w_fedavg, w_ditto, v = finals["fedavg"], finals["ditto"], finals["v"]
    counts = np.zeros(3)
    held = 0
    for k in benign:
        x, y = data.load(k)
        ho = heldout(seed, k, len(y), HOLDOUT)
        xt, yt = torch.as_tensor(x[ho]), torch.as_tensor(y[ho])
        tuned = finetune(model, w_fedavg, x[~ho], y[~ho], ft_epochs, np.random.default_rng([seed, k]))
        for i, flat in enumerate((w_fedavg, tuned, v.get(k, w_ditto))):
            counts[i] += correct(model, flat, xt, yt)
        held += int(ho.sum())
    glob, ft, pers = counts / held
    return float(glob), float(ft), float(pers), len(bad), sum(k not in v for k in benign)


def correct(model: torch.nn.Module, flat: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> int:
    torch.nn.utils.vector_to_parameters(torch.from_numpy(np.asarray(flat, np.float32)), model.parameters())
    model.eval()
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def finetune(model: torch.nn.Module, flat: np.ndarray, x: np.ndarray, y: np.ndarray, epochs: int,
             rng: np.random.Generator) -> np.ndarray:
    """``flat`` after ``epochs`` passes of plain SGD (lr and batch size of ``TRAIN``) on one client's (x, y)."""
    # a copy: vector_to_parameters makes the parameters views of the vector, and SGD steps them in place
    torch.nn.utils.vector_to_parameters(torch.tensor(flat, dtype=torch.float32), model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN["lr"])
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    model.train()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(yt)))
        for i in range(0, len(yt), TRAIN["batch_size"]):
            idx = perm[i : i + TRAIN["batch_size"]]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--lam", type=float, default=None, help="Ditto's lambda (default: 0.5 benign, 0.1 attack)")
    ap.add_argument("--personal-epochs", type=int, default=3)
    ap.add_argument("--ft-epochs", type=int, default=5)
    ap.add_argument("--attack", choices=["sign_flip", "scale"], default=None,
                    help="attack mode: this share of Byzantine clients corrupts its updates (default: benign)")
    ap.add_argument("--byzantine", type=float, default=0.2, help="attack mode: Byzantine share of the clients")
    ap.add_argument("--scale", type=float, default=4.0, help="attack mode: Byzantine's scale")
    args = ap.parse_args()
    if args.lam is None:  # each mode's value tuned on seeds 10 and 11 (see the module docstring)
        args.lam = 0.1 if args.attack else 0.5
    from flgraph.cluster import embedded, embedded_client

    cluster = embedded(2)
    client = embedded_client(cluster)
    try:
        if args.attack:
            print(f"{'alpha':>5} {'seed':>4} {'fedavg':>7} {'fedavg+ft':>9} {'ditto':>7} {'ditto - best other':>18}"
                  f" {'byzantine':>9} {'never selected':>14}   (held-out accuracy, benign clients, {args.attack}"
                  f" x{args.scale}, after {args.rounds} rounds)")
            for alpha in args.alphas:
                for seed in args.seeds:
                    glob, ft, pers, bad, unseen = attacked(seed, alpha, args.rounds, args.lam, args.personal_epochs,
                                                           args.ft_epochs, args.attack, args.byzantine, args.scale,
                                                           client)
                    print(f"{alpha:>5} {seed:>4} {glob:>7.4f} {ft:>9.4f} {pers:>7.4f} {pers - max(glob, ft):>+18.4f}"
                          f" {bad:>9} {unseen:>14}", flush=True)
            return
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
