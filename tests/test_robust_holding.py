"""Robust reducers that need every update: what they hold, and streaming it to disk (real cluster, real files).

The disk path is forced with a tiny memory budget (``FLGRAPH_ROBUST_MEMORY``, the documented knob) and must
give the params of the in-memory path bit for bit.
"""

from __future__ import annotations

import os
import tempfile
import tracemalloc

import numpy as np
import pytest
from flgraph.stages import holding, spill
from flgraph.stages.holding import HoldingPlan

import flgraph as fg
from flgraph import stages as st
from flgraph.context import ClientWork, Update
from flgraph.errors import ClientError, ConfigError
from flgraph.graph import ClientStage
from flgraph.params import ParamSpec

D, K, CLIENTS = 10, 3, 12


def data() -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=30, samples_per_client=12, num_features=D, num_classes=K,
                                            seed=5, test_samples=30)


class FailAt(ClientStage):
    """Fails the client at ``position`` of ``round`` (an injected client error)."""

    def __init__(self, round: int, position: int) -> None:
        self.round, self.position = round, position

    def run(self, work: ClientWork) -> None:
        if work.round == self.round and work.position == self.position:
            raise RuntimeError("injected failure")


def pipeline(reducer: object, fail: ClientStage | None = None) -> fg.Pipeline:
    p = st.Select(clients=CLIENTS) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=4, lr=0.3)
    if fail is not None:
        p = p >> fail
    return p >> st.Aggregate(reducer)


def fit(cluster, reducer, monkeypatch, budget: str | None, rounds: int = 2):
    if budget is None:
        monkeypatch.delenv("FLGRAPH_ROBUST_MEMORY", raising=False)
    else:
        monkeypatch.setenv("FLGRAPH_ROBUST_MEMORY", budget)
    run = fg.Run(pipeline(reducer), model=fg.models.mlp(D, [8], K, seed=2), data=data(), seed=4, cluster=cluster,
                 progress=False, evaluate="never", dashboard=False, metrics_log=None)
    with run:
        history = run.fit(rounds=rounds)
        root = run._holding.root
        files_between_rounds = root.files() if root is not None else []
    return run, history, root, files_between_rounds


@pytest.mark.parametrize("make", [lambda: st.Median(), lambda: st.TrimmedMean(0.2), lambda: st.Krum(2, m=3)],
                         ids=["median", "trimmed", "krum"])
def test_streamed_round_equals_the_in_memory_round(client2, monkeypatch, make):
    mem_run, mem_hist, mem_root, _ = fit(client2, make(), monkeypatch, None)
    monkeypatch.setattr(holding, "_MIN_BLOCK_BYTES", 0)  # blocks of 16 coordinates: several per model
    disk_run, disk_hist, root, left = fit(client2, make(), monkeypatch, "1")  # a 1-byte budget: to disk
    assert mem_root is None and [h.place for h in mem_run.holding] == ["memory"]
    assert [h.place for h in disk_run.holding] == ["disk"]
    assert disk_run._holding.reducers[0]._block == 16
    size = mem_run.params.spec.size
    for hist, place in ((mem_hist, "memory"), (disk_hist, "disk")):
        assert [r["updates_held_in"] for r in hist] == [place, place]
        assert [r["updates_held_bytes"] for r in hist] == [CLIENTS * size * 4] * 2
    # Median and the trimmed mean are coordinate-wise: the blocks give the whole stack's bits. Krum's
    # distances sum in another order (float64): the same choice, so the same mean of the chosen updates.
    assert np.array_equal(mem_run.params.flat, disk_run.params.flat)
    assert left == [], "the round's files are removed at its end"
    assert root is not None and not os.path.exists(root.path), "Run.close removes the directory"


