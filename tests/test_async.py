"""The asynchronous engine (FedBuff): virtual-clock order, determinism, staleness, faults, resume."""

from __future__ import annotations

import numpy as np
import pytest

import flgraph as fg
from flgraph import stages as st
from flgraph.sim import DevicePopulation, DeviceProfile

D, K = 8, 3


def data(num_clients: int = 200, empty: bool = False) -> fg.data.FederatedDataset:
    base = fg.data.synthetic_classification(num_clients=num_clients, samples_per_client=16, num_features=D,
                                            num_classes=K, seed=3, test_samples=90)
    if not empty:
        return base
    return fg.data.FederatedDataset.from_function(EmptyFive(base), num_clients=num_clients)


class EmptyFive:
    def __init__(self, base):
        self.base = base

    def __call__(self, k):
        d = self.base.load(k)
        return (d.x[:0], d.y[:0]) if k % 10 == 5 else (d.x, d.y)


def devices(n: int = 200) -> DevicePopulation:
    return DevicePopulation.lognormal(range(n), seed=2, speed=20.0, speed_sigma=1.0)


def fedbuff(**kw) -> fg.Pipeline:
    return fg.recipes.fedbuff(concurrency=kw.pop("concurrency", 12), buffer=kw.pop("buffer", 4),
                              devices=kw.pop("devices", devices()), batch_size=8, lr=0.1, evaluate_every=None,
                              **kw)


def run(p, client, steps, **kw):
    with fg.Run(p, model=fg.models.mlp(D, [16], K, seed=0), data=kw.pop("data", data()), seed=4, cluster=client,
                progress=False, evaluate="never", **kw) as r:
        h = r.fit(rounds=steps)
        return r.params.flat, h


def test_bit_identical_with_one_and_two_workers(client1, client2):
    p = fedbuff(max_staleness=6, compress="lz4")
    a, ha = run(p, client1, 6)
    b, hb = run(p, client2, 6)
    assert np.array_equal(a, b)
    assert [r["arrivals"] for r in ha] == [r["arrivals"] for r in hb]
    assert [r["sim_time"] for r in ha] == [r["sim_time"] for r in hb]


def test_steps_buffer_and_staleness(client2):
    _, h = run(fedbuff(buffer=4, max_staleness=2), client2, 8)
    assert all(r["clients_done"] == 4 for r in h)
    assert all(r["staleness_max"] <= 2 for r in h)
    assert sum(r["clients_stale"] for r in h) > 0  # 12 in flight, steps every 4: some updates are too stale
    arrivals = [i for r in h for i in r["arrivals"]]
    assert len(arrivals) == len(set(arrivals))  # every update is processed once
    sim = [r["sim_time"] for r in h]
    assert sim == sorted(sim) and sim[-1] > 0
    assert h[-1]["bytes_down"] > 0 and h[-1]["bytes_up"] > 0


def test_arrivals_follow_the_virtual_clock_not_real_completion(client2):
    # device speeds differ 100x: the slow clients dispatched first must arrive late in virtual time
    slow_first = DevicePopulation({k: DeviceProfile(0.2 if k < 100 else 20.0, 1e9, 1e9)
                                   for k in range(200)})
    _, h = run(fedbuff(devices=slow_first, concurrency=6, buffer=3), client2, 4)
    assert all(r["sim_time"] > 0 for r in h)
    assert h[0]["sim_time"] < 16 / 0.2  # fast clients' updates stepped the server before any slow one


def test_failing_clients_are_counted_and_the_run_goes_on(client2):
    _, h = run(fedbuff(), client2, 5, data=data(empty=True), on_client_error="drop")
    assert sum(r["clients_failed"] for r in h) > 0
    assert all(r["clients_done"] == 4 for r in h)


def test_resume_redispatches_in_flight_clients_once(client1, tmp_path):
    path = tmp_path / "async.zarr"
    p = fedbuff()
    with fg.Run(p, model=fg.models.mlp(D, [16], K, seed=0), data=data(), seed=4, cluster=client1, progress=False,
                evaluate="never", checkpoint=path) as r:
        r.fit(rounds=3)
        key = next(k for k in r.state.stage_states if k.endswith("buffered-aggregate"))
        inflight = r.state.stage_states[key]["inflight"]
        assert len(inflight) == 12
    with fg.resume(path, cluster=client1, progress=False) as r:
        assert r.round == 3
        h = r.fit(rounds=3)
    arrivals = [i for row in h for i in row["arrivals"]]
    assert len(arrivals) == len(set(arrivals))
    redispatched = {int(i) for i in inflight[:, 0]}
    later = {i for row in h[3:] for i in row["arrivals"]}
    assert redispatched & later  # clients in flight at the snapshot arrived after the resume, once each


def test_async_pipelines_are_checked():
    with pytest.raises(fg.ConfigError, match="concurrency 200 needs more clients"):
        fg.Run(fg.recipes.fedbuff(concurrency=200, evaluate_every=None), model=fg.models.mlp(D, [16], K),
               data=data(), progress=False)
    with pytest.raises(fg.ConfigError, match="one at a time"):
        fg.Run(st.Select(clients=5, over_select=1.5) >> st.Broadcast() >> st.LocalTrain()
               >> st.BufferedAggregate(2), model=fg.models.mlp(D, [16], K), data=data(), progress=False)
    with pytest.raises(fg.ConfigError, match="staleness"):
        st.BufferedAggregate(4, staleness=3)


def test_fedbuff_composes_with_compression_clipping_and_a_server_optimizer(client1, client2):
    p = (st.Select(clients=10) >> st.Simulate(devices()) >> st.Broadcast() >> st.LocalTrain(batch_size=8, lr=0.1)
         >> st.Compress("int8")
         >> st.BufferedAggregate(4, clip_norm=0.05, optimizer=st.ServerOpt(method="adam", lr=0.01)))
    a, h = run(p, client1, 4)
    b, _ = run(p, client2, 4)
    assert np.array_equal(a, b)
    assert all(r["bytes_up"] * 3 < r["bytes_up_raw"] for r in h)  # int8 (+ per-tensor scales on a tiny model)
    assert all(r["update_norm"] <= 0.05 + 1e-6 for r in h)  # a mean of clipped updates is clipped too
    with pytest.raises(fg.ConfigError, match="step"):
        st.BufferedAggregate(4, optimizer="adam")
