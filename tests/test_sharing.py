"""Work sharing between a round's chunks: every position claimed exactly once, across processes; the sum
bit-identical to the static split's; a slow worker's clients taken over by the other in a real run."""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest

import flgraph as fg
from flgraph import stages as st
from flgraph import tree
from flgraph.local.dataplane import DataPlane
from flgraph.local.sharing import Claims, Share, run_shared


def _claimer(path: str, me: int, out: mp.Queue) -> None:
    got: list[tuple[int, str, int]] = []  # (position, "front"/"back", chunk)
    with Claims(path) as claims:
        while (some := claims.take_front_some(me)) is not None:  # as run_shared claims: blocks, then singles
            got.extend((pos, "front", me) for pos in some)
        while (other := claims.adopt(me)) is not None:
            while (pos := claims.take_back(other)) is not None:
                got.append((pos, "back", other))
    out.put((me, got))


def test_every_position_is_claimed_exactly_once_by_processes_racing(tmp_path):
    ranges = tree.chunks(3000, 3)  # 4 tree nodes of 750
    path = str(tmp_path / "claims")
    Claims.create(path, ranges)
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(path, j, out)) for j in range(len(ranges))]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    claimed = sorted(pos for got in results.values() for pos, _, _ in got)
    assert claimed == list(range(3000))  # each position once, none lost
    for j, (a, b) in enumerate(ranges):
        front = sorted(pos for pos, side, _ in results[j] if side == "front")
        back = sorted(pos for got in results.values() for pos, side, chunk in got if side == "back" and chunk == j)
        # the chunk's own task ran a prefix, at most one helper ran the rest: two pieces at most
        assert front == list(range(a, a + len(front)))
        assert back == list(range(a + len(front), b))
        helpers = {me for me, got in results.items() for _, side, chunk in got if side == "back" and chunk == j}
        assert len(helpers) <= 1 and j not in helpers


def test_own_task_claims_a_quarter_of_what_is_left_then_single_positions(tmp_path):
    """Fewer locked claims for a chunk's own task, and still single positions where a helper may meet it."""
    path = str(tmp_path / "claims")
    Claims.create(path, [(0, 50), (50, 60)])
    with Claims(path) as claims:
        sizes = []
        while (some := claims.take_front_some(0)) is not None:
            assert some.start == sum(sizes)  # in order, no gap, no overlap
            sizes.append(len(some))
        assert sum(sizes) == 50 and len(sizes) < 20
        assert sizes == [12, 9, 7, 5, 4, 3, 2, 2, 1, 1, 1, 1, 1, 1]  # a quarter of what is left; below 8, one
        assert claims.take_back(1) == 59  # a helper meets the other chunk's task one position at a time
        assert claims.take_front_some(1) == range(50, 52)  # 9 left: a quarter is 2
        assert claims.take_front(1) == 52  # the single-position claim of the doctest


def test_claims_refuse_bad_tables_and_a_missing_table_means_no_work(tmp_path):
    with pytest.raises(ValueError, match="at least one range"):
        Claims.create(str(tmp_path / "c"), [])
    gone = Share(str(tmp_path / "removed-by-the-driver"), 0)
    assert run_shared(gone, 4, lambda p: p, lambda a, b: a + b) == []


