"""On a CUDA machine: vectorised LocalTrain (clients_at_once) against sequential LocalTrain, per client, on the
GPU; and their speed. Exits with a message (code 0, nothing measured) where CUDA is not available.

Checks that each client's update of the vectorised block equals the sequential one within 1e-5 relative
(FedAvg, FedProx, momentum; uneven client sizes, several epochs), with the global params kept on the device
between blocks, then times X1-shaped blocks (676-parameter MLP, 4 samples, one step) and W1-shaped blocks
(199,210 parameters, 64 samples, two steps) both ways.

Usage::

    .venv/bin/python bench/gpu_check.py [--clients 2048] [--block 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import flgraph as fg
from flgraph import stages as st
from flgraph.context import ClientSet, ClientWork
from flgraph.data import FederatedDataset
from flgraph.models.adapter import ModelAdapter
from flgraph.rng import stage_tag

SIZES = [3, 17, 8, 1, 12, 25, 5, 9]


def uneven(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([42, k])
    n = SIZES[k % len(SIZES)]
    y = rng.integers(0, 3, n)
    return (rng.standard_normal((n, 6)) + y[:, None]).astype(np.float32), y.astype(np.int64)


def works(ids: list[int], data: FederatedDataset, ad: ModelAdapter) -> list[ClientWork]:
    clients, gp = ClientSet(np.array(ids)), ad.initial_params()
    out = []
    for pos, k in enumerate(ids):
        w = ClientWork(1, k, pos, 0, gp, data, clients, ad)
        w.tag = stage_tag("LocalTrain", 0)
        out.append(w)
    return out


def equality(device: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    ad, data = ModelAdapter.from_module(model), FederatedDataset.from_function(uneven, 64)
    worst = {}
    for name, momentum, mu in (("fedavg", 0.0, 0.0), ("fedprox", 0.0, 0.1), ("momentum", 0.9, 0.0)):
        opts = dict(batch_size=4, lr=0.1, optimizer=st.SGD(0.1, momentum), mu=mu, device=device)
        vec = st.LocalTrain(3, **opts, clients_at_once=32)
        vec.prepare(data, ad)
        ids = list(range(32))
        block, seq = works(ids, data, ad), works(ids, data, ad)
        errors = vec.run_block(block)
        assert errors == [None] * len(ids), errors
        for w in seq:
            st.LocalTrain(3, **opts).run(w)
        rel = max(float(np.abs(b.update.delta - s.update.delta).max() / np.abs(s.update.delta).max())
                  for b, s in zip(block, seq))
        worst[name] = rel
        print(f"{device} {name}: max relative difference per client {rel:.2e}", flush=True)
        assert rel <= 1e-5, (name, rel)
    return worst


def timing(device: str, model: torch.nn.Module, fn, clients: int, block: int, epochs: int, batch: int) -> dict:
    ad, data = ModelAdapter.from_module(model), FederatedDataset.from_function(fn, clients)
    vec = st.LocalTrain(epochs, batch_size=batch, lr=0.05, device=device, clients_at_once=block)
    vec.prepare(data, ad)
    seq = st.LocalTrain(epochs, batch_size=batch, lr=0.05, device=device)
    ids = list(range(clients))
    for w in works(ids[:block], data, ad):  # warm-up: CUDA context, kernels
        seq.run(w)
    vec.run_block(works(ids[:block], data, ad))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, clients, block):
        vec.run_block(works(ids[i:i + block], data, ad))
    torch.cuda.synchronize()
    tv = (time.perf_counter() - t) / clients
    n_seq = min(clients, 4 * block)
    t = time.perf_counter()
    for w in works(ids[:n_seq], data, ad):
        seq.run(w)
    torch.cuda.synchronize()
    ts = (time.perf_counter() - t) / n_seq
    return {"vectorised_us_per_client": round(tv * 1e6, 1), "sequential_us_per_client": round(ts * 1e6, 1),
            "ratio": round(tv / ts, 4)}


def x1(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([5, k])
    y = rng.integers(0, 4, 4)
    return rng.standard_normal((4, 16)).astype(np.float32), y.astype(np.int64)


def w1(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([1, k])
    y = rng.integers(0, 10, 64)
    return rng.standard_normal((64, 784)).astype(np.float32), y.astype(np.int64)


def worker_devices() -> dict[str, object]:
    """What each worker of the embedded cluster sees: one worker per GPU, each with its own device only."""
    from distributed import Client

    from flgraph.cluster import embedded

    def seen() -> tuple[str | None, int, str]:
        import os

        import torch as t

        return os.environ.get("CUDA_VISIBLE_DEVICES"), t.cuda.device_count(), t.cuda.get_device_name(0)

    cluster = embedded()
    client = Client(cluster, set_as_default=False)
    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
        # LocalTrain's default device="auto" on these workers: settled to cuda for the run, and trains there
        torch.manual_seed(0)
        train = st.LocalTrain(batch_size=4, lr=0.1)
        pipe = st.Select(clients=64) >> st.Broadcast() >> train >> st.Aggregate(st.WeightedMean())
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        data = fg.data.FederatedDataset.from_function(x1, 10_000)
        with fg.Run(pipe, model=model, data=data, seed=0, cluster=client, progress=False, evaluate="never") as r:
            r.fit(rounds=2)
            auto = {"settled": train.train_device(), "loss": r.history.column("loss")}
        return {"gpus": torch.cuda.device_count(), "workers": sorted(map(list, client.run(seen).values())),
                "resources": [w["resources"] for w in info.values()], "auto_device": auto}
    finally:
        client.close()
        cluster.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=2048)
    ap.add_argument("--block", type=int, default=512)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False): nothing measured. "
              "Run it on a machine with a GPU and a CUDA build of torch.")
        return 0
    out = {"device": torch.cuda.get_device_name(0), "embedded_cluster": worker_devices(), "equality": equality("cuda")}
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    out["X1"] = timing("cuda", small, x1, a.clients, a.block, 1, 4)
    torch.manual_seed(0)
    big = torch.nn.Sequential(torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 200), torch.nn.ReLU(),
                              torch.nn.Linear(200, 10))
    out["W1"] = timing("cuda", big, w1, min(a.clients, 512), min(a.block, 128), 1, 32)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
