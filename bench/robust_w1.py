"""W1 with 20% Byzantine clients: plain weighted mean vs median vs trimmed mean vs multi-Krum.

A deterministic 20% of W1's 1000 clients (``st.Byzantine(0.2)``: the first 200 ids of a permutation seeded
by the run seed; 13 to 25 of each round's 100 clients) send a corrupted update: sign-flipped and scaled
(``-10 * delta``) or scaled up (``100 * delta``, a boosting attack). Every aggregator runs clean (no
attacker) and under each attack, so its loss to the attack is measured against its own clean run as well
as against clean FedAvg (W1's reference, 0.7650).

The aggregators, with the settings their papers prescribe for a Byzantine share ``alpha = 0.2``:

* ``mean``: FedAvg's sample-weighted mean (no defence);
* ``median``: coordinate-wise median (Yin et al., ICML 2018);
* ``trimmed-0.2``: coordinate-wise trimmed mean with ``beta = alpha`` (Yin et al. need ``beta >= alpha``;
  the smallest such ``beta`` keeps the most honest values);
* ``multikrum``: multi-Krum (Blanchard et al., NeurIPS 2017) with ``f = 25`` (the most attackers any W1
  round holds) and ``m = n - 2f = 50``.

Accuracy is reported after W1's 20 rounds and, by default, after ``--extra-rounds 20`` more (the same runs
continued): W1 stops early in training (clean FedAvg reaches 0.765 at round 20 and ~1.0 at round 40), so
the 20-round figure mostly measures how fast an aggregator makes progress, the 40-round one where it goes.

What the table shows (2 workers, seed 0; the numbers equal an in-process numpy re-implementation of the
same rounds): under the sign flip the mean falls to chance (0.10) and diverges at round 29; median and
trimmed mean lose about a quarter of their clean accuracy at round 20 (0.50 / 0.53 against their own
0.66 / 0.68 and FedAvg's 0.765) and reach 0.90 / 0.91 at round 40, when clean FedAvg is at 1.00; multi-Krum
drops the (10x larger) flipped updates and matches clean FedAvg. The ``scale`` attack boosts honest
updates, so it acts as a larger server step: on W1, which is step-limited, it helps every aggregator,
the mean included (1.00 at round 20) -- it is no attack on this task.

With ``--momentum 0.9`` every aggregator's result drives a server SGD step with momentum (FedAvgM-style;
``recipes.robust_fedavg(momentum=0.9)``), which averages the robust aggregate's per-round error away
(Karimireddy, He and Jaggi, ICML 2021). Then, at W1's 20 rounds: clean 1.00 for every aggregator; under the
sign flip median 0.9995, trimmed mean 1.00, multi-Krum 1.00, and the mean diverges (chance, 0.10); under
the 100x boost, which then destabilises the mean (0.415), median, trimmed mean and multi-Krum stay at 1.00.

Usage (from the repository root)::

    .venv/bin/python bench/robust_w1.py                      # the full table (~15 min on 2 cores)
    .venv/bin/python bench/robust_w1.py --extra-rounds 0 --attacks sign_flip --aggregators mean median
    .venv/bin/python bench/robust_w1.py --momentum 0.9 --extra-rounds 0   # server momentum (~2.5 min)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distributed import Client

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import w1  # noqa: E402

import flgraph as fg  # noqa: E402
from flgraph import stages as st  # noqa: E402
from flgraph.cluster import embedded  # noqa: E402

#: the Byzantine share of the population
FRACTION = 0.2
#: attack -> Byzantine scale: the delta becomes -10 * delta (sign flip) or 100 * delta (scale)
ATTACKS = {"sign_flip": 10.0, "scale": 100.0}
#: accuracy counted for a run whose model diverged (every client non-finite): chance, 10 classes
CHANCE = 0.1


def reducers(clients: int = 100) -> dict[str, Any]:
    """The aggregators compared, set for a Byzantine share of ``FRACTION`` of ``clients`` per round."""
    f = round(1.25 * FRACTION * clients)  # 25 of 100: the most attackers a W1 round holds (13..25)
    return {"mean": st.WeightedMean(), "median": st.Median(), f"trimmed-{FRACTION}": st.TrimmedMean(FRACTION),
            "multikrum": st.Krum(f=f, m=clients - 2 * f)}


def pipeline(reducer: Any, attack: str | None, clients: int = 100, momentum: float = 0.0) -> fg.Pipeline:
    """W1's round with ``Byzantine(FRACTION, attack)`` after local training and ``reducer`` as the aggregate
    (with ``momentum``: a server SGD step with that momentum on the aggregate, as FedAvgM does)."""
    p = (st.Select(clients=clients, sampler=w1.sampler) >> st.Broadcast()
         >> st.LocalTrain(1, train_fn=w1.train_fn))
    if attack is not None:
        p = p >> st.Byzantine(FRACTION, attack=attack, scale=ATTACKS[attack])
    if momentum:
        return p >> st.ServerOpt(reducer, "sgd", lr=1.0, momentum=momentum)
    return p >> st.Aggregate(reducer)


def run(reducer: Any, attack: str | None, rounds: Sequence[int] | int, cluster: Any,
        clients: int = 100, momentum: float = 0.0) -> list[float]:
    """W1 test accuracy (``w1.evaluate``) after each of ``rounds`` (increasing) rounds of one run.

    A run whose model diverges (a round in which every client's update is non-finite) scores chance, 0.1,
    from then on.
    """
    marks = [rounds] if isinstance(rounds, int) else list(rounds)
    accs: list[float] = []
    with fg.Run(pipeline(reducer, attack, clients, momentum), model=w1.initial_model("mlp"), data=w1.dataset(), seed=0,
                cluster=cluster, progress=False, evaluate="never", on_client_error="drop") as r:
        done = 0
        for mark in marks:
            try:
                r.fit(rounds=mark - done)
            except fg.FlgraphError as e:  # all clients non-finite: the model diverged
                print(f"  diverged: {e.message.splitlines()[0][:100]}", flush=True)
                return accs + [CHANCE] * (len(marks) - len(accs))
            done = mark
            accs.append(w1.evaluate(r.model, *w1.test_data())[0])
    return accs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="W1's rounds (the headline figure)")
    ap.add_argument("--extra-rounds", type=int, default=20, help="continue each run this many rounds (0: no)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--aggregators", nargs="*", default=list(reducers()), choices=list(reducers()))
    ap.add_argument("--momentum", type=float, default=0.0,
                    help="server momentum on every aggregator's result (0.9: FedAvgM-style, robust_fedavg(momentum=))")
    args = ap.parse_args(argv)
    import cloudpickle

    cloudpickle.register_pickle_by_value(w1)
    marks = [args.rounds] + ([args.rounds + args.extra_rounds] if args.extra_rounds > 0 else [])
    conditions: list[str | None] = [None, *args.attacks]
    cluster = embedded(args.workers)
    client = Client(cluster, set_as_default=False)
    table: dict[tuple[str, str], list[float]] = {}
    try:
        t0 = time.perf_counter()
        for name in args.aggregators:
            for attack in conditions:
                accs = run(reducers()[name], attack, marks, client, momentum=args.momentum)
                table[name, attack or "clean"] = accs
                print(f"{name:12s} {attack or 'clean':9s} " + "  ".join(
                    f"acc@{m} {a:.4f}" for m, a in zip(marks, accs, strict=True)), flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)\n")
    finally:
        client.close()
        cluster.close()
    cols = [c or "clean" for c in conditions]
    for i, mark in enumerate(marks):
        print(f"accuracy after {mark} rounds" + (" (W1)" if mark == args.rounds else "")
              + (f", server momentum {args.momentum}" if args.momentum else "")
              + "; the mean's clean run is the reference; attacked / own clean in brackets")
        print(f"| aggregator | {' | '.join(cols)} |")
        print("|---" * (len(cols) + 1) + "|")
        for name in args.aggregators:
            clean = table[name, "clean"][i]
            cells = [f"{table[name, c][i]:.4f}" + ("" if c == "clean" else f" ({table[name, c][i] / clean:.2f})")
                     for c in cols]
            print(f"| {name} | {' | '.join(cells)} |")
        print()


if __name__ == "__main__":
    main()