def test_shared_sum_is_bit_identical_to_the_fixed_tree_whoever_runs_what(tmp_path):
    n = 157
    rng = np.random.default_rng(3)
    values = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)).astype(np.float32)  # non-associative sums
    expected = tree.evaluate(0, n, lambda p: values[p], lambda a, b: np.float32(a + b))
    for slow in range(len(tree.chunks(n, 3))):
        path = str(tmp_path / f"claims-{slow}")
        ranges = tree.chunks(n, 3)
        Claims.create(path, ranges)
        ran: dict[int, list[tuple[tuple[int, int], np.float32]]] = {}

        def task(j: int, slow: int = slow, path: str = path, ran: dict = ran) -> None:
            def leaf(p: int) -> np.float32:
                if j == slow:
                    time.sleep(0.002)  # this chunk's task is slower: the others take its last positions
                return values[p]
            ran[j] = run_shared(Share(path, j), n, leaf, lambda a, b: np.float32(a + b))

        threads = [threading.Thread(target=task, args=(j,)) for j in range(len(ranges))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        nodes = {node: v for got in ran.values() for node, v in got}
        assert sum(hi - lo for lo, hi in nodes) == n
        first, end = ranges[slow]
        assert sum(hi - lo for lo, hi in dict(ran[slow])) < end - first  # the slow task was helped
        got = tree.assemble(n, nodes, lambda x, y: np.float32(x + y))
        assert got.tobytes() == expected.tobytes()


def test_finished_nodes_are_sent_early_and_the_sum_is_unchanged(tmp_path):
    """With ``emit``, a task sends what it holds as soon as it cannot grow (it claimed a chunk's last
    position, or it leaves a chunk): nothing is left for the end, every position is covered once, and the
    driver's assembly is bit-identical. An ``emit`` that fails keeps the nodes for the final answer."""
    n = 157
    rng = np.random.default_rng(4)
    values = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)).astype(np.float32)
    expected = tree.evaluate(0, n, lambda p: values[p], lambda a, b: np.float32(a + b))
    ranges = tree.chunks(n, 3)
    for accept in (True, False):
        path = str(tmp_path / f"claims-{accept}")
        Claims.create(path, ranges)
        emitted: dict[int, list[list[tuple[tuple[int, int], np.float32]]]] = {j: [] for j in range(3)}
        final: dict[int, list[tuple[tuple[int, int], np.float32]]] = {}

        def task(j: int, path: str = path, accept: bool = accept, emitted: dict = emitted,
                 final: dict = final) -> None:
            def leaf(p: int) -> np.float32:
                if j == 0:
                    time.sleep(0.002)  # chunk 0 is slow: the others help it from its back
                return values[p]

            def emit(sent: list[tuple[tuple[int, int], np.float32]]) -> bool:
                if accept:
                    emitted[j].append(list(sent))
                return accept

            final[j] = run_shared(Share(path, j), n, leaf, lambda a, b: np.float32(a + b), emit)

        threads = [threading.Thread(target=task, args=(j,)) for j in range(3)]  # 3 tasks, 4 chunks
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        parts = [node for j in range(3) for batch in emitted[j] for node in batch] + \
                [node for j in range(3) for node in final[j]]
        nodes = dict(parts)
        assert len(nodes) == len(parts) and sum(hi - lo for lo, hi in nodes) == n  # each position once
        got = tree.assemble(n, nodes, lambda x, y: np.float32(x + y))
        assert got.tobytes() == expected.tobytes()
        if accept:
            assert all(final[j] == [] for j in range(3))  # all sent on early, none left for the end
            assert all(len(emitted[j]) <= 2 * len(ranges) for j in range(3))  # within the keys the driver expects
        else:
            assert all(emitted[j] == [] for j in range(3))


def test_a_chunk_run_alone_travels_as_one_node(tmp_path):
    """At a chunk's last position a task keeps the nodes that position's leaf will be added to: a chunk
    its own task runs to the end (no helper) is sent as one node, not as its cover plus a leaf."""
    n = 13
    values = np.arange(1, n + 1, dtype=np.float32) / 7
    path = str(tmp_path / "claims")
    Claims.create(path, [(0, n)])
    batches: list[list[tuple[tuple[int, int], np.float32]]] = []
    held = run_shared(Share(path, 0), n, lambda p: values[p], lambda a, b: np.float32(a + b),
                      lambda sent: batches.append(list(sent)) is None)
    expected = tree.evaluate(0, n, lambda p: values[p], lambda a, b: np.float32(a + b))
    assert held == [] and [[node for node, _ in b] for b in batches] == [[(0, n)]]
    assert batches[0][0][1].tobytes() == expected.tobytes()


def _train_slow_on_worker_0(model, data, ctx):
    """One SGD step; 30 ms slower on the worker named 0. Reports whether it ran there."""
    import torch
    import torch.nn.functional as F
    from distributed import get_worker

    on_0 = get_worker().name == 0
    if on_0:
        time.sleep(0.03)
    torch.manual_seed(ctx.round * 1000 + ctx.client)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    F.cross_entropy(model(torch.as_tensor(data.x)), torch.as_tensor(data.y)).backward()
    opt.step()
    return {"loss": 0.0, "on_worker_0": float(on_0)}


