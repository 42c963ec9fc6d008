"""W1 (20 rounds) with 20% Byzantine clients: plain weighted mean vs median vs trimmed mean vs multi-Krum.

A deterministic 20% of W1's 1000 clients (``st.Byzantine(0.2)``, seeded by the run seed) send a corrupted
update: sign-flipped and scaled (``-10 * delta``) or scaled up (``100 * delta``, a boosting attack). Prints
the final test accuracy of each aggregator under each attack next to the clean run's.

Usage (from the repository root)::

    .venv/bin/python bench/robust_w1.py
    .venv/bin/python bench/robust_w1.py --rounds 10 --attacks sign_flip
"""

from __future__ import annotations

import argparse
import sys
import time
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

#: attack -> Byzantine scale: the delta becomes -10 * delta (sign flip) or 100 * delta (scale)
ATTACKS = {"sign_flip": 10.0, "scale": 100.0}


def reducers() -> dict[str, Any]:
    """The aggregators compared."""
    return {"mean": st.WeightedMean(), "median": st.Median(), "trimmed-0.3": st.TrimmedMean(0.3),
            "multikrum": st.Krum(f=25, m=50)}


def pipeline(reducer: Any, attack: str | None, clients: int = 100) -> fg.Pipeline:
    """W1's round with ``Byzantine(0.2, attack)`` after local training and ``reducer`` as the aggregate."""
    p = (st.Select(clients=clients, sampler=w1.sampler) >> st.Broadcast()
         >> st.LocalTrain(1, train_fn=w1.train_fn))
    if attack is not None:
        p = p >> st.Byzantine(0.2, attack=attack, scale=ATTACKS[attack])
    return p >> st.Aggregate(reducer)


def run(reducer: Any, attack: str | None, rounds: int, cluster: Any, clients: int = 100) -> float:
    """Final W1 test accuracy (``w1.evaluate``; a diverged model counts as chance, 0.1)."""
    with fg.Run(pipeline(reducer, attack, clients), model=w1.initial_model("mlp"), data=w1.dataset(), seed=0,
                cluster=cluster, progress=False, evaluate="never", on_client_error="drop") as r:
        try:
            r.fit(rounds=rounds)
        except fg.FlgraphError as e:  # all clients non-finite: the model diverged
            print(f"  diverged: {e.message.splitlines()[0][:100]}", flush=True)
            return 0.1
        acc, _ = w1.evaluate(r.model, *w1.test_data())
    return acc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--attacks", nargs="*", default=["sign_flip", "scale"])
    args = ap.parse_args(argv)
    import cloudpickle

    cloudpickle.register_pickle_by_value(w1)
    cluster = embedded(args.workers)
    client = Client(cluster, set_as_default=False)
    try:
        t0 = time.perf_counter()
        print(f"clean (mean)        accuracy {run(st.WeightedMean(), None, args.rounds, client):.4f}", flush=True)
        for attack in args.attacks:
            for name, reducer in reducers().items():
                acc = run(reducer, attack, args.rounds, client)
                print(f"{attack:9s} {name:11s} accuracy {acc:.4f}", flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)")
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
