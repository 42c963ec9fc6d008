"""W1 (20 rounds) uncompressed and with each upload codec: final accuracy and upload bytes.

The round is W1's (``bench/w1.py``: its sampler, its local SGD step, sample-weighted FedAvg) with a
``Compress(codec)`` stage before the aggregate; the codec encodes on the client and the reducer decodes.
Prints, per codec, the final test accuracy, the upload bytes before / after encoding summed over the run
(from the run's ``bytes_up_raw`` / ``bytes_up`` metrics) and their ratio.

Usage (from the repository root)::

    .venv/bin/python bench/compression_w1.py    # none, lz4, fp16, bf16, int8, int8 block 256, topk 10% / 1% (+ef)
    .venv/bin/python bench/compression_w1.py --rounds 5 --codecs int8
    .venv/bin/python bench/compression_w1.py --codecs none topk-1% topk-1%+ef --rounds 60

``+ef``: with error feedback (``Compress(codec, error_feedback=True)``): each client keeps what the codec
dropped and adds it to its next update. In W1 a client comes back about every 10 rounds, so the residual
is re-used about twice in 20 rounds: run more rounds to see it pay.
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

CODECS: dict[str, Any] = {
    "none": None, "lz4": "lz4", "fp16": "fp16", "bf16": "bf16", "int8": "int8",
    "int8-b256": st.Int8(block=256), "topk-10%": st.TopK(0.1), "topk-10%+ef": (st.TopK(0.1), True),
    "topk-1%": st.TopK(0.01), "topk-1%+ef": (st.TopK(0.01), True),
}
"""name -> codec, or (codec, True) for the codec with error feedback (the per-client residual)."""


def pipeline(codec: Any, clients: int = 100) -> fg.Pipeline:
    """W1's round with ``Compress(codec)`` before the aggregate (no Compress for ``None``)."""
    p = (st.Select(clients=clients, sampler=w1.sampler) >> st.Broadcast()
         >> st.LocalTrain(1, train_fn=w1.train_fn))
    if isinstance(codec, tuple):
        p = p >> st.Compress(codec[0], error_feedback=codec[1])
    elif codec is not None:
        p = p >> st.Compress(codec)
    return p >> st.Aggregate(st.WeightedMean())


def run(codec: Any, rounds: int, cluster: Any, clients: int = 100) -> dict[str, float]:
    """Final accuracy (``w1.evaluate``) and the run's upload bytes before and after encoding."""
    with fg.Run(pipeline(codec, clients), model=w1.initial_model("mlp"), data=w1.dataset(), seed=0,
                cluster=cluster, progress=False, evaluate="never") as r:
        h = r.fit(rounds=rounds)
        acc, _ = w1.evaluate(r.model, *w1.test_data())
    raw, up = sum(h.column("bytes_up_raw")), sum(h.column("bytes_up"))
    return {"accuracy": acc, "bytes_raw": raw, "bytes_up": up, "ratio": raw / up}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--codecs", nargs="*", default=list(CODECS))
    args = ap.parse_args(argv)
    import cloudpickle

    cloudpickle.register_pickle_by_value(w1)
    cluster = embedded(args.workers)
    client = Client(cluster, set_as_default=False)
    try:
        base = None
        for name in args.codecs:
            t0 = time.perf_counter()
            res = run(CODECS[name], args.rounds, client)
            base = res["accuracy"] if base is None and name == "none" else base
            delta = f"{100 * (res['accuracy'] - base):+.2f} pt" if base is not None else ""
            print(f"{name:10s} accuracy {res['accuracy']:.4f} {delta:10s} upload {res['bytes_raw'] / 1e6:8.1f} MB "
                  f"-> {res['bytes_up'] / 1e6:7.1f} MB  ({res['ratio']:.3f}x)  {time.perf_counter() - t0:.0f} s",
                  flush=True)
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
