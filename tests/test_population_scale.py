"""A million registered clients: building the population and drawing a round's clients cost
O(clients per round), not O(population), in time and driver memory; the cheaper draws are the same draws."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

import flgraph as fg
from flgraph import stages as st
from flgraph.engine.asynchronous import _free_draw
from flgraph.sim import DevicePopulation
from flgraph.sim.devices import _lognormal_profile

POPULATION, PER_ROUND = 1_000_000, 10_000


def _client(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([5, k])
    return rng.standard_normal((4, 16)).astype(np.float32), rng.integers(0, 4, 4)


def test_a_million_clients_build_and_draw_in_under_a_second_and_a_few_mb() -> None:
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        data = fg.data.FederatedDataset.from_function(_client, POPULATION)
        devices = DevicePopulation.lognormal(POPULATION, seed=3, mean_on=3600.0, mean_off=1800.0)
        select = st.Select(clients=PER_ROUND)
        select.prepare(data, None)
        rounds = [select._select(r, 0, data, None, {}) for r in (1, 2)]
        busy = rounds[0].ids[:50]
        async_draws = [_free_draw(select, data.client_ids, busy, 0, i) for i in range(100)]
        profiles = [devices.profile(int(k)) for k in rounds[1].ids[:100]]
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the ids themselves are 8 MB (int64); everything else must stay small: O(clients per round)
    ids_mb = data.client_ids.nbytes / 2**20
    assert elapsed < 1.0 * 3, elapsed  # about 0.1 s alone; x3 for a loaded CI machine
    assert (peak / 2**20) < ids_mb + 4, (peak / 2**20, ids_mb)
    assert len(devices) == POPULATION and all(p.speed > 0 for p in profiles)
    for r, clients in zip((1, 2), rounds):
        want = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(select.tag, r))).choice(
            POPULATION, size=PER_ROUND, replace=False)
        np.testing.assert_array_equal(clients.ids, want)
    assert not set(async_draws) & set(busy.tolist())


def test_the_async_draw_without_the_free_array_is_the_same_draw() -> None:
    select = st.Select(clients=1)
    population = np.array([2, 3, 5, 7, 11, 13, 17, 19, 23, 29])
    rng = np.random.default_rng(0)
    for i in range(300):
        busy = rng.choice(population, size=int(rng.integers(0, 9)), replace=False)
        free = population[~np.isin(population, busy)]
        want = int(select.draw(free, 1, seed=4, dispatch=i).ids[0])
        assert _free_draw(select, population, busy, 4, i) == want


def test_lazy_lognormal_devices_equal_the_documented_draws() -> None:
    pop = DevicePopulation.lognormal([9, 4, 7], seed=1, speed=50.0, mean_on=10.0, mean_off=5.0, period=100.0)
    assert sorted(pop.profiles) == [4, 7, 9] and 4 in pop.profiles and 5 not in pop.profiles
    for k in (4, 7, 9):
        g = np.random.default_rng(np.random.SeedSequence(1, spawn_key=(0x5E71CE, k)))
        s, _, _ = g.standard_normal(3)
        assert pop.profile(k).speed == 50.0 * float(np.exp(0.8 * s))
        assert pop.profile(k) == _lognormal_profile(k, 1, 50.0, 0.8, 2.5e6, 0.6, 1.0e6, 0.6, 10.0, 5.0, 100.0)
    assert pop.flgraph_spec()[1]["client_ids"] == [4, 7, 9]
    assert DevicePopulation.lognormal(3, seed=1).flgraph_spec()[1]["client_ids"] == 3


def test_always_online_devices_answer_without_making_profiles() -> None:
    pop = DevicePopulation.lognormal(POPULATION, seed=2)
    t = time.perf_counter()
    assert pop.online_mask(np.arange(POPULATION), 10.0).all()
    assert time.perf_counter() - t < 1.0
    with pytest.raises(fg.errors.DataError, match="no device profile"):
        pop.online_mask(np.array([3, POPULATION]), 10.0)


def test_a_round_draws_available_clients_of_a_million_checking_o_count_profiles(monkeypatch) -> None:
    import flgraph.sim.devices as devices_module

    made: list[int] = []

    def counted(k: int, *args: object, **kwargs: object) -> object:
        made.append(k)
        return _lognormal_profile(k, *args, **kwargs)  # type: ignore[arg-type]

    data = fg.data.FederatedDataset.from_function(_client, POPULATION)
    devices = DevicePopulation.lognormal(POPULATION, seed=3, mean_on=3600.0, mean_off=1800.0)
    monkeypatch.setattr(devices_module, "_lognormal_profile", counted)
    select, count, at = st.Select(clients=1_000, available=devices), 1_000, 40_000.0
    metrics: dict[str, object] = {}
    t0 = time.perf_counter()
    clients = select._select(1, 0, data, at, metrics)
    elapsed = time.perf_counter() - t0
    checked = len(made)
    assert len(clients) == count and len(np.unique(clients.ids)) == count
    assert checked < 2 * count, checked  # about count / availability (2/3), not a million
    assert elapsed < 1.0 * 3, elapsed  # x3 for a loaded machine
    assert all(devices.profile(int(k)).online(at) for k in clients.ids)
    again = select._select(1, 0, data, at, {})
    np.testing.assert_array_equal(clients.ids, again.ids)  # the same seed, the same draw
    assert "clients_available" not in metrics
    # the estimate against the exact share online over an independent sample of 20,000 devices
    sample = np.random.default_rng(9).choice(POPULATION, 20_000, replace=False)
    share = devices.online_mask(sample, at).mean()
    assert abs(int(metrics["clients_available_est"]) / POPULATION - share) < 0.06  # type: ignore[call-overload]


def test_few_available_clients_of_a_large_population_fall_back_to_the_exact_count() -> None:
    data = fg.data.FederatedDataset.from_function(_client, 200_000)
    metrics: dict[str, object] = {}
    # 20 of 200,000 available: about 100,000 candidates to find 10, more than a quarter of the population
    clients = st.Select(clients=10, available=lambda ids, round, time: ids < 20)._select(1, 0, data, None, metrics)
    assert metrics["clients_available"] == 20 and "clients_available_est" not in metrics
    assert len(clients) == 10 and (clients.ids < 20).all()


def test_the_rejection_draw_is_uniform_over_the_available_clients(monkeypatch) -> None:
    import flgraph.stages.available_draw as available_draw

    monkeypatch.setattr(available_draw, "_MAX_CHECKED_SHARE", 100.0)  # never fall back on this small population
    ids = np.arange(100, 160)
    available = ids % 3 != 0  # 40 of 60 online
    draws, want = 4_000, 5
    hits = np.zeros(len(ids), np.int64)
    for s in range(draws):
        got = available_draw.draw_available(ids, want, np.random.default_rng(s), lambda c: c % 3 != 0)
        assert got is not None and len(np.unique(got.ids)) == want
        hits[np.searchsorted(ids, got.ids)] += 1
    assert hits[~available].sum() == 0
    expected = draws * want / available.sum()
    chi2 = float((((hits[available] - expected) ** 2) / expected).sum())
    assert chi2 < 72.05, chi2  # the 0.999 quantile of chi-square with 39 degrees of freedom
