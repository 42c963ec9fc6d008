"""Per-client state (error feedback's residual): the store, the slot table, the arithmetic, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage

import flgraph as fg
from flgraph import stages as st
from flgraph.context import ClientSet, ClientWork, Update
from flgraph.errors import CheckpointError, ClientError, ConfigError
from flgraph.graph import ClientStage
from flgraph.params import Params, ParamSpec
from flgraph.store.client_state import ClientStateStore, ClientStateTable, ClientStateView

D, K = 8, 3


class FailIf(ClientStage):
    """Fails the client at ``position`` of ``round`` while the file ``path`` exists (a crash mid-round)."""

    def __init__(self, path: str, round: int, position: int) -> None:
        self.path, self.round, self.position = path, round, position

    def run(self, work: ClientWork) -> None:
        if work.round == self.round and work.position == self.position and Path(self.path).exists():
            raise RuntimeError("injected failure")


def data() -> fg.data.FederatedDataset:
    # 12 clients, 6 per round: every client comes back within a few rounds, so residuals are re-read
    return fg.data.synthetic_classification(num_clients=12, samples_per_client=16, num_features=D, num_classes=K,
                                            seed=3, test_samples=60)


def pipeline(fail: str = "/nonexistent", codec: object = None) -> fg.Pipeline:
    return (st.Select(clients=6) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8, lr=0.2)
            >> FailIf(fail, 4, 3) >> st.Compress(codec or st.TopK(0.1), error_feedback=True)
            >> st.Aggregate(st.WeightedMean()))


def make_run(client, **kw) -> fg.Run:
    return fg.Run(kw.pop("pipeline", pipeline()), model=fg.models.mlp(D, [16], K, seed=0), data=data(), seed=5,
                  cluster=client, progress=False, dashboard=False, evaluate="never", **kw)


@pytest.fixture(scope="module")
def reference(client1):
    """Params after 5 rounds of an uninterrupted error-feedback run, and its history."""
    with make_run(client1) as run:
        run.fit(rounds=5)
        return run.params.flat, [dict(r) for r in run.history]


# -- the store and the table -------------------------------------------------------------------------------
def test_store_checks_the_round_it_reads(tmp_path):
    store = ClientStateStore(tmp_path, num_clients=3, slots=3)
    store.ensure("s", "e", "float32", 4)
    store.write("s", "e", row=1, slot=2, rnd=5, value=np.arange(4, dtype=np.float32))
    assert store.read("s", "e", row=1, slot=2, rnd=5).tolist() == [0, 1, 2, 3]
    with pytest.raises(CheckpointError, match="should hold round 4's version in slot 2, and holds round 5"):
        store.read("s", "e", row=1, slot=2, rnd=4)
    with pytest.raises(CheckpointError, match="holds nothing"):
        store.read("s", "e", row=0, slot=0, rnd=1)
    with pytest.raises(CheckpointError, match="this run needs"):
        ClientStateStore(tmp_path, num_clients=3, slots=3).ensure("s", "e", "float32", 5)


def test_table_never_hands_out_a_slot_a_snapshot_needs(tmp_path):
    ids = np.array([10, 20, 30], np.int64)
    table = ClientStateTable(ClientStateStore(tmp_path, 3, slots=4), ids, [(1, {"e": ("float32", 2)})])
    t = table.initial()
    cs = table.prepare(ClientSet(np.array([30, 10])), t, 1)
    assert cs.settings["_state_row"].tolist() == [2, 0] and cs.settings["_state_write_slot"].tolist() == [0, 0]
    assert cs.settings["_state_read_slot"].tolist() == [-1, -1]
    t = ClientStateTable.commit(cs, np.array([0]), t, 1)  # only client 30 counted
    assert t["state_rows"].tolist() == [2] and t["state_slot"].tolist() == [0] and t["state_round"].tolist() == [1]
    assert [a.tolist() for a in ClientStateTable.lookup(t, np.arange(3))] == [[-1, -1, 0], [-1, -1, 1]]
    table.protect(1, t)  # a snapshot of round 1 points client 30 at slot 0
    cs = table.prepare(ClientSet(np.array([30])), t, 2)
    assert cs.settings["_state_read_slot"].tolist() == [0] and cs.settings["_state_write_slot"].tolist() == [1]
    t = ClientStateTable.commit(cs, np.array([0]), t, 2)
    cs = table.prepare(ClientSet(np.array([30])), t, 3)
    assert cs.settings["_state_write_slot"].tolist() == [2]  # slot 0: the snapshot's, slot 1: the current
    table.retained([])  # the snapshot is pruned... but the newest protected one is always kept
    assert table.prepare(ClientSet(np.array([30])), t, 3).settings["_state_write_slot"].tolist() == [2]
    table.protect(3, t)
    table.retained([3])  # round 1's snapshot is gone: slot 0 is free again
    assert table.prepare(ClientSet(np.array([30])), t, 4).settings["_state_write_slot"].tolist() == [0]
    with pytest.raises(ClientError, match="client 99 is not in the dataset"):
        table.prepare(ClientSet(np.array([99])), t, 4)


def test_a_million_registered_clients_keep_a_table_and_snapshot_of_those_with_state(tmp_path):
    from flgraph.store.checkpoint import RunDirectory, Snapshot

    registered, per_round = 1_000_000, 1_000
    table = ClientStateTable(ClientStateStore(tmp_path / "cs", registered, slots=4), np.arange(registered),
                             [(1, {"e": ("float32", 2)})])
    rng = np.random.default_rng(0)
    t = table.initial()
    current: dict[int, tuple[int, int]] = {}  # the reference: client -> (slot, round) of its current version
    for rnd in (1, 2, 3):
        ids = np.sort(rng.choice(registered, per_round, replace=False))
        cs = table.prepare(ClientSet(ids), t, rnd)
        done = np.arange(0, per_round, 2)  # half the clients counted
        t = ClientStateTable.commit(cs, done, t, rnd)
        table.protect(rnd, t)
        for k in done:
            current[int(ids[k])] = (int(cs.settings["_state_write_slot"][k]), rnd)
    want = sorted(current)
    assert t["state_rows"].tolist() == want
    assert list(zip(*(a.tolist() for a in ClientStateTable.lookup(t, np.array(want))))) == [current[k] for k in want]
    table_bytes = sum(a.nbytes for a in t.values())
    assert table_bytes == len(want) * (8 + 1 + 8) and len(want) <= 1_500  # the dense table: 9,000,000 bytes
    run_dir = RunDirectory.create(str(tmp_path / "run"), meta={}, blobs={})
    run_dir.write(Snapshot(3, 3, np.zeros(4, np.float32), {"stage": t}, []))
    assert run_dir.sizes()[3] < 100_000, run_dir.sizes()
    back = run_dir.read(3).states["stage"]
    assert all(np.array_equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)


def test_a_dense_table_of_older_snapshots_reads_as_the_same_table(tmp_path):
    table = ClientStateTable(ClientStateStore(tmp_path, 4, slots=4), np.array([3, 5, 8, 9]), [])
    dense = {"state_slot": np.array([-1, 2, -1, 0], np.int8), "state_round": np.array([-1, 7, -1, 4])}
    cs = table.prepare(ClientSet(np.array([9, 5, 3])), dense, 8)
    assert cs.settings["_state_read_slot"].tolist() == [0, 2, -1]
    assert cs.settings["_state_read_round"].tolist() == [4, 7, -1]
    t = ClientStateTable.commit(cs, np.array([2]), dense, 8)  # client 3 (row 0) counted
    assert t["state_rows"].tolist() == [0, 1, 3] and t["state_round"].tolist() == [8, 7, 4]


def test_table_refuses_when_every_slot_is_held(tmp_path):
    table = ClientStateTable(ClientStateStore(tmp_path, 1, slots=2), np.array([0]), [(1, {"e": ("float32", 2)})])
    t = table.initial()
    for rnd in (1, 2):
        cs = table.prepare(ClientSet(np.array([0])), t, rnd)
        t = ClientStateTable.commit(cs, np.array([0]), t, rnd)
        table.protect(rnd, t)
    table.protect(0, {"state_rows": np.array([0]), "state_slot": np.array([0], np.int8),
                      "state_round": np.array([0])})  # three versions held, two slots
    with pytest.raises(CheckpointError, match="keep fewer snapshots"):
        table.prepare(ClientSet(np.array([0])), t, 3)


# -- the arithmetic ----------------------------------------------------------------------------------------
def test_error_feedback_arithmetic_matches_numpy(tmp_path):
    spec = ParamSpec.from_shapes([("w", (50,), "float32")])
    table = ClientStateTable(ClientStateStore(tmp_path, 1, slots=3), np.array([7]), [(99, {"residual": ("float32",
                                                                                                          50)})])
    stage = st.Compress(st.TopK(0.1), error_feedback=True)
    stage.tag = 99
    rng = np.random.default_rng(0)
    t = table.initial()
    e = np.zeros(50, np.float32)  # the numpy reference's residual
    for rnd in (1, 2, 3):
        delta = rng.standard_normal(50).astype(np.float32)
        cs = table.prepare(ClientSet(np.array([7])), t, rnd)
        work = ClientWork(rnd, 7, 0, 0, Params(spec, np.zeros(50, np.float32)), None, cs, None)  # type: ignore[arg-type]
        work.tag = 99
        work.state = ClientStateView(table.store, cs, 0, rnd)
        work.update = Update(7, 16, rnd - 1, delta.copy())
        stage.run(work)
        corrected = delta + e
        keep = np.argsort(-np.abs(corrected), kind="stable")[:5]
        sent = np.zeros(50, np.float32)
        sent[keep] = corrected[keep]
        np.testing.assert_array_equal(work.update.decoded(spec), sent)
        e = corrected - sent
        assert work.update.metrics["residual_norm"] == pytest.approx(float(np.linalg.norm(e)))
        assert work.update.raw_nbytes == 200 and work.update.upload_nbytes == 5 * 8
        t = ClientStateTable.commit(cs, np.array([0]), t, rnd)
    np.testing.assert_array_equal(table.store.read("stage-00000063", "residual", row=0,
                                                   slot=int(ClientStateTable.lookup(t, np.array([0]))[0][0]), rnd=3), e)


# -- runs on real clusters ---------------------------------------------------------------------------------
def test_error_feedback_runs_the_same_on_any_cluster_and_chunking(client2, reference):
    flat, hist = reference
    with make_run(client2, chunk_size=1) as run:
        run.fit(rounds=5)
        assert np.array_equal(run.params.flat, flat)
        assert [r["residual_norm"] for r in run.history] == [r["residual_norm"] for r in hist]
    assert all(r["residual_norm"] > 0 for r in hist) and hist[-1]["bytes_up"] * 4 < hist[-1]["bytes_up_raw"]


def test_error_feedback_changes_the_result(client1, reference):
    with make_run(client1, pipeline=_without_feedback()) as run:
        run.fit(rounds=5)
        assert not np.array_equal(run.params.flat, reference[0])


def _without_feedback() -> fg.Pipeline:
    return (st.Select(clients=6) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8, lr=0.2)
            >> FailIf("/nonexistent", 4, 3) >> st.Compress(st.TopK(0.1)) >> st.Aggregate(st.WeightedMean()))


def test_a_failed_round_and_a_resume_read_the_counted_versions(client1, tmp_path, reference):
    """Round 4 fails after some clients wrote new residuals; the run resumes from round 3's snapshot and
    ends bit-identical to the run that never failed."""
    flag = tmp_path / "fail"
    flag.write_text("")
    path = tmp_path / "run.zarr"
    run = make_run(client1, pipeline=pipeline(str(flag)), checkpoint=path)
    run.fit(rounds=3)
    with pytest.raises(ClientError, match="injected failure"):
        run.fit(rounds=2)
    assert run.round == 3
    run.close()
    written = [np.asarray(zarr.open_array(path / "client-state" / k / "residual.round")[:]) for k in _keys(path)]
    assert any((w == 4).any() for w in written), "the failed round wrote versions before it failed"
    flag.unlink()
    resumed = fg.resume(path, pipeline=pipeline(str(flag)), cluster=client1, progress=False, dashboard=False)
    assert resumed.round == 3
    resumed.fit(rounds=2)
    assert np.array_equal(resumed.params.flat, reference[0])
    assert [r["residual_norm"] for r in resumed.history] == [r["residual_norm"] for r in reference[1]]
    resumed.close()


def _keys(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "client-state").iterdir() if p.is_dir())


def test_runs_that_cannot_keep_client_state_say_so(client1):
    fedbuff = (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8)
               >> st.Compress("int8", error_feedback=True) >> st.BufferedAggregate(buffer=2))
    with pytest.raises(ConfigError, match="asynchronous engine does not keep it"):
        make_run(client1, pipeline=fedbuff)
    with pytest.raises(ConfigError, match="not a local directory"):
        make_run(client1, checkpoint=zarr.storage.MemoryStore())
