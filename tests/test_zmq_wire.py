"""The edge wire format and the gateway's checks: every bad message is a clear ProtocolError, never a crash."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq
from flgraph.transports.zmq import Gateway, Limits, ProtocolError, decode, encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from flgraph.params import ParamSpec

LIMITS = Limits(max_tensor_bytes=1 << 20)
CODES = {"malformed", "too-large", "version", "unknown-type", "bad-field", "bad-tensor"}


def result(seq=1, rnd=1, task=5, tensor=None, **kw):
    fields = {"round": rnd, "task": task, "num_samples": 8, "kind": "delta", "metrics": {"loss": 0.5}, **kw}
    return encode("result", seq, fields, [np.zeros(16, np.float32) if tensor is None else tensor])


def test_round_trip_raw_and_lz4():
    x = np.arange(4096, dtype=np.float32)
    for compress in ("raw", "lz4", "auto"):
        msg = decode(result(tensor=x, task=9), LIMITS) if compress == "auto" else decode(
            encode("result", 3, {"round": 1, "task": 9, "num_samples": 1, "kind": "delta", "metrics": {}}, [x],
                   compress=compress), LIMITS)
        np.testing.assert_array_equal(msg.tensors[0], x)
        assert msg.fields["task"] == 9
    assert len(encode("task", 1, {}, [np.zeros(1 << 16, np.float32)], compress="lz4")[1]) < 2000  # 256 KiB of zeros


@pytest.mark.parametrize("frames, code", [
    ([], "malformed"),
    ([b"\xc1"], "malformed"),
    ([msgpack.packb([1, 2])], "malformed"),
    ([msgpack.packb({"v": 2, "t": "heartbeat", "seq": 1, "tensors": []})], "version"),
    ([msgpack.packb({"v": 1, "t": "shell", "seq": 1, "tensors": []})], "unknown-type"),
    ([msgpack.packb({"v": 1, "t": "heartbeat", "seq": -1, "tensors": []})], "bad-field"),
    ([msgpack.packb({"v": 1, "t": "error", "seq": 1, "code": "x", "tensors": []})], "bad-field"),
    ([b"\x00" * 70000], "too-large"),
    ([msgpack.packb({"v": 1, "t": "heartbeat", "seq": 1, "x": msgpack.ExtType(5, b"")})], "malformed"),
])
def test_rejections_are_protocol_errors(frames, code):
    with pytest.raises(ProtocolError) as info:
        decode(frames, LIMITS)
    assert info.value.code == code and info.value.fix


def test_tensor_rejections():
    env, frame = result()
    bad = msgpack.unpackb(env)
    cases = [
        ({"tensors": [["object", [16], "raw", 64]]}, frame, "bad-tensor"),
        ({"tensors": [["float32", [1 << 20], "raw", 64]]}, frame, "too-large"),
        ({"tensors": [["float32", [15], "raw", 64]]}, frame, "bad-tensor"),
        ({"tensors": [["float32", [16], "lz4", 64]]}, frame, "bad-tensor"),
        ({"tensors": [["float32", [16], "zip", 64]]}, frame, "bad-tensor"),
        ({"tensors": [["float32", [16] * 9, "raw", 64]]}, frame, "too-large"),
        ({"tensors": []}, frame, "bad-tensor"),
    ]
    for patch, f, code in cases:
        with pytest.raises(ProtocolError) as info:
            decode([msgpack.packb({**bad, **patch}), f], LIMITS)
        assert info.value.code == code, patch
    with pytest.raises(ProtocolError, match="too-large"):
        decode([env, frame, frame, frame, frame, frame], LIMITS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.lists(hs.binary(max_size=300), min_size=0, max_size=7))
def test_fuzz_random_frames(frames):
    try:
        decode(frames, LIMITS)
    except ProtocolError as e:
        assert e.code in CODES


@settings(max_examples=300, deadline=None)
@given(hs.integers(0, 200), hs.integers(0, 255), hs.integers(0, 3))
def test_fuzz_mutated_valid_messages(pos, byte, which):
    frames = [bytearray(f) for f in result(tensor=np.ones(64, np.float32))]
    which = which % len(frames)
    if frames[which]:
        frames[which][pos % len(frames[which])] = byte
    try:
        msg = decode([bytes(f) for f in frames], LIMITS)
        assert msg.type in ("result", "join", "accept", "task", "error", "heartbeat", "disconnect", "part",
                            "reconnect-later")
    except ProtocolError as e:
        assert e.code in CODES


@settings(max_examples=150, deadline=None)
@given(hs.recursive(hs.none() | hs.booleans() | hs.integers(-(2**63), 2**64 - 1) | hs.floats() | hs.text(max_size=20)
                    | hs.binary(max_size=20),
                    lambda kids: hs.lists(kids, max_size=4) | hs.dictionaries(hs.text(max_size=8), kids, max_size=4),
                    max_leaves=20),
       hs.sampled_from(["join", "accept", "task", "result", "error", "heartbeat", "disconnect", "reconnect-later"]))
def test_fuzz_schema_values(value, msg_type):
    env = {"v": 1, "t": msg_type, "seq": 1, "tensors": []}
    for name in ("client", "round", "task", "config", "spec", "metrics", "code", "text", "session", "kind"):
        env[name] = value
    try:
        decode([msgpack.packb(env)], LIMITS)
    except ProtocolError as e:
        assert e.code in CODES


class RawAgent:
    """A hand-driven DEALER for sending what a real agent never would."""

    def __init__(self, endpoint):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames):
        self.sock.send_multipart(frames)

    def recv(self, want=None, timeout=5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.sock.poll(100):
                msg = decode(self.sock.recv_multipart(), Limits())
                if want is None or msg.type == want:
                    return msg
        raise AssertionError(f"no {want} message in {timeout} s")

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def test_gateway_rejects_and_keeps_serving():
    spec = ParamSpec.from_arrays({"w": np.zeros(16, np.float32)})
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5, limits=LIMITS)
    gw.start()
    a = RawAgent(gw.endpoint)
    try:
        a.send([b"\x93garbage"])
        assert a.recv("error").fields["code"] == "malformed"
        a.send(encode("heartbeat", 1, {}))
        assert a.recv("error").fields["code"] == "unknown-session"
        a.send(encode("join", 2, {"client": 3}))
        acc = a.recv("accept")
        assert acc.fields["client"] == 3 and gw.wait_for(clients=[3], timeout=5)
        a.send(encode("heartbeat", 2, {}))  # seq 2 again: a replay
        assert a.recv("error").fields["code"] == "replay"
        a.send(result(seq=3, rnd=7))  # no round running
        assert a.recv("error").fields["code"] == "out-of-round"

        events = gw.begin_round(1, np.zeros(16, np.float32), spec, 0, {3: {"epochs": 1}}, deadline_s=10.0)
        task = a.recv("task")
        assert task.fields["round"] == 1 and task.tensors[0].shape == (16,)
        tid = task.fields["task"]
        a.send(result(seq=4, rnd=1, task=tid + 1))
        assert a.recv("error").fields["code"] == "unknown-task"
        a.send(result(seq=5, rnd=1, task=tid, tensor=np.full(16, np.nan, np.float32)))
        err = a.recv("error")
        assert err.fields["code"] == "refused-update" and "non-finite" in err.fields["text"]
        ev = events.get(timeout=5)
        assert ev.kind == "failed" and "refused" in ev.reason
        a.send(result(seq=6, rnd=1, task=tid))  # the slot is closed: no double count
        assert a.recv("error").fields["code"] == "duplicate"
        gw.end_round()

        events = gw.begin_round(2, np.zeros(16, np.float32), spec, 0, {3: {}}, deadline_s=10.0)
        tid = a.recv("task").fields["task"]
        a.send(result(seq=7, rnd=2, task=tid, tensor=np.zeros(15, np.float32)))
        assert "shape" in a.recv("error").fields["text"]
        assert events.get(timeout=5).kind == "failed"
        gw.end_round()

        events = gw.begin_round(3, np.zeros(16, np.float32), spec, 0, {3: {}}, deadline_s=10.0)
        tid = a.recv("task").fields["task"]
        a.send(result(seq=8, rnd=3, task=tid, tensor=np.ones(16, np.float32)))
        ev = events.get(timeout=5)
        assert ev.kind == "result" and ev.message is not None and ev.message.tensors[0].sum() == 16
        gw.end_round()
        assert gw.counters["rejected"] >= 8
    finally:
        a.close()
        gw.stop()


def test_deadline_fails_a_silent_client_and_unknown_clients():
    spec = ParamSpec.from_arrays({"w": np.zeros(4, np.float32)})
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5)
    gw.start()
    a = RawAgent(gw.endpoint)
    try:
        a.send(encode("join", 1, {"client": 0}))
        a.recv("accept")
        t0 = time.monotonic()
        events = gw.begin_round(1, np.zeros(4, np.float32), spec, 0, {0: {}, 9: {}}, deadline_s=0.5)
        got = sorted((events.get(timeout=5), events.get(timeout=5)), key=lambda e: e.client)
        assert [e.kind for e in got] == ["failed", "failed"] and time.monotonic() - t0 < 3
        assert "deadline" in got[0].reason and "no agent" in got[1].reason
    finally:
        a.close()
        gw.stop()


def _join(gw, client):
    a = RawAgent(gw.endpoint)
    a.send(encode("join", 1, {"client": client}))
    a.recv("accept")
    return a


def test_concurrent_jobs_are_routed_to_their_own_job_and_closed_one_by_one():
    """Asynchronous jobs run side by side: each has its params, deadline and task id; results, errors and a
    lost agent reach the right job once; a later round's job does not expire the others; idle() follows."""
    import queue

    spec = ParamSpec.from_arrays({"w": np.zeros(16, np.float32)})
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5, limits=LIMITS)
    gw.start()
    agents = {c: _join(gw, c) for c in (0, 1, 2)}
    try:
        gw.wait_for(clients=[0, 1, 2], timeout=5)
        assert gw.idle() == {0, 1, 2}
        events: queue.SimpleQueue = queue.SimpleQueue()
        v1, v2 = gw.encode_params(np.ones(16, np.float32)), gw.encode_params(np.full(16, 2.0, np.float32))
        j0 = gw.begin_job(11, v1, spec, 0, {0: {}}, 10.0, events)
        j1 = gw.begin_job(12, v2, spec, 0, {1: {}}, 10.0, events)  # does not expire job j0
        j2 = gw.begin_job(13, v2, spec, 0, {2: {}}, 0.5, events)  # its agent stays silent: it expires
        t0, t1 = agents[0].recv("task"), agents[1].recv("task")
        agents[2].recv("task")
        assert (t0.fields["round"], t0.tensors[0][0]) == (11, 1.0)
        assert (t1.fields["round"], t1.tensors[0][0]) == (12, 2.0)
        deadline = time.monotonic() + 5
        while gw.idle() and time.monotonic() < deadline:  # every agent has a task outstanding
            time.sleep(0.01)
        assert gw.idle() == set()
        agents[1].send(result(seq=2, rnd=12, task=t1.fields["task"], tensor=np.ones(16, np.float32)))
        ev = events.get(timeout=5)
        assert (ev.kind, ev.job, ev.client) == ("result", j1, 1)
        gw.end_job(j1)
        ev = events.get(timeout=5)  # job j2 misses its 0.5 s deadline; j0 is still running
        assert (ev.kind, ev.job, ev.client) == ("failed", j2, 2) and "deadline" in ev.reason
        gw.end_job(j2)
        agents[1].send(result(seq=3, rnd=12, task=t1.fields["task"]))  # its job is closed
        assert agents[1].recv("error").fields["code"] == "out-of-round"
        agents[0].send(result(seq=2, rnd=11, task=t1.fields["task"]))  # another session's task id
        assert agents[0].recv("error").fields["code"] == "unknown-task"
        deadline = time.monotonic() + 5
        while gw.idle() != {1} and time.monotonic() < deadline:  # 0 and 2 have not answered
            time.sleep(0.01)
        assert gw.idle() == {1}
        agents[0].send(encode("disconnect", 3, {"reason": "test"}))  # lost mid-job: failed at once, once
        ev = events.get(timeout=5)
        assert (ev.kind, ev.job, ev.client) == ("failed", j0, 0) and "lost" in ev.reason
        gw.end_job(j0)
        with pytest.raises(queue.Empty):
            events.get(timeout=0.5)
        # a synchronous round is exclusive: it closes the jobs still open
        j3 = gw.begin_job(14, v1, spec, 0, {1: {}}, 10.0, events)
        agents[1].recv("task")
        gw.begin_round(1, np.zeros(16, np.float32), spec, 0, {2: {}}, deadline_s=10.0)
        ev = events.get(timeout=5)
        assert (ev.kind, ev.job) == ("failed", j3) and "next round" in ev.reason
    finally:
        for a in agents.values():
            a.close()
        gw.stop()


