"""The data plane between the driver and local workers: real ZeroMQ ipc sockets, real worker processes."""

from __future__ import annotations

import logging
import os
import stat
import time

import numpy as np
import pytest
import zmq

import flgraph as fg
from flgraph import stages as st
from flgraph.local import dataplane
from flgraph.local.dataplane import DataPlane, fetch, push

pytestmark = pytest.mark.skipif(not dataplane.available(), reason="no ipc:// sockets on this platform")


@pytest.fixture
def plane():
    p = DataPlane()
    yield p
    p.close()


def test_params_out_partials_in(plane):
    flat = np.arange(10, dtype=np.float32)
    plane.publish("p1", flat)
    got = fetch(plane.endpoint, "p1")
    assert got.dtype == np.float32 and np.array_equal(got, flat)
    assert fetch(plane.endpoint, "p1") is got  # once per process and key
    plane.expect(["c0", "c1"])
    big = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
    assert push(plane.endpoint, "c1", [((0, 5), (big, 5.0))])
    assert push(plane.endpoint, "c0", {"x": 1})
    got2: dict = {}
    end = time.monotonic() + 10
    while len(got2) < 2 and time.monotonic() < end:
        got2.update(plane.take(["c0", "c1"], timeout=1.0))
    assert got2["c0"] == {"x": 1}
    (node, (arr, w)), = got2["c1"]
    assert node == (0, 5) and w == 5.0 and np.array_equal(arr, big)


def test_unexpected_and_late_pushes_are_dropped(plane):
    plane.expect(["mine"])
    assert push(plane.endpoint, "stale-attempt", 1)
    assert push(plane.endpoint, "mine", 2)
    assert plane.take(["mine"], timeout=5.0) == {"mine": 2}
    assert push(plane.endpoint, "mine", 3)  # a second push of a key already taken: nobody expects it
    assert plane.take(["mine", "stale-attempt"], timeout=0.3) == {}


def test_a_retracted_key_is_refused_clearly(plane):
    plane.publish("gone", np.zeros(3, np.float32))
    plane.retract(["gone"])
    with pytest.raises(LookupError, match="no longer serves 'gone'"):
        fetch(plane.endpoint, "gone")


def test_a_malformed_message_does_not_stop_the_plane(plane):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(plane.endpoint)
    plane.expect(["k"])
    sock.send_multipart([b"put", b"k", b"not a pickle"])
    sock.send_multipart([b"\xff"])
    sock.close()
    plane.publish("p", np.ones(2, np.float32))
    assert np.array_equal(fetch(plane.endpoint, "p"), np.ones(2, np.float32))
    assert push(plane.endpoint, "k", "fine")
    assert plane.take(["k"], timeout=5.0) == {"k": "fine"}


def test_the_socket_is_private_and_removed_at_close():
    p = DataPlane()
    directory = os.path.dirname(p.endpoint[len("ipc://"):])
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    p.close()
    assert not os.path.exists(directory)