def test_tiers_stream_their_first_tier_and_equal_memory(client2, monkeypatch):
    """Median per site, then the median of the sites: the first tier's client updates go to disk, the sites'
    results (a few) stay in memory, and the run's params equal the in-memory run's."""
    sited = data().with_attributes(site=lambda ids: ids % 3)

    def run_with(budget: str) -> tuple[np.ndarray, dict]:
        monkeypatch.setenv("FLGRAPH_ROBUST_MEMORY", budget)
        p = (st.Select(clients=CLIENTS) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=4, lr=0.3)
             >> st.Aggregate(st.Median(), by="site") >> st.Aggregate(st.Median()))
        with fg.Run(p, model=fg.models.mlp(D, [8], K, seed=2), data=sited, seed=4, cluster=client2,
                    progress=False, evaluate="never", dashboard=False, metrics_log=None) as run:
            assert len(run.holding) == 1  # the first tier holds the clients' updates; the second, 3 sites'
            row = run.fit(rounds=2)[-1]
            return run.params.flat.copy(), row

    in_memory, mem_row = run_with("1T")
    on_disk, disk_row = run_with("0")
    assert (mem_row["updates_held_in"], disk_row["updates_held_in"]) == ("memory", "disk")
    assert disk_row["updates_held_bytes"] >= CLIENTS * in_memory.size * 4
    assert np.array_equal(in_memory, on_disk)


def test_a_run_that_would_stream_refuses_workers_elsewhere(client2, monkeypatch):
    from flgraph.transports.dask import DaskTransport

    monkeypatch.setenv("FLGRAPH_ROBUST_MEMORY", "0")
    monkeypatch.setattr(DaskTransport, "on_this_machine", lambda self: False)  # injected: remote workers
    with fg.Run(pipeline(st.Median()), model=fg.models.mlp(D, [8], K, seed=2), data=data(), cluster=client2,
                progress=False, evaluate="never", dashboard=False, metrics_log=None) as run:
        with pytest.raises(ConfigError, match="other machines"):
            run.fit(rounds=1)
        assert run.round == 0


def test_a_client_error_leaves_no_file(client1, monkeypatch):
    monkeypatch.setenv("FLGRAPH_ROBUST_MEMORY", "1")
    run = fg.Run(pipeline(st.Median(), FailAt(2, 5)), model=fg.models.mlp(D, [8], K, seed=2), data=data(),
                 seed=4, cluster=client1, progress=False, evaluate="never", dashboard=False, metrics_log=None)
    root = run._holding.root
    assert root is not None
    with run:
        run.fit(rounds=1)
        with pytest.raises(ClientError, match="injected failure"):
            run.fit(rounds=1)
        assert run.round == 1
        assert root.files() == []
    assert not os.path.exists(root.path)


def test_holding_is_stated_before_the_run(client2, monkeypatch, caplog):
    monkeypatch.delenv("FLGRAPH_ROBUST_MEMORY", raising=False)
    with caplog.at_level("INFO", logger="flgraph"):
        run = fg.Run(pipeline(st.ClipNorm(st.Median(), max_norm=1.0)), model=fg.models.mlp(D, [8], K, seed=2),
                     data=data(), cluster=client2, progress=False, evaluate="never", dashboard=False,
                     metrics_log=None)
    with run:
        (h,) = run.holding
        size = run.params.spec.size
        assert (h.clients, h.values, h.itemsize, h.held_bytes) == (CLIENTS, size, 4, CLIENTS * size * 4)
        assert h.memory_peak_bytes >= 3 * h.held_bytes and h.place == "memory"
        assert f"{CLIENTS} updates x {size} values" in caplog.text
    mean = fg.Run(pipeline(st.WeightedMean()), model=fg.models.mlp(D, [8], K, seed=2), data=data(),
                  cluster=client2, progress=False, evaluate="never", dashboard=False, metrics_log=None)
    with mean:
        assert mean.holding == ()


def test_refused_when_the_disk_has_no_room_either():
    spec = ParamSpec.from_arrays({"w": np.zeros(100_000, np.float32)})
    graph = pipeline(st.TrimmedMean(0.1)).check()
    # Injected sizes: a 1 MiB memory budget and 10 MiB of free disk, for 12 x 400 KB of updates (4.8 MB)...
    plan = HoldingPlan.of(graph, 100, spec, "t", budget=1 << 20, free=10 << 20)
    assert plan.streams and plan.holdings[0].place == "disk"
    plan.close()
    # ... and 1 MiB of free disk: refused, naming the sizes and the fixes.
    with pytest.raises(ConfigError) as e:
        HoldingPlan.of(graph, 100, spec, "t", budget=1 << 20, free=1 << 20)
    text = str(e.value)
    assert "12 clients x 100000 values x 4 bytes" in text and "4.6 MiB" in text
    assert "fewer clients per round" in text and "mean-based reducer" in text


