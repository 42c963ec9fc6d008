"""FedAvg + SecAgg+ next to plain FedAvg on W1: cost per round and per client (time, bytes), and accuracy.

For each round size (``--clients``, default 100 and 1000 clients a round) it runs ``--rounds`` W1 rounds of
plain FedAvg (``w1.pipeline``) and of the same round with secure aggregation (``SecureSetup`` before the
clients train, ``SecureMask`` after, ``SecureAggregate``), both on the embedded cluster, and prints the
median round time over rounds 2..R, the secure round's phases (driver wall time, client work included),
and the bytes each client sends and receives (secure: its public keys, encrypted shares, masked input and
unmasking answers; plain: its update). With ``--accuracy-rounds R`` it also runs W1 (100 clients a round)
for R rounds both ways and prints the final test accuracy of each.

Usage (from the repository root)::

    .venv/bin/python bench/secagg.py                                  # 100 and 1000 clients, 3 rounds each
    .venv/bin/python bench/secagg.py --clients 100 --rounds 3 --accuracy-rounds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import w1  # noqa: E402

import flgraph as fg  # noqa: E402
from flgraph import stages as st  # noqa: E402
from flgraph.secure import SecAggConfig  # noqa: E402


def secure_pipeline(clients: int, cfg: SecAggConfig) -> fg.Pipeline:
    """W1's round with SecAgg+: W1's sampler and local step, the secure stages around the training."""
    return (st.Select(clients=clients, sampler=w1.sampler) >> st.Broadcast() >> st.SecureSetup(cfg)
            >> st.LocalTrain(1, train_fn=w1.train_fn) >> st.SecureMask(cfg) >> st.SecureAggregate(cfg))


def run(pipeline: fg.Pipeline, cluster: Any, rounds: int) -> tuple[list[dict[str, Any]], float, float]:
    """The rows of ``rounds`` rounds, the warm-up seconds and the final accuracy."""
    with fg.Run(pipeline, model=w1.initial_model("mlp"), data=w1.dataset(), seed=0, cluster=cluster,
                progress=False, evaluate="never", metrics_log=None, dashboard=False) as r:
        t0 = time.perf_counter()
        history = r.fit(rounds=rounds)
        rows = history.rows[-rounds:]
        warm = time.perf_counter() - t0 - sum(float(x["round_time"]) for x in rows)
        x, y = w1.test_data()
        acc, _ = w1.evaluate(r.model, x, y)
    return rows, warm, acc


def steady(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r.get(key, 0.0)) for r in rows]
    return statistics.median(values[1:] if len(values) > 1 else values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="100,1000", help="round sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--neighbours", type=int, default=None, help="SecAgg+ degree (default: 2 ceil(log2 n) + 2)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--levels", type=int, default=2**20)
    ap.add_argument("--accuracy-rounds", type=int, default=0, help="W1 rounds for the accuracy comparison")
    args = ap.parse_args()
    cfg = SecAggConfig(neighbours=args.neighbours, clip=args.clip, levels=args.levels, modulus=2**32)
    from flgraph.cluster import embedded, embedded_client

    cluster = embedded(args.workers)
    client = embedded_client(cluster)
    results: dict[str, Any] = {"workers": args.workers, "rounds": args.rounds, "config": repr(cfg)}
    try:
        for n in [int(c) for c in args.clients.split(",")]:
            plain, _, _ = run(w1.pipeline(clients=n), client, args.rounds)
            secure, _, _ = run(secure_pipeline(n, cfg), client, args.rounds)
            k, t = cfg.check_round(n)
            p_round, s_round = steady(plain, "round_time"), steady(secure, "round_time")
            up_plain = steady(plain, "bytes_up") / n
            up_secure = (steady(secure, "bytes_up") + steady(secure, "secagg_bytes_up")) / n
            down_secure_extra = steady(secure, "secagg_bytes_down") / n
            phases = {k_[len("time_secagg_"):]: round(steady(secure, k_), 3) for k_ in secure[-1]
                      if k_.startswith("time_secagg_")}
            phases["mask (summed over clients, worker CPU)"] = round(steady(secure, "time_secure-mask"), 3)
            row = {"clients": n, "neighbours": k, "threshold": t, "plain_round_s": round(p_round, 3),
                   "secure_round_s": round(s_round, 3), "plain_per_client_ms": round(1000 * p_round / n, 2),
                   "secure_per_client_ms": round(1000 * s_round / n, 2), "plain_up_bytes_per_client": int(up_plain),
                   "secure_up_bytes_per_client": int(up_secure),
                   "secure_extra_down_bytes_per_client": int(down_secure_extra), "secure_phases_s": phases}
            results[f"n{n}"] = row
            print(f"{n} clients/round (k={k}, t={t}): plain {p_round:.3f} s/round, secure {s_round:.3f} s/round "
                  f"({s_round / p_round:.1f}x); per client up: plain {int(up_plain)} B, secure {int(up_secure)} B "
                  f"(+{int(down_secure_extra)} B down besides the model); secure phases (s): {phases}", flush=True)
        if args.accuracy_rounds:
            _, _, acc_plain = run(w1.pipeline(clients=100), client, args.accuracy_rounds)
            _, _, acc_secure = run(secure_pipeline(100, cfg), client, args.accuracy_rounds)
            step = 2 * cfg.clip / (cfg.levels - 1)
            results["accuracy"] = {"rounds": args.accuracy_rounds, "fedavg": acc_plain, "fedavg_secagg": acc_secure,
                                   "quantisation_step": step}
            print(f"W1 after {args.accuracy_rounds} rounds: FedAvg accuracy {acc_plain:.4f}, FedAvg + SecAgg+ "
                  f"{acc_secure:.4f} (quantisation step {step:.2e})", flush=True)
    finally:
        client.close()
        cluster.close()
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
