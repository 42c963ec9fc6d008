"""Simulated devices on a virtual clock: deadlines, cut-offs, over-selection, dropouts (sync engine)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

import flgraph as fg
from flgraph import stages as st
from flgraph.sim import DevicePopulation, DeviceProfile

D, K, N = 8, 3, 16
NBYTES = 4 * ((D * 16 + 16) + (16 * K + K))  # mlp(D, [16], K) in float32


def data(num_clients: int = 100) -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=num_clients, samples_per_client=N, num_features=D,
                                            num_classes=K, seed=5, test_samples=60)


def model():
    return fg.models.mlp(D, [16], K, seed=0)


def troubled_population(num_clients: int = 100) -> DevicePopulation:
    """70% fast devices; 15% too slow for a 10 s deadline; 15% that go offline 1 s into a round."""
    profiles = {}
    for k in range(num_clients):
        if k % 20 < 3:
            profiles[k] = DeviceProfile(speed=0.5, down_bps=1e6, up_bps=1e6)  # 16 samples: 32 s
        elif k % 20 < 6:
            profiles[k] = DeviceProfile(speed=100.0, down_bps=1e6, up_bps=1e6, on=((0.0, 1.0),), period=1e9)
        else:
            profiles[k] = DeviceProfile(speed=100.0 + k, down_bps=1e6, up_bps=1e6)
    return DevicePopulation(profiles)


def test_round_completes_with_n_updates_by_its_deadline(client2):
    # 30% of the selected clients are too slow or drop out; over-selection draws 1.5 x 10
    p = (st.Select(clients=10, over_select=1.5) >> st.Simulate(troubled_population(), deadline=10.0)
         >> st.Broadcast() >> st.LocalTrain(batch_size=8) >> st.Aggregate())
    with fg.Run(p, model=model(), data=data(), seed=3, cluster=client2, progress=False, evaluate="never") as run:
        h = run.fit(rounds=4)
    for row in h:
        ok = 15 - sum(1 for c in row["dropped_clients"] if c % 20 < 6)
        assert row["clients_done"] == min(10, ok)
        assert row["clients_done"] + row["clients_dropped"] == 15
        assert row["sim_round_time"] <= 10.0
        assert row["clients_failed"] == 0
    assert any(row["clients_done"] == 10 for row in h)
    assert h[-1]["sim_time"] == pytest.approx(sum(r["sim_round_time"] for r in h))
    assert sum(r["clients_dropped"] for r in h) >= 4 * 5


def test_slow_and_offline_clients_are_dropped_with_reasons(client2):
    p = (st.Select(clients=20) >> st.Simulate(troubled_population(), deadline=10.0) >> st.Broadcast()
         >> st.LocalTrain(batch_size=8) >> st.Aggregate())
    with fg.Run(p, model=model(), data=data(), seed=1, cluster=client2, progress=False, evaluate="never") as run:
        row = run.fit(rounds=1)[0]
    dropped = set(row["dropped_clients"])
    assert dropped and all(c % 20 < 6 for c in dropped)
    assert row["clients_done"] == 20 - len(dropped)
    # a client missed the deadline, so the server waited until it
    if any(c % 20 < 3 for c in dropped):
        assert row["sim_round_time"] == 10.0


def test_cutoff_sends_partial_work_instead_of_missing_the_deadline(client2):
    slow = {k: DeviceProfile(speed=2.0 if k % 2 else 200.0, down_bps=1e6, up_bps=1e6) for k in range(100)}
    pop = DevicePopulation(slow)
    base = st.Select(clients=10) >> st.Simulate(pop, deadline=4.0, cutoff=True)
    p = base >> st.Broadcast() >> st.LocalTrain(epochs=2, batch_size=4) >> st.Aggregate()
    with fg.Run(p, model=model(), data=data(), seed=2, cluster=client2, progress=False, evaluate="never") as run:
        row = run.fit(rounds=1)[0]
    assert row["clients_dropped"] == 0 and row["clients_done"] == 10
    # slow devices (2 samples/s, 4 s) train on about 8 samples instead of 32: fewer steps on average
    assert row["steps"] < 8
    assert row["sim_round_time"] <= 4.0


def test_simulated_runs_are_bit_identical_across_workers(client1, client2):
    def final(client):
        p = (st.Select(clients=12, over_select=1.3) >> st.Simulate(DevicePopulation.lognormal(
            range(100), seed=4, speed=50.0, speed_sigma=1.2), deadline=30.0)
             >> st.Broadcast() >> st.LocalTrain(batch_size=8) >> st.Compress("lz4") >> st.Aggregate())
        with fg.Run(p, model=model(), data=data(), seed=9, cluster=client, progress=False,
                    evaluate="never") as run:
            h = run.fit(rounds=3)
            return run.params.flat, [r["dropped_clients"] for r in h], h[-1]["sim_time"]

    a, b = final(client1), final(client2)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_over_selection_without_devices_uses_real_completion(client2):
    p = st.Select(clients=6, over_select=1.5) >> st.Broadcast() >> st.LocalTrain(batch_size=8) >> st.Aggregate()
    with fg.Run(p, model=model(), data=data(), seed=3, cluster=client2, progress=False, evaluate="never") as run:
        row = run.fit(rounds=1)[0]
    assert row["clients_done"] == 6 and row["clients_dropped"] == 3


def test_lognormal_population_is_deterministic_and_spread():
    a = DevicePopulation.lognormal(range(1000), seed=0, speed_sigma=1.0)
    b = DevicePopulation.lognormal(range(500, 1000), seed=0, speed_sigma=1.0)
    assert a.profile(700) == b.profile(700)  # a client's device does not depend on the others
    assert a.spread() > 10
    c = DevicePopulation.lognormal(range(50), seed=0, mean_on=3600, mean_off=3600, period=86400)
    p = c.profile(3)
    assert p.on and any(p.online(t) for t in np.linspace(0, 86400, 200))
    assert not all(p.online(t) for t in np.linspace(0, 86400, 200))
    t = next(t for t in np.linspace(0, 86400, 2000) if p.online(t))
    assert (p.online_until(t) > t and not p.online(p.online_until(t) + 1e-6)) or p.online_until(t) == 86400


def test_trace_files(tmp_path):
    csv = tmp_path / "devices.csv"
    csv.write_text("client,speed,down_bps,up_bps,on,period\n0,10,1e6,5e5,0-100;200-300,1000\n1,20,2e6,1e6,,\n")
    pop = DevicePopulation.from_trace(csv)
    assert pop.profile(0).online(250) and not pop.profile(0).online(150) and pop.profile(0).online(1050)
    assert pop.profile(1).on is None and pop.profile(1).speed == 20
    js = tmp_path / "devices.json"
    js.write_text(json.dumps([{"client": 5, "speed": 3, "down_bps": 1, "up_bps": 2, "on": [[0, 10]],
                               "period": 20}]))
    assert DevicePopulation.from_trace(js).profile(5).online(25)
    bad = tmp_path / "bad.csv"
    bad.write_text("client,speed\n0,1\n")
    with pytest.raises(fg.DataError, match="entry 1"):
        DevicePopulation.from_trace(bad)
    with pytest.raises(fg.DataError, match="no device profile"):
        pop.profile(99)
    with pytest.raises(fg.ConfigError, match="non-positive"):
        DevicePopulation({0: DeviceProfile(0.0, 1.0, 1.0)})


def test_fedscale_traces(tmp_path):
    cap = tmp_path / "client_device_capacity"
    cap.write_bytes(pickle.dumps({1: {"computation": 10.0, "communication": 8000.0},
                                  2: {"computation": 100.0, "communication": 800.0}}))
    beh = tmp_path / "client_behave_trace"
    beh.write_bytes(pickle.dumps({1: {"duration": 5, "active": [0, 50], "inactive": [10, 60], "finish_time": 100,
                                      "model": "x"}}))
    pop = DevicePopulation.from_fedscale(cap, beh, client_ids=[7, 8, 9])
    p7 = pop.profile(7)
    assert p7.speed == pytest.approx(1000 / 30) and p7.down_bps == pytest.approx(1e6)
    assert p7.online(5) and not p7.online(20) and p7.online(155)
    assert pop.profile(9).speed == p7.speed  # entries cycle
    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({1: math.sqrt}))  # refers to a function: code, not data
    with pytest.raises(fg.DataError, match="only plain data"):
        DevicePopulation.from_fedscale(evil)


def test_simulate_refuses_bad_settings():
    pop = DevicePopulation.lognormal(range(5), seed=0)
    with pytest.raises(fg.ConfigError, match="needs a deadline"):
        st.Simulate(pop, cutoff=True)
    with pytest.raises(fg.ConfigError, match="DevicePopulation"):
        st.Simulate({"not": "devices"})  # type: ignore[arg-type]
    p = st.Select(clients=2) >> st.Simulate(pop) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate()
    with pytest.raises(fg.ConfigError, match="no device profile"):
        fg.Run(p, model=model(), data=data(20), progress=False)