def test_fetch_times_out_with_a_clear_error(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody"
    with pytest.raises(TimeoutError, match="did not send 'p'"):
        fetch(endpoint, "p", timeout=0.3)
    dataplane.forget(endpoint)


def _final(client, monkeypatch, plane: str, chunk: int | None = None) -> tuple[np.ndarray, bool]:
    monkeypatch.setenv("FLGRAPH_DATA_PLANE", plane)
    data = fg.data.synthetic_classification(num_clients=30, samples_per_client=16, num_features=6,
                                            num_classes=3, alpha=0.5, seed=2, test_samples=50)
    p = st.Select(clients=9) >> st.Broadcast() >> st.LocalTrain(2, batch_size=4, lr=0.1) >> st.Aggregate()
    with fg.Run(p, model=fg.models.mlp(6, [8], 3, seed=0), data=data, seed=4, cluster=client,
                progress=False, evaluate="never", chunk_size=chunk) as run:
        run.fit(rounds=3)
        return run.params.flat.copy(), run._transport._accel is not None


def test_rounds_over_the_plane_equal_rounds_over_dask(client2, monkeypatch):
    a, on = _final(client2, monkeypatch, "1")
    b, off = _final(client2, monkeypatch, "0")
    c, _ = _final(client2, monkeypatch, "1", chunk=2)  # more chunks than workers, still <= FAN_IN partials
    assert on and not off
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert np.array_equal(a.view(np.uint32), c.view(np.uint32))


# -- the next round's tasks, submitted ahead ------------------------------------------------------------
def test_offers_reach_waiters_before_and_after_and_withdrawals_end_them(plane):
    import threading

    from flgraph.local.dataplane import wait

    got: dict[int, object] = {}

    def waiter(i: int) -> None:
        got[i] = wait(plane.endpoint, "next-r2", i, timeout=10.0)

    early = [threading.Thread(target=waiter, args=(i,)) for i in (0, 1)]
    for t in early:
        t.start()
    time.sleep(0.2)  # both wait before the offer
    flat = np.arange(5, dtype=np.float32)
    plane.offer("next-r2", flat, [("job", 0), ("job", 1)])
    for t in early:
        t.join(10)
    for i in (0, 1):
        params, job = got[i]
        assert np.array_equal(params, flat) and job == ("job", i)
    late = wait(plane.endpoint, "next-r2", 1, timeout=5.0)  # a waiter after the offer gets it at once
    assert late is not None and late[1] == ("job", 1)
    assert wait(plane.endpoint, "next-r2", 7, timeout=5.0) is None  # no job for a task index past the plan
    t = threading.Thread(target=lambda: got.__setitem__(3, wait(plane.endpoint, "next-r3", 0, timeout=10.0)))
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # nothing offered for round 3 yet: it waits
    plane.withdraw("next-r3")  # no round 3 after all: the waiter ends with None, at once
    t.join(5)
    assert not t.is_alive() and got[3] is None
    assert wait(plane.endpoint, "next-r3", 1, timeout=5.0) is None  # so does a waiter after the withdrawal
    plane.retract(["next-r2"])  # a retracted offer: late waiters get None too
    assert wait(plane.endpoint, "next-r2", 0, timeout=5.0) is None


def test_a_waiter_gives_up_when_asked_and_after_its_timeout(plane):
    from flgraph.local.dataplane import wait

    t0 = time.monotonic()
    assert wait(plane.endpoint, "never", 0, timeout=30.0, give_up=lambda: True) is None
    assert wait(plane.endpoint, "never", 0, timeout=0.3) is None
    assert time.monotonic() - t0 < 5.0


class _Stop(BaseException):
    """Raised by a callback: ends fit() the way Ctrl-C would."""


def _nothing_left_running(client) -> bool:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if not any(client.processing().values()):
            return True
        time.sleep(0.05)
    return False


def test_tasks_submitted_ahead_end_with_fit_and_resume_exactly(client2):
    data = fg.data.synthetic_classification(num_clients=30, samples_per_client=16, num_features=6,
                                            num_classes=3, alpha=0.5, seed=2, test_samples=50)

    def pipeline():
        return st.Select(clients=9) >> st.Broadcast() >> st.LocalTrain(2, batch_size=4, lr=0.1) >> st.Aggregate()

    class StopAt:
        def __init__(self, rnd: int) -> None:
            self.rnd = rnd

        def on_round(self, run, row):
            if row["round"] == self.rnd:
                raise _Stop

    with fg.Run(pipeline(), model=fg.models.mlp(6, [8], 3, seed=0), data=data, seed=4, cluster=client2,
                progress=False, evaluate="never") as whole:
        whole.fit(5)
        assert whole._transport._accel is not None and whole._transport._accel._ahead is None
        assert _nothing_left_running(client2)  # round 5 was the last: nothing was submitted for round 6
        expected = whole.params.flat.copy()
    stopper = StopAt(2)
    with fg.Run(pipeline(), model=fg.models.mlp(6, [8], 3, seed=0), data=data, seed=4, cluster=client2,
                progress=False, evaluate="never", callbacks=[stopper]) as run:
        with pytest.raises(_Stop):
            run.fit(5)  # round 3's tasks were waiting on the workers when round 2 ended like this
        assert run.round == 2 and run._transport._accel._ahead is None
        assert _nothing_left_running(client2)
        stopper.rnd = -1
        run.fit(3)
        assert np.array_equal(run.params.flat.view(np.uint32), expected.view(np.uint32))


def test_client_work_between_rounds_does_not_wait_behind_the_next_round(client2):
    data = fg.data.synthetic_classification(num_clients=30, samples_per_client=16, num_features=6,
                                            num_classes=3, alpha=0.5, seed=2, test_samples=50)
    p = (st.Select(clients=9) >> st.Broadcast() >> st.LocalTrain(1, batch_size=4, lr=0.1) >> st.Aggregate()
         >> st.FederatedEvaluate(1, clients=6, holdout=0.25))
    t0 = time.monotonic()
    with fg.Run(p, model=fg.models.mlp(6, [8], 3, seed=0), data=data, seed=4, cluster=client2,
                progress=False, evaluate="never") as run:
        history = run.fit(4)
    assert [r["fed_eval_clients"] for r in history.rows] == [6, 6, 6, 6]
    assert time.monotonic() - t0 < 60  # no task waited out its timeout
    assert _nothing_left_running(client2)


# -- a task submitted ahead that gives up is no lost worker ------------------------------------------------
def _ten_a_round(client, rounds: int = 6) -> np.ndarray:
    data = fg.data.synthetic_classification(num_clients=40, samples_per_client=8, num_features=6,
                                            num_classes=3, alpha=0.5, seed=5, test_samples=30)
    p = st.Select(clients=10) >> st.Broadcast() >> st.LocalTrain(1, batch_size=4, lr=0.1) >> st.Aggregate()
    with fg.Run(p, model=fg.models.mlp(6, [8], 3, seed=0), data=data, seed=8, cluster=client, progress=False,
                evaluate="never", dashboard=False) as run:
        run.fit(rounds)
        return run.params.flat.copy()


def _slow_offers(monkeypatch, delay: float = 0.15) -> None:
    """The plane's thread answers waiting tasks ``delay`` s late, as when the driver's other threads (a
    snapshot being written) hold the GIL: the next round's tasks, submitted right after an offer, reach the
    workers before the offer does."""
    answer = DataPlane._answer_waiters

    def late(self, sock):
        time.sleep(delay)
        answer(self, sock)

    monkeypatch.setattr(DataPlane, "_answer_waiters", late)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flgraph" and r.levelno >= logging.WARNING]


def test_the_next_rounds_tasks_reaching_a_worker_first_is_no_lost_worker(client2, monkeypatch, caplog):
    """The false alarm of a long run: a task waiting for its job saw the next round's task queued behind it
    (its job was late), gave up, and the round ran again with "a worker left mid-round" logged."""
    monkeypatch.setenv("FLGRAPH_DATA_PLANE", "0")
    expected = _ten_a_round(client2)
    monkeypatch.setenv("FLGRAPH_DATA_PLANE", "1")
    _slow_offers(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="flgraph"):
        got = _ten_a_round(client2)
    assert _warnings(caplog) == []
    assert not [r for r in caplog.records if "gave up" in r.getMessage()]  # each task waited for its job
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_a_task_that_gives_up_after_its_job_was_offered_is_submitted_again_quietly(client2, monkeypatch, caplog):
    """Other work queued on the workers right after an offer: the waiting tasks give up (they must not hold
    it up), their chunks are submitted again without the round running again, and nothing is logged as
    a warning."""
    monkeypatch.setenv("FLGRAPH_DATA_PLANE", "0")
    expected = _ten_a_round(client2)
    monkeypatch.setenv("FLGRAPH_DATA_PLANE", "1")
    _slow_offers(monkeypatch)
    offer = DataPlane.offer
    others = []
    workers = sorted(client2.scheduler_info()["workers"])

    def offer_then_other_work(self, key, array, jobs, settle_s=0.005):
        offer(self, key, array, jobs, settle_s)
        others.extend(client2.submit(time.sleep, 0.01, workers=[w], pure=False, key=f"other-work-{key}-{i}")
                      for i, w in enumerate(workers))

    monkeypatch.setattr(DataPlane, "offer", offer_then_other_work)
    with caplog.at_level(logging.DEBUG, logger="flgraph"):
        got = _ten_a_round(client2)
    client2.gather(others)
    assert _warnings(caplog) == []
    assert [r for r in caplog.records if "gave up waiting for its job" in r.getMessage()]  # it did happen
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
