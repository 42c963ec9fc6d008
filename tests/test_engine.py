"""The sync engine on a real multi-process Dask cluster: correctness against plain torch, determinism."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flgraph as fg
from flgraph import stages as st

SEED = 7
NUM_CLIENTS, N, D, K = 40, 24, 12, 4


def small_data() -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=NUM_CLIENTS, samples_per_client=N, num_features=D,
                                            num_classes=K, alpha=0.5, seed=3, signal=1.0, test_samples=200)


def small_model() -> torch.nn.Module:
    return fg.models.mlp(D, [16], K, seed=1)


def _stream(seed: int, *key: int) -> np.random.Generator:
    """Written here from the documented scheme, not imported from flgraph."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _tag(name: str) -> int:
    return zlib.crc32(f"{name}:0".encode()) & 0x7FFFFFFF


def reference_fedavg(model: torch.nn.Module, data: fg.data.FederatedDataset, rounds: int, clients: int,
                     epochs: int, batch: int, lr: float) -> dict[str, torch.Tensor]:
    """An independent plain-torch FedAvg (weights, not deltas; sequential float32 sums)."""
    global_w = {k: v.clone() for k, v in model.state_dict().items()}
    for r in range(1, rounds + 1):
        ids = _stream(SEED, _tag("Select"), r).choice(data.client_ids, size=clients, replace=False)
        results = []
        for k in ids:
            d = data.load(int(k))
            model.load_state_dict(global_w)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            rng = _stream(SEED, _tag("LocalTrain"), r, int(k))
            x, y = torch.from_numpy(d.x), torch.from_numpy(d.y)
            for _ in range(epochs):
                perm = torch.from_numpy(rng.permutation(len(y)))
                for i in range(0, len(y), batch):
                    idx = perm[i:i + batch]
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            results.append(({k2: v.detach().clone() for k2, v in model.state_dict().items()}, len(y)))
        total = sum(n for _, n in results)
        global_w = {name: sum(w[name] * (n / total) for w, n in results) for name in global_w}
    return global_w


def pipeline(clients: int = 8, epochs: int = 2, batch: int = 8, lr: float = 0.1) -> fg.Pipeline:
    return (st.Select(clients=clients) >> st.Broadcast() >> st.LocalTrain(epochs, batch_size=batch, lr=lr)
            >> st.Aggregate(st.WeightedMean()))


def test_fedavg_equals_plain_torch(client2):
    data = small_data()
    with fg.Run(pipeline(), model=small_model(), data=data, seed=SEED, cluster=client2, progress=False,
                evaluate="never") as run:
        run.fit(rounds=1)
        ours = run.state_dict()
    ref = reference_fedavg(small_model(), data, rounds=1, clients=8, epochs=2, batch=8, lr=0.1)
    worst = 0.0
    for name, want in ref.items():
        got = torch.from_numpy(ours[name])
        rel = float((got - want).abs().max() / want.abs().max())
        worst = max(worst, rel)
    assert worst <= 1e-6, f"max relative difference {worst:.3g}"


def test_three_rounds_track_plain_torch(client2):
    data = small_data()
    with fg.Run(pipeline(), model=small_model(), data=data, seed=SEED, cluster=client2, progress=False,
                evaluate="never") as run:
        run.fit(rounds=3)
        ours = run.state_dict()
    ref = reference_fedavg(small_model(), data, rounds=3, clients=8, epochs=2, batch=8, lr=0.1)
    for name, want in ref.items():
        rel = float((torch.from_numpy(ours[name]) - want).abs().max() / want.abs().max())
        assert rel <= 1e-5, (name, rel)


def _final_params(client, chunk_size: int | None) -> np.ndarray:
    with fg.Run(pipeline(clients=13), model=small_model(), data=small_data(), seed=SEED, cluster=client,
                chunk_size=chunk_size, progress=False, evaluate="never") as run:
        run.fit(rounds=3)
        return run.params.flat


def test_bit_identical_across_workers_and_chunk_sizes(client1, client2):
    base = _final_params(client1, None)
    for client, chunk in [(client2, None), (client2, 1), (client2, 3), (client2, 5), (client1, 4), (client2, 13)]:
        other = _final_params(client, chunk)
        assert np.array_equal(base.view(np.uint32), other.view(np.uint32)), f"chunk_size={chunk}"


