"""Oort over a large population: the statistics are kept for explored clients only, and above 100,000
clients the choice is made without arrays over the population, giving the same clients with the same draws
as the selector over population arrays (itself checked against an independent implementation in
test_oort.py)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from flgraph.stages.oort import STATS, oort_choice
from flgraph.stages.oort_explored import IDS, SizeOrder, dense, explored, merge_rows, sparse_choice

import flgraph as fg
from flgraph import stages as st
from flgraph.context import RoundContext
from flgraph.params import Params, ParamSpec
from flgraph.rng import stream


@pytest.mark.parametrize(("blacklist", "estimate"), [(-1, False), (1, False), (-1, True), (2, True)])
def test_the_sparse_choice_is_the_choice_over_population_arrays(blacklist, estimate):
    n, k, rounds = 3_000, 40, 14
    rs = np.random.default_rng(11)
    sizes = rs.integers(0, 30, n).astype(float)  # many ties, some empty clients
    # estimated durations with ties too (a few speeds), so that penalised weights tie across clients
    est = rs.choice([5.0, 10.0, 20.0, 40.0, 80.0], n) * sizes / 10 + 1.0 if estimate else None
    cfg = st.OortSelect(clients=k, pacer_step=3, blacklist_rounds=blacklist)
    state_dense, state_sparse = cfg.init_state(None), cfg.init_state(None)  # type: ignore[arg-type]
    population = np.arange(n, dtype=np.int64) * 3 + 5  # ids are not positions
    table = explored({}, population)
    order = SizeOrder(sizes, est, cfg.round_penalty)
    for rnd in range(1, rounds + 1):
        stats = dense(table, population)
        want = oort_choice(cfg, state_dense, stats, sizes, np.ones(n, bool), k, rnd, stream(3, 1, rnd), est)
        seen = np.searchsorted(population, table[IDS])
        got = sparse_choice(cfg, state_sparse, table, seen, order, k, rnd, stream(3, 1, rnd))
        assert got.tolist() == want.tolist(), rnd
        for name in ("exploration", "threshold", "exploit_util", "exploited"):
            np.testing.assert_array_equal(state_sparse[name], state_dense[name])
        counted = population[want[: k - 5]]  # five of the chosen give no feedback
        rows = np.column_stack([counted, rs.gamma(2.0, 30.0, len(counted)), rs.lognormal(3.0, 1.0, len(counted))])
        table = merge_rows(table, rows, rnd)
    assert len(table[IDS]) < n // 2 and state_dense["threshold"] != 30.0


def test_statistics_of_the_population_format_are_read_as_explored_clients():
    population = np.array([2, 4, 6, 8], np.int64)
    old = {"oort_utility": np.array([0.0, 1.5, 0.0, 2.5]), "oort_duration": np.array([0.0, 3.0, 0.0, 4.0]),
           "oort_round": np.array([0, 2, 0, 1]), "oort_count": np.array([0, 2, 0, 1])}
    table = explored(old, population)
    assert table[IDS].tolist() == [4, 8] and table["oort_count"].tolist() == [2, 1]
    back = dense(table, population)
    for s in STATS:
        np.testing.assert_array_equal(back[s], old[s])


def _ctx(rnd: int, data, values, state) -> RoundContext:
    params = Params(ParamSpec.from_shapes([("w", (2,), "float32")]), np.zeros(2, np.float32))
    c = RoundContext(rnd, 7, params, data, None, False)
    c.values, c.state = values, state
    return c


def test_a_round_of_oort_over_a_million_clients_allocates_no_population_arrays():
    population = 1_000_000
    data = fg.data.FederatedDataset.from_function(lambda k: (np.zeros((1, 2)), np.zeros(1)), population,
                                                  num_samples=lambda k: 1 + (k * 7919) % 50)
    select, feedback = st.OortSelect(clients=500), st.OortFeedback()
    state: dict = {}
    kept = feedback.init_state(None)  # type: ignore[arg-type]
    rs = np.random.default_rng(0)
    for rnd in range(1, 4):
        if rnd == 3:
            tracemalloc.start()
        ctx = _ctx(rnd, data, kept, state)
        select.run(ctx)
        if rnd == 3:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        chosen = ctx.clients.ids
        assert len(np.unique(chosen)) == len(chosen) == 650  # over-commitment 1.3
        fb = _ctx(rnd, data, {}, kept)
        rows = np.column_stack([chosen[:500], rs.gamma(2.0, 30.0, 500), rs.lognormal(3.0, 1.0, 500)])
        fb.aggregates = {"utility": (rows, 500.0)}
        feedback.run(fb)
    # a float array over the population is 8 MB, a bool mask 1 MB; the round holds O(explored + chosen)
    assert peak < 2**20 // 2, peak
    assert len(kept[IDS]) == 1_500 and kept["oort_count"].sum() == 1_500
    # the unexplored clients chosen are among the largest (the exploration pool is the largest unexplored)
    sizes = np.array([data.num_samples(int(c)) for c in chosen])
    assert sizes[: int(650 * 0.9)].min() >= 45


def test_a_checkpoint_with_population_arrays_resumes_as_a_run_that_never_stopped(client2, tmp_path, monkeypatch):
    from test_oort import _data, _model, _pipeline

    with fg.Run(_pipeline(), model=_model(), data=_data(), seed=0, cluster=client2, progress=False,
                dashboard=False, metrics_log=None) as run:
        run.fit(4)
        whole = run.state.params.flat.copy()
    new_run = st.OortFeedback.run

    def old_format(self, ctx):  # the format before oort_ids: arrays over the population
        new_run(self, ctx)
        table = {k: ctx.state.pop(k) for k in (*STATS, IDS)}
        ctx.state.update(dense(table, ctx.dataset.client_ids))

    path = tmp_path / "old.zarr"
    with monkeypatch.context() as m:
        m.setattr(st.OortFeedback, "run", old_format)
        m.setattr(st.OortFeedback, "keeps", frozenset(STATS))
        m.setattr(st.OortFeedback, "writes", lambda self: frozenset(STATS))
        m.setattr(st.OortSelect, "reads_kept", lambda self: frozenset(STATS))
        m.setattr(st.OortSelect, "reads", lambda self: frozenset(STATS))
        with fg.Run(_pipeline(), model=_model(), data=_data(), seed=0, cluster=client2, progress=False,
                    dashboard=False, checkpoint=str(path)) as run:
            run.fit(2)
            key = next(k for k in run.state.stage_states if k.endswith("oort-feedback"))
            assert IDS not in run.state.stage_states[key] and len(run.state.stage_states[key]["oort_count"]) == 24
    with fg.resume(str(path), cluster=client2, pipeline=_pipeline(), progress=False, dashboard=False) as run:
        run.fit(2)
        assert np.array_equal(run.state.params.flat, whole)
        assert len(run.state.stage_states[key][IDS]) < 24  # kept for explored clients from then on


def _small_client(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([3, k])
    n = 4 + k % 9
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)


def test_an_oort_run_over_150000_clients_equals_the_run_over_population_arrays(client2, monkeypatch):
    import flgraph.stages.oort as oort_module
    from test_oort import _model

    population = 150_000
    devices = fg.sim.DevicePopulation.lognormal(population, seed=1)

    def run() -> tuple[np.ndarray, list]:
        data = fg.data.FederatedDataset.from_function(_small_client, population, num_samples=lambda k: 4 + k % 9)
        p = fg.recipes.oort(clients=6, simulate=st.Simulate(devices), batch_size=4, lr=0.1, evaluate_every=None,
                            select={"pacer_step": 2})
        with fg.Run(p, model=_model(), data=data, seed=1, cluster=client2, progress=False, dashboard=False,
                    metrics_log=None, evaluate="never") as r:
            h = r.fit(5)
            return r.state.params.flat.copy(), [row["oort_threshold"] for row in h]

    sparse, thresholds = run()  # above 100,000 clients: no arrays over the population per round
    monkeypatch.setattr(oort_module, "EXACT_AVAILABILITY_UP_TO", 10**9)
    exact, thresholds_exact = run()  # the selector over population arrays
    np.testing.assert_array_equal(sparse, exact)
    assert thresholds == thresholds_exact