def test_a_run_is_refused_before_it_starts_when_the_disk_is_too_small(client2, monkeypatch):
    monkeypatch.setenv("FLGRAPH_ROBUST_MEMORY", "0")
    monkeypatch.setattr(holding, "disk_free", lambda path: 1000)  # injected: a disk with 1000 bytes free
    with pytest.raises(ConfigError, match="do not fit") as e:
        fg.Run(pipeline(st.Krum(2)), model=fg.models.mlp(D, [8], K, seed=2), data=data(), cluster=client2,
               progress=False, evaluate="never", dashboard=False, metrics_log=None)
    assert "1000 B" in str(e.value) and f"{CLIENTS} clients x" in str(e.value)


def test_memory_budget_setting(monkeypatch):
    for raw, want in (("2G", 2 << 30), ("512M", 512 << 20), ("1000", 1000), ("1.5K", 1536)):
        monkeypatch.setenv("FLGRAPH_ROBUST_MEMORY", raw)
        assert holding.memory_budget() == want
    monkeypatch.setenv("FLGRAPH_ROBUST_MEMORY", "lots")
    with pytest.raises(ConfigError, match="not a size"):
        holding.memory_budget()


def _refs(root: spill.SpillRoot, stack: np.ndarray) -> list[spill.Ref]:
    return [spill.append_row(root.path, 1, row) for row in stack]


def test_krum_scores_in_blocks_match_within_float64_rounding():
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((25, 3000)).astype(np.float32)
    stack[3] *= 40  # an outlier
    root = spill.SpillRoot.create(tempfile.gettempdir(), "test")
    try:
        with root.round(1):
            refs = _refs(root, stack)
            krum = st.Krum(3, m=4)
            krum.hold_on_disk(root.path, block=100)
            items = [np.array(r) for r in stack]
            got = krum.compute_blocks(refs, np.ones(25))
            want = krum.compute(stack, np.ones(25))
            assert np.array_equal(got, want)
            # the scores themselves: an independent float64 computation of the pairwise squared distances
            x = stack.astype(np.float64)
            d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
            np.fill_diagonal(d, np.inf)
            scores = np.sort(d, axis=1)[:, : 25 - 3 - 2].sum(axis=1)
            assert np.allclose(krum.scores(stack), scores, rtol=1e-10)
            assert np.array_equal(krum.compute_blocks(items, np.ones(25)), want)  # arrays read the same way
    finally:
        root.remove()


def test_finalize_in_blocks_peaks_well_below_clients_x_model():
    clients, values = 200, 20_000  # 16 MB of updates
    rng = np.random.default_rng(2)
    root = spill.SpillRoot.create(tempfile.gettempdir(), "test")
    try:
        with root.round(1):
            refs = [spill.append_row(root.path, 1, rng.standard_normal(values).astype(np.float32))
                    for _ in range(clients)]
            for reducer in (st.Median(), st.TrimmedMean(0.1), st.Krum(5, m=2)):
                reducer.hold_on_disk(root.path, block=500)
                tracemalloc.start()
                acc = reducer.combine([refs[: clients // 2], [1.0] * (clients // 2)],
                                      [refs[clients // 2:], [1.0] * (clients // 2)])
                delta, weight = reducer.finalize(acc, ParamSpec.from_arrays({"w": np.zeros(values, np.float32)}))
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                assert delta.shape == (values,) and weight == clients
                held = clients * values * 4
                assert peak < held / 4, f"{type(reducer).__name__} peaked at {peak} bytes for {held} held"
    finally:
        root.remove()
    assert not os.path.exists(root.path)


def test_a_group_result_stays_in_memory_and_leaves_of_a_gone_round_fail():
    spec = ParamSpec.from_arrays({"w": np.zeros(3, np.float32)})
    root = spill.SpillRoot.create(tempfile.gettempdir(), "test")
    med = st.Median()
    med.hold_on_disk(root.path)
    (group,), _ = med.leaf(Update(-1, 5, -1, np.ones(3, np.float32)), spec)  # a tier's group result
    assert isinstance(group, np.ndarray)
    with pytest.raises(ConfigError, match="is gone"):
        med.leaf(Update(7, 5, 8, np.ones(3, np.float32)), spec)  # round 9 has no directory
    root.remove()
