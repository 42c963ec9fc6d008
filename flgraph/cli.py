"""The ``flgraph`` command line.

    flgraph demo [--rounds 20] [--clients 100] [--workers N]   FedAvg on synthetic data, embedded cluster
    flgraph resume RUN.zarr [--rounds N]                       continue a checkpointed run
    flgraph inspect RUN.zarr                                   rounds done, metrics, snapshots, sizes
    flgraph export RUN.zarr [--round R] model.pt               the global model as a torch state_dict
    flgraph --help

Example:
    >>> from flgraph.cli import build_parser
    >>> build_parser().parse_args(["demo", "--rounds", "3"]).rounds
    3
"""

from __future__ import annotations

import argparse
import logging
import platform
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
    demo.add_argument("--checkpoint", default=None, help="write snapshots to this run directory (RUN.zarr)")

    res = sub.add_parser("resume", help="continue a checkpointed run from its last intact snapshot",
                         description="Continue a run from its last intact snapshot, bit-for-bit as if it had "
                         "never stopped. The pipeline, model and dataset are rebuilt from the run directory.")
    res.add_argument("run", help="the run directory (RUN.zarr)")
    res.add_argument("--rounds", type=int, default=None,
                     help="run until this many rounds are done in all (default: the interrupted fit's target)")
    res.add_argument("--workers", type=int, default=None, help="worker processes of the embedded cluster")
    res.add_argument("--scheduler", default=None, help="a Dask scheduler address instead of the embedded cluster")
    res.add_argument("--quiet", action="store_true", help="no progress bar")

    ins = sub.add_parser("inspect", help="show a run directory: rounds done, metrics, snapshots, sizes")
    ins.add_argument("run", help="the run directory (RUN.zarr)")
    ins.add_argument("--all", action="store_true", help="every metric column, not only the usual ones")

    exp = sub.add_parser("export", help="write the global model of a snapshot as a torch state_dict file")
    exp.add_argument("run", help="the run directory (RUN.zarr)")
    exp.add_argument("output", help="the file to write (e.g. model.pt)")
    exp.add_argument("--round", type=int, default=None, help="the snapshot's round (default: the newest intact)")

    edge = sub.add_parser("edge", help="run an edge agent: connect to a gateway and train on this device's data",
                          description="Connect out to a flgraph gateway (ZeroMQ), heartbeat, and run the task "
                          "function on each round's global params; reconnects with back-off. No code travels over "
                          "the wire: the task is a function of a module installed here (transports/PROTOCOL.md).")
    edge.add_argument("--connect", required=True, help="the gateway's endpoint, e.g. tcp://HOST:PORT")
    edge.add_argument("--task", required=True, help="the task function, package.module:function")
    edge.add_argument("--client-id", type=int, default=None, help="the client this device stands for "
                      "(default: the gateway assigns one)")
    edge.add_argument("--key", default=None, help="this agent's NAME.key_secret (CURVE)")
    edge.add_argument("--server-key", default=None, help="the gateway's public NAME.key (CURVE)")
    edge.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat seconds until the gateway says")
    edge.add_argument("--max-backoff", type=float, default=5.0, help="longest wait between reconnects (s)")
    edge.add_argument("--give-up-after", type=float, default=None,
                      help="exit (code 3) when no gateway accepted this agent for this many seconds")
    edge.add_argument("--max-tasks", type=int, default=None, help="exit after this many tasks")
    edge.add_argument("--device", action="append", default=[], metavar="KEY=VALUE",
                      help="a field this device announces when it joins, e.g. site=lab-3 (tiers group by it: "
                           "Aggregate(..., by='site')); repeat for more")
    edge.add_argument("--allow-code", action="append", default=[], metavar="PATTERN",
                      help="code a task may name for this device to import (train_fn, optimizer, loss), as an "
                           "import-path pattern, e.g. my_pkg.* (repeatable; default: only flgraph's own stages)")
    edge.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="own",
                      help="this device's own client setting, winning over the run's: epochs, steps, batch_size, "
                           "lr or samples (repeatable)")
    edge.add_argument("--verbose", action="store_true", help="log joins, reconnects and tasks")

    keys = sub.add_parser("keys", help="make a CURVE key pair for a gateway or an agent",
                          description="Write NAME.key (public: give it to the other side; an agent's goes into the "
                          "gateway's allow-list directory) and NAME.key_secret (keep it here).")
    keys.add_argument("directory", help="where to write the pair")
    keys.add_argument("--name", required=True, help="the pair's name, e.g. gateway or agent-7")
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
                cluster=args.scheduler, workers=args.workers, progress=not args.quiet,
                checkpoint=args.checkpoint) as run:
        history = run.fit(rounds=args.rounds)
        print(history.table(["round", "loss", "accuracy", "test_loss", "clients_done", "round_time"]))
        steady = sorted(history.column("round_time")[1:]) or history.column("round_time")
        print(f"final accuracy {history.last('accuracy'):.4f}; median round {steady[len(steady) // 2]:.3f} s; "
              f"warm-up {run.warmup_s:.2f} s; total {time.perf_counter() - t0:.1f} s")
    return 0