def test_many_chunks_combine_on_workers(client2):
    # 13 clients in chunks of 1 is more partials than the driver gathers directly (tree on the workers)
    a = _final_params(client2, 1)
    b = _final_params(client2, 2)
    assert np.array_equal(a, b)


def test_history_metrics(client2):
    with fg.Run(pipeline(clients=6) >> st.Evaluate(every=2), model=small_model(), data=small_data(), seed=SEED,
                cluster=client2, progress=False) as run:
        h = run.fit(rounds=3)
        h = run.fit(rounds=1)  # fits continue the round count
    assert [r["round"] for r in h] == [1, 2, 3, 4]
    assert h.column("clients_done") == [6, 6, 6, 6]
    assert [r["round"] for r in h if "accuracy" in r] == [2, 3, 4]  # every 2, and the last round of each fit
    row = h[0]
    nbytes = run.state.params.nbytes
    assert row["bytes_down"] == 6 * nbytes and row["bytes_up"] == 6 * nbytes
    assert row["samples"] == 6 * N
    assert row["time_local-train"] > 0 and row["round_time"] >= row["time_clients_wall"] > 0
    assert 0 < h.last("loss") < 10 and 0 <= h.last("accuracy") <= 1
    assert "round" in h.table()


def test_learns(client2):
    with fg.Run(pipeline(clients=10, epochs=1, lr=0.2) >> st.Evaluate(every=1), model=small_model(),
                data=small_data(), seed=SEED, cluster=client2, progress=False) as run:
        h = run.fit(rounds=8)
    acc = h.column("accuracy")
    assert acc[-1] > acc[0] and acc[-1] > 0.5, acc
    assert isinstance(run.model, torch.nn.Module)


def test_compress_reports_bytes(client2):
    p = (st.Select(clients=6) >> st.Broadcast() >> st.LocalTrain(batch_size=8) >> st.Compress("fp16")
         >> st.Aggregate())
    with fg.Run(p, model=small_model(), data=small_data(), seed=SEED, cluster=client2, progress=False,
                evaluate="never") as run:
        row = run.fit(rounds=1)[0]
    assert row["bytes_up"] * 2 == row["bytes_up_raw"]


@pytest.mark.parametrize("bad", [0, -1])
def test_fit_needs_rounds(client2, bad):
    run = fg.Run(pipeline(), model=small_model(), data=small_data(), cluster=client2, progress=False)
    with pytest.raises(fg.ConfigError):
        run.fit(rounds=bad)


class Recorder:
    def __init__(self):
        self.events = []

    def on_start(self, run):
        self.events.append(("start", run.round))

    def on_round(self, run, row):
        self.events.append(("round", row["round"]))

    def on_end(self, run):
        self.events.append(("end", run.round))

    def on_close(self, run):
        self.events.append(("close", run.round))


class Broken:
    def on_round(self, run, row):
        raise RuntimeError("a broken callback")


def test_callbacks_see_the_run(client2):
    rec = Recorder()
    with fg.Run(pipeline(clients=4), model=small_model(), data=small_data(), cluster=client2, progress=False,
                evaluate="never", callbacks=[Broken(), rec]) as run:
        run.fit(rounds=2)
    assert rec.events == [("start", 0), ("round", 1), ("round", 2), ("end", 2), ("close", 2)]


def count_samples(work):
    """Client work for map_clients: runs where the client lives."""
    return (work.client, len(work.data.y), float(work.global_params.flat.sum()))


class ClientSizes(fg.ServerStage):
    """A server stage that asks every selected client for its sample count (client-side work)."""

    def run(self, ctx):
        res = ctx.map_clients(count_samples, ctx.clients.ids)
        assert [r[0] for r in res] == ctx.clients.ids.tolist()
        ctx.metrics["sizes_seen"] = sum(r[1] for r in res)
        ctx.metrics["params_sum_seen"] = res[0][2]


def test_map_clients_runs_on_workers_in_order(client2):
    p = (st.Select(clients=7) >> ClientSizes() >> st.Broadcast() >> st.LocalTrain(batch_size=8)
         >> st.Aggregate())
    with fg.Run(p, model=small_model(), data=small_data(), cluster=client2, chunk_size=2, progress=False,
                evaluate="never") as run:
        first = float(run.params.flat.sum())
        row = run.fit(rounds=1)[0]
    assert row["sizes_seen"] == 7 * N
    assert row["params_sum_seen"] == pytest.approx(first)