# -- params reuse (PROTOCOL.md 4.3) ---------------------------------------------------------------------

TASK_FIELDS = {"round": 3, "task": 11, "client": 0, "deadline_s": 5.0, "seed": 0, "config": {},
               "spec": [["w", [16], "float32"]]}


def test_a_task_may_omit_its_params_only_when_it_names_a_version():
    msg = decode(encode("task", 1, {**TASK_FIELDS, "params": 7}), LIMITS)
    assert msg.tensors == [] and msg.fields["params"] == 7
    with pytest.raises(ProtocolError) as info:
        decode(encode("task", 1, TASK_FIELDS), LIMITS)
    assert info.value.code == "bad-tensor"
    with_frame = decode(encode("task", 1, {**TASK_FIELDS, "params": 7}, [np.ones(16, np.float32)]), LIMITS)
    assert with_frame.tensors[0].shape == (16,)


def _join_caching(gw, client):
    a = RawAgent(gw.endpoint)
    a.send(encode("join", 1, {"client": client, "caps": {"params_cache": True}}))
    a.recv("accept")
    return a


def test_params_go_once_per_agent_and_version_and_again_when_the_agent_lost_them():
    """A caching agent gets a version's params with its first task only; a frameless task it cannot resolve
    (unknown-params) comes again with the params, under the same task id, and still counts once. An agent
    without the capability gets the params with every task and no version field."""
    import queue

    spec = ParamSpec.from_arrays({"w": np.zeros(16, np.float32)})
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5, limits=LIMITS)
    gw.start()
    caching, plain = _join_caching(gw, 0), _join(gw, 1)
    try:
        gw.wait_for(clients=[0, 1], timeout=5)
        events: queue.SimpleQueue = queue.SimpleQueue()
        v1 = gw.encode_params(np.ones(16, np.float32))
        seq = {0: 2, 1: 2}

        def answer(agent, cid, task):
            agent.send(result(seq=seq[cid], rnd=task.fields["round"], task=task.fields["task"]))
            seq[cid] += 1
            ev = events.get(timeout=5)
            assert ev.kind == "result" and ev.client == cid

        j = gw.begin_job(1, v1, spec, 0, {0: {}}, 10.0, events)
        first = caching.recv("task")
        assert len(first.tensors) == 1 and first.fields["params"] == v1.version
        answer(caching, 0, first)
        gw.end_job(j)
        j = gw.begin_job(2, v1, spec, 0, {0: {}}, 10.0, events)
        second = caching.recv("task")
        assert second.tensors == [] and second.fields["params"] == v1.version
        caching.send(encode("error", seq[0], {"code": "unknown-params", "text": "lost", "round": 2,
                                              "task": second.fields["task"]}))
        seq[0] += 1
        again = caching.recv("task")
        assert again.fields["task"] == second.fields["task"] and len(again.tensors) == 1
        np.testing.assert_array_equal(again.tensors[0], np.ones(16, np.float32))
        answer(caching, 0, again)
        gw.end_job(j)
        for rnd in (3, 4):
            j = gw.begin_job(rnd, v1, spec, 0, {1: {}}, 10.0, events)
            task = plain.recv("task")
            assert len(task.tensors) == 1 and "params" not in task.fields
            answer(plain, 1, task)
            gw.end_job(j)
        assert (gw.counters["params_sent"], gw.counters["params_reused"]) == (4, 1)
        assert gw.counters["rejected"] == 0
    finally:
        caching.close()
        plain.close()
        gw.stop()


