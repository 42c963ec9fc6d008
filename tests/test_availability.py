"""Select(available=...): clients that are away are not drawn (sync rounds, simulated devices, async)."""

from __future__ import annotations

import numpy as np
import pytest

import flgraph as fg
from flgraph import stages as st
from flgraph.context import RoundContext
from flgraph.errors import ConfigError
from flgraph.params import Params, ParamSpec
from flgraph.sim import DevicePopulation, DeviceProfile


def data(n: int = 40) -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=n, samples_per_client=8, num_features=4, num_classes=2,
                                            seed=1, test_samples=20)


def ctx(rnd: int, dataset: fg.data.FederatedDataset, time: float | None = None) -> RoundContext:
    params = Params(ParamSpec.from_shapes([("w", (2,), "float32")]), np.zeros(2, np.float32))
    c = RoundContext(rnd, 0, params, dataset, None, False)
    c.time = time
    return c


def away_on_odd_rounds(ids: np.ndarray, round: int, time: float | None) -> np.ndarray:
    """Clients with an id below 10 are always there; the others only in even rounds."""
    return (ids < 10) | (round % 2 == 0)


def test_select_draws_only_available_clients():
    ds = data()
    sel = st.Select(clients=5, available=away_on_odd_rounds)
    for rnd in range(1, 9):
        c = ctx(rnd, ds)
        sel.run(c)
        assert c.clients is not None and len(c.clients) == 5
        if rnd % 2:
            assert (c.clients.ids < 10).all() and c.metrics["clients_available"] == 10
        else:
            assert c.metrics["clients_available"] == 40
    few = st.Select(clients=5, available=lambda ids, round, time: ids < 3)  # fewer than asked: all of them
    c = ctx(1, ds)
    few.run(c)
    assert sorted(c.clients.ids.tolist()) == [0, 1, 2]  # type: ignore[union-attr]


def test_availability_errors_are_clear():
    ds = data()
    with pytest.raises(ConfigError, match="no client is available"):
        st.Select(clients=5, available=lambda ids, round, time: np.zeros(len(ids), bool)).run(ctx(1, ds))
    with pytest.raises(ConfigError, match="expected a bool mask of shape"):
        st.Select(clients=5, available=lambda ids, round, time: ids[:3] > 0).run(ctx(1, ds))
    with pytest.raises(ConfigError, match="neither a DevicePopulation nor a function"):
        st.Select(clients=5, available=3)
    pop = DevicePopulation({c: DeviceProfile(1.0, 1e9, 1e9) for c in range(40)})
    with pytest.raises(ConfigError, match="has no Simulate stage"):
        st.Select(clients=5, available=pop).run(ctx(1, ds))


def diurnal(n: int = 40) -> DevicePopulation:
    """Half the devices are online in the first half of each 100 s period, the other half in the second."""
    return DevicePopulation({c: DeviceProfile(1000.0, 1e9, 1e9, on=((0.0, 50.0),) if c % 2 else ((50.0, 100.0),),
                                              period=100.0) for c in range(n)})


def test_select_reads_device_availability_on_the_virtual_clock():
    ds, pop = data(), diurnal()
    sel = st.Select(clients=4, available=pop)
    for t, parity in ((10.0, 1), (60.0, 0), (140.0, 1)):
        c = ctx(1, ds, time=t)
        sel.run(c)
        assert (c.clients.ids % 2 == parity).all(), (t, c.clients.ids)  # type: ignore[union-attr]


def test_sync_run_with_simulated_devices_drops_nobody_for_being_away(client2):
    ds, pop = data(), diurnal()
    rows = {}
    for name, available in (("blind", None), ("aware", pop)):
        p = (st.Select(clients=6, available=available) >> st.Simulate(pop, deadline=30.0) >> st.Broadcast()
             >> st.LocalTrain(epochs=1, batch_size=4) >> st.Aggregate(st.WeightedMean()))
        with fg.Run(p, model=fg.models.mlp(4, [8], 2, seed=0), data=ds, seed=2, cluster=client2, progress=False,
                    dashboard=False, evaluate="never") as run:
            rows[name] = [dict(r) for r in run.fit(rounds=6)]
    blind = sum(r["clients_dropped"] for r in rows["blind"])
    aware = sum(r["clients_dropped"] for r in rows["aware"])
    assert blind > 0 and aware == 0, (blind, aware)
    assert all(r["clients_done"] == 6 and r["clients_available"] == 20 for r in rows["aware"])


def test_async_dispatch_draws_available_clients(client2):
    ds = data()
    p = (st.Select(clients=4, available=lambda ids, round, time: ids % 4 == 0) >> st.Broadcast()
         >> st.LocalTrain(epochs=1, batch_size=4) >> st.BufferedAggregate(buffer=2))
    with fg.Run(p, model=fg.models.mlp(4, [8], 2, seed=0), data=ds, seed=2, cluster=client2, progress=False,
                dashboard=False, evaluate="never") as run:
        run.fit(rounds=4)
        used = {f.client for f in run.engine.flights.values()}  # the clients training now
    assert used and all(c % 4 == 0 for c in used), used
