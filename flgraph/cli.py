"""The ``flgraph`` command line.

    flgraph demo [--rounds 20] [--clients 100] [--workers N]   FedAvg on synthetic data, embedded cluster
    flgraph --help

Example:
    >>> from flgraph.cli import build_parser
    >>> build_parser().parse_args(["demo", "--rounds", "3"]).rounds
    3
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="flgraph",
        description="flgraph: federated-learning rounds as composable dataflow graphs on Dask.",
    )
    p.add_argument("--version", action="version", version=f"flgraph {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run FedAvg on synthetic data on the embedded Dask cluster",
        description="Run FedAvg (McMahan et al. 2017) on seeded synthetic non-IID data (Dirichlet 0.5) with a "
        "784-200-200-10 MLP, on an embedded LocalCluster; shows progress and the dashboard address.",
    )
    demo.add_argument("--rounds", type=int, default=20, help="rounds to run (default 20)")
    demo.add_argument("--clients", type=int, default=100, help="clients per round (default 100)")
    demo.add_argument("--num-clients", type=int, default=1000, help="clients in the population (default 1000)")
    demo.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    demo.add_argument("--seed", type=int, default=0, help="the run seed (default 0)")
    demo.add_argument("--scheduler", default=None, help="a Dask scheduler address instead of the embedded cluster")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _demo(args: argparse.Namespace) -> int:
    import flgraph as fg

    data = fg.data.synthetic_classification(num_clients=args.num_clients, samples_per_client=64,
                                            num_features=784, num_classes=10, alpha=0.5, seed=args.seed)
    pipeline = fg.recipes.fedavg(clients=args.clients, epochs=1, batch_size=32, lr=0.05, evaluate_every=5)
    print(f"flgraph demo: FedAvg, {args.num_clients} clients, {args.clients} per round, {args.rounds} rounds\n"
          f"{pipeline!r}", flush=True)
    t0 = time.perf_counter()
    with fg.Run(pipeline, model=fg.models.mlp(784, [200, 200], 10, seed=args.seed), data=data, seed=args.seed,
                cluster=args.scheduler, workers=args.workers, progress=not args.quiet) as run:
        history = run.fit(rounds=args.rounds)
        print(history.table(["round", "loss", "accuracy", "test_loss", "clients_done", "round_time"]))
        steady = sorted(history.column("round_time")[1:]) or history.column("round_time")
        print(f"final accuracy {history.last('accuracy'):.4f}; median round {steady[len(steady) // 2]:.3f} s; "
              f"warm-up {run.warmup_s:.2f} s; total {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flgraph`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(args)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