def _run(client, share: str, monkeypatch) -> tuple[np.ndarray, list[float]]:
    monkeypatch.setenv("FLGRAPH_SHARE_WORK", share)
    data = fg.data.synthetic_classification(num_clients=60, samples_per_client=8, num_features=6, num_classes=3,
                                            seed=2, test_samples=30)
    p = (st.Select(clients=40) >> st.Broadcast() >> st.LocalTrain(train_fn=_train_slow_on_worker_0)
         >> st.Aggregate(st.WeightedMean()))
    with fg.Run(p, model=fg.models.mlp(6, [8], 3, seed=0), data=data, seed=9, cluster=client, progress=False,
                evaluate="never", dashboard=False) as run:
        h = run.fit(rounds=3)
        plane = run._ensure_started()._accel.plane  # type: ignore[union-attr]
        assert plane is not None
        # the rounds' claims tables (the next round's is written while a round runs) are all removed
        assert not [f for f in os.listdir(plane.directory) if f.startswith("claims-")]
        return run.params.flat.copy(), h.column("on_worker_0")


def test_a_slow_workers_clients_are_taken_over_and_the_result_is_unchanged(client2, monkeypatch):
    taken: list[str] = []
    take = DataPlane.take

    def recording_take(self, keys, timeout):  # the driver's end of the data plane: which pushes came
        got = take(self, keys, timeout)
        taken.extend(got)
        return got

    monkeypatch.setattr(DataPlane, "take", recording_take)
    static, share_static = _run(client2, "0", monkeypatch)
    assert taken and not any("#e" in k for k in taken)  # static chunks: one push per task
    taken.clear()
    shared, share_shared = _run(client2, "1", monkeypatch)
    assert any("#e" in k for k in taken)  # shared: finished nodes travelled early
    assert share_static == [0.5, 0.5, 0.5]  # static: each worker runs its 20 clients
    # shared: the fast worker ends its 20 and takes most of the slow one's (30 ms a client against ~1 ms)
    assert all(f < 0.35 for f in share_shared), share_shared
    assert np.array_equal(static, shared)  # bit-identical: the same tree, whoever ran which client


def test_a_pure_sampler_chooses_each_round_once_ahead_and_the_result_is_unchanged(client2):
    """A sampler decorated with pure_sampler is called for the next round while a round trains (Select.lookahead), and
    the round takes that choice instead of calling it again; the params are bit-identical to an undeclared
    sampler's, which is called at its round only."""

    def run(pure: bool) -> tuple[np.ndarray, list[tuple[int, bool]]]:
        calls: list[tuple[int, bool]] = []

        def sampler(rnd, population, count, rng):
            calls.append((rnd, any(f.function == "lookahead" for f in inspect.stack())))
            return np.random.default_rng([5, rnd]).choice(population, size=count, replace=False)

        data = fg.data.synthetic_classification(num_clients=40, samples_per_client=8, num_features=6,
                                                num_classes=3, seed=4, test_samples=30)
        p = (st.Select(clients=12, sampler=st.pure_sampler(sampler) if pure else sampler) >> st.Broadcast()
             >> st.LocalTrain(lr=0.1) >> st.Aggregate(st.WeightedMean()))
        with fg.Run(p, model=fg.models.mlp(6, [8], 3, seed=0), data=data, seed=1, cluster=client2,
                    progress=False, evaluate="never", dashboard=False) as r:
            r.fit(rounds=4)
            return r.params.flat.copy(), calls

    ahead, calls_ahead = run(True)
    at_round, calls_at_round = run(False)
    assert calls_at_round == [(1, False), (2, False), (3, False), (4, False)]
    # round 1 at its start, rounds 2-4 ahead, during the round before; once each
    assert calls_ahead == [(1, False), (2, True), (3, True), (4, True)]
    assert np.array_equal(ahead, at_round)


def test_closing_a_table_while_a_view_of_it_lives_does_not_fail(tmp_path):
    """A view kept alive past close (e.g. by a frame in a reference cycle) must not fail the round that
    closes the table: the map goes with the view."""
    path = str(tmp_path / "claims")
    Claims.create(path, [(0, 4), (4, 8)])
    table = Claims(path)
    view = table._rows[0]
    table.close()
    assert view.tolist() == [0, 4, -1]
    del view