def _resume(args: argparse.Namespace) -> int:
    import flgraph as fg

    with fg.resume(args.run, cluster=args.scheduler, workers=args.workers, progress=not args.quiet) as run:
        for note in run.resume_notes:
            print(f"flgraph: {note}", file=sys.stderr)
        target = args.rounds if args.rounds is not None else run.target_round
        print(f"flgraph: resuming {args.run} at round {run.round}; running to round {target}", file=sys.stderr)
        if target > run.round:
            run.fit(rounds=target - run.round)
        print(run.history.table())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .observe.history import History
    from .store.checkpoint import RunDirectory

    d = RunDirectory.open(args.run, mode="r")
    meta = d.meta
    sizes = d.sizes()
    committed = d.snapshot_rounds()
    print(f"run {args.run}: flgraph {meta.get('flgraph_version')}, format {meta.get('format_version')}, "
          f"seed {meta.get('seed')}, config {meta.get('config_hash')}")
    print("pipeline: " + " >> ".join(s.get("class", "?").rsplit(":", 1)[-1] for s in meta.get("pipeline", [])))
    for what, note in meta.get("notes", {}).items():
        print(f"note ({what}): {note}")
    print("snapshots:")
    for rnd in sorted(sizes):
        state = "committed" if rnd in committed else "incomplete (ignored)"
        print(f"  round {rnd:6d}  {sizes[rnd] / 1e6:10.2f} MB  {state}")
    snap, skipped = d.latest()
    for s in skipped:
        print(f"  damaged: {s}")
    print(f"rounds done: {snap.round} (target of the last fit: {snap.target_round})")
    h = History(snap.rows)
    print(h.table([k for k in h.keys() if not k.startswith("failed")] if args.all else None))  # noqa: SIM118
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .models.adapter import ModelAdapter
    from .params import Params
    from .store.checkpoint import RunDirectory
    from .store.persist import load_blob_model

    d = RunDirectory.open(args.run, mode="r")
    snap = d.read(args.round) if args.round is not None else d.latest()[0]
    adapter = ModelAdapter.from_module(load_blob_model(d))
    module = adapter.to_module(Params(adapter.spec, snap.params))
    torch.save(module.state_dict(), args.output)
    print(f"wrote the global model of round {snap.round} to {args.output} ({adapter.spec.describe()})")
    return 0


def _edge(args: argparse.Namespace) -> int:
    from .transports.zmq import Agent

    if args.verbose:
        logging.getLogger("flgraph").setLevel(logging.INFO)
    device = None
    if args.device:
        bad = [d for d in args.device if "=" not in d]
        if bad:
            print(f"flgraph edge: --device {bad[0]!r} is not KEY=VALUE (e.g. --device site=lab-3)", file=sys.stderr)
            return 2
        device = {"host": platform.node()[:64], **dict(d.split("=", 1) for d in args.device)}
    own: dict[str, float] = {}
    for item in args.own:
        name, _, value = item.partition("=")
        try:  # ints stay ints (epochs=2); the agent refuses names it does not know
            own[name] = float(value) if name == "lr" or not value.strip().lstrip("-").isdigit() else int(value)
        except ValueError:
            print(f"flgraph edge: --set {item!r} is not NAME=NUMBER (e.g. --set epochs=2 --set lr=0.05)",
                  file=sys.stderr)
            return 2
    agent = Agent(args.connect, args.task, client_id=args.client_id, secret_key=args.key,
                  server_key=args.server_key, heartbeat_s=args.heartbeat, max_backoff_s=args.max_backoff,
                  give_up_s=args.give_up_after, max_tasks=args.max_tasks, device=device, allow=args.allow_code,
                  settings=own)
    print(f"flgraph edge: connecting to {args.connect} as "
          f"{'client ' + str(args.client_id) if args.client_id is not None else 'any client'}", file=sys.stderr,
          flush=True)
    try:
        code = agent.run()
    except KeyboardInterrupt:
        agent.stop()
        code = 0
    print(f"flgraph edge: stopped after {agent.tasks_done} task(s)", file=sys.stderr, flush=True)
    return code


def _keys(args: argparse.Namespace) -> int:
    from .transports.zmq import make_keypair

    public, secret = make_keypair(args.directory, args.name)
    print(f"wrote {public} (public) and {secret} (secret)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flgraph`` command; flgraph errors print their message and fix, exit code 2."""
    from .errors import FlgraphError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"demo": _demo, "resume": _resume, "inspect": _inspect, "export": _export, "edge": _edge,
                "keys": _keys}
    if args.command not in commands:
        build_parser().print_help()
        return 0
    try:
        return commands[args.command](args)
    except FlgraphError as e:
        print(f"flgraph {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flgraph {args.command}: interrupted; the last snapshot is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