def test_a_real_agent_trains_from_the_version_each_task_names():
    """The Python agent against the gateway: jobs from versions v1, v1, v2, v1 in turn; each task's function
    sees exactly its job's params (its update echoes them), and the params travel three times, not four."""
    import queue
    import threading

    from flgraph.transports.zmq import Agent, EdgeResult

    def echo(task):
        return EdgeResult(num_samples=1, delta=np.array(task.params.flat, copy=True))

    spec = ParamSpec.from_arrays({"w": np.zeros(16, np.float32)})
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5, limits=LIMITS)
    gw.start()
    agent = Agent(gw.endpoint, echo, client_id=0, heartbeat_s=0.5)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        gw.wait_for(clients=[0], timeout=10)
        events: queue.SimpleQueue = queue.SimpleQueue()
        v1, v2 = gw.encode_params(np.full(16, 1.5, np.float32)), gw.encode_params(np.full(16, -2.0, np.float32))
        for rnd, (version, value) in enumerate([(v1, 1.5), (v1, 1.5), (v2, -2.0), (v1, 1.5)], start=1):
            j = gw.begin_job(rnd, version, spec, 0, {0: {}}, 10.0, events)
            ev = events.get(timeout=10)
            assert ev.kind == "result" and ev.message is not None
            np.testing.assert_array_equal(ev.message.tensors[0], np.full(16, value, np.float32))
            gw.end_job(j)
        assert (gw.counters["params_sent"], gw.counters["params_reused"]) == (3, 1)
    finally:
        agent.stop()
        thread.join(10)
        gw.stop()
