"""The protocol points an outside implementer must not guess (transports/PROTOCOL.md): which limit answers
which code, whole-number floats, task id range, refused results closing their slot with the error naming
round and task, the joins counters, and an agent backing off at once after a refused join."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
from flgraph.transports.zmq import Agent, Gateway, Limits, ProtocolError, decode, encode
from flgraph.transports.zmq.tasks import synthetic
from test_zmq_wire import RawAgent, result

from flgraph.params import ParamSpec

LIMITS = Limits()


def task_env(**over):
    env = {"v": 1, "t": "task", "seq": 1, "round": 1, "task": 2, "client": 0, "deadline_s": 5.0, "seed": 0,
           "config": {}, "spec": [["w", [4], "float32"]], "tensors": [["float32", [4], "raw", 16]]}
    env.update(over)
    return [msgpack.packb(env), np.zeros(4, np.float32).tobytes()]


@pytest.mark.parametrize(("over", "code"), [
    ({"config": {f"k{i}": i for i in range(65)}}, "too-large"),  # 65 entries: a limit, not malformed msgpack
    ({"config": {"k": "x" * 1025}}, "too-large"),
    ({"spec": [["w", [1] * 9, "float32"]]}, "too-large"),
    ({"spec": [[f"w{i}", [1], "float32"] for i in range(4097)]}, "too-large"),
    ({"stages": [{"class": "a", "settings": {}}] * 17}, "too-large"),
    ({"config": {"k": [1, 2]}}, "bad-field"),  # a wrong type
    ({"config": []}, "bad-field"),
    ({"round": -1}, "bad-field"),
    ({"round": 1.5}, "bad-field"),
    ({"round": float(2**60)}, "bad-field"),  # a float beyond 2**53 is not taken as a whole number
])
def test_each_limit_answers_too_large_and_each_wrong_value_bad_field(over, code):
    with pytest.raises(ProtocolError) as e:
        decode(task_env(**over), LIMITS)
    assert e.value.code == code


def test_whole_number_floats_are_read_as_ints():
    msg = decode(task_env(round=3.0, task=float(2**53), seed=7.0), LIMITS)
    assert (msg.fields["round"], msg.fields["task"], msg.fields["seed"]) == (3, 2**53, 7)
    assert all(type(msg.fields[k]) is int for k in ("round", "task", "seed"))


def test_task_ids_stay_below_2_53_and_a_refused_result_closes_its_slot_naming_round_and_task():
    spec = ParamSpec.from_arrays({"w": np.zeros(16, np.float32)})
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5)
    gw.start()
    a = RawAgent(gw.endpoint)
    try:
        a.send(encode("join", 1, {"client": 3}))
        a.recv("accept")
        events = gw.begin_round(1, np.zeros(16, np.float32), spec, 0, {c: {} for c in range(3, 403)}, 10.0)
        tid = a.recv("task").fields["task"]
        assert all(0 <= t.task_id < 2**53 for t in gw._posted.tasks.values())
        bad = encode("result", 2, {"round": 1, "task": tid, "num_samples": -1, "kind": "delta", "metrics": {}},
                     [np.zeros(16, np.float32)])
        a.send(bad)  # readable, but breaks the schema: the error names its round and task, the slot closes
        err = a.recv("error")
        assert err.fields["code"] == "bad-field" and (err.fields["round"], err.fields["task"]) == (1, tid)
        ev = events.get(timeout=5)
        assert ev.kind == "failed" and ev.client == 3 and "bad-field" in ev.reason
        a.send(result(seq=3, rnd=1, task=tid))  # a correct result after: the client is counted once, failed
        assert a.recv("error").fields["code"] == "duplicate"
        gw.end_round()
    finally:
        a.close()
        gw.stop()


def test_joins_counts_accepted_joins_and_refused_ones_apart():
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5, client_ids=[0, 1])
    gw.start()
    a = RawAgent(gw.endpoint)
    try:
        a.send(encode("join", 1, {"client": 7}))
        assert a.recv("error").fields["code"] == "bad-field"
        a.send(encode("join", 2, {"client": 1}))
        a.recv("accept")
        assert (gw.counters["joins"], gw.counters["joins_refused"]) == (1, 1)
    finally:
        a.close()
        gw.stop()


def test_an_agent_refused_at_join_backs_off_at_once(keys):
    """duplicate-client: the agent does not wait out a silence (3 s here) before it tries again."""
    gw = Gateway("tcp://127.0.0.1:0", secret_key=keys / "gateway.key_secret", allow=keys / "allow",
                 heartbeat_s=1.0, liveness=3)
    gw.start()
    agents = [Agent(gw.endpoint, synthetic, client_id=0, secret_key=keys / f"agent-{k}.key_secret",
                    server_key=keys / "gateway.key", heartbeat_s=1.0, max_backoff_s=0.3) for k in (0, 1)]
    threads = []
    try:
        for a in agents:
            threads.append(threading.Thread(target=a.run, daemon=True))
            threads[-1].start()
            if len(threads) == 1:
                gw.wait_for(clients=[0], timeout=20)
        end = time.monotonic() + 20
        while gw.counters["joins_refused"] < 3 and time.monotonic() < end:  # bounded wait
            time.sleep(0.05)
        started = time.monotonic()
        while gw.counters["joins_refused"] < 6 and time.monotonic() < end:
            time.sleep(0.05)
        assert gw.counters["joins_refused"] >= 6
        assert time.monotonic() - started < 3.0  # three more tries in less than one silence
        assert ("duplicate-client" in {c for c, _ in agents[1].errors}) and gw.counters["joins"] == 1
    finally:
        for a in agents:
            a.stop()
        for th in threads:
            th.join(10)
        gw.stop()


def test_flgraph_edge_refuses_a_setting_that_is_not_a_number(capsys):
    from flgraph.cli import main

    code = main(["edge", "--connect", "tcp://127.0.0.1:1", "--task", "flgraph.transports.zmq.tasks:synthetic",
                 "--set", "epochs=two"])
    assert code == 2 and "--set 'epochs=two' is not NAME=NUMBER" in capsys.readouterr().err
    code = main(["edge", "--connect", "tcp://127.0.0.1:1", "--task", "flgraph.transports.zmq.tasks:synthetic",
                 "--set", "momentum=0.9"])
    assert code == 2 and "a device sets only" in capsys.readouterr().err


def test_encoded_results_are_checked_against_the_rounds_codec():
    from flgraph.stages.compress import Int8, TopK
    from flgraph.transports.zmq.encoded import pack, unpack

    spec = ParamSpec.from_arrays({"a": np.zeros(10, np.float32), "b": np.zeros(6, np.float32)})
    gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5)
    gw.start()
    a = RawAgent(gw.endpoint)
    try:
        a.send(encode("join", 1, {"client": 3}))
        a.recv("accept")
        events = gw.begin_round(1, np.zeros(16, np.float32), spec, 0, {3: {}}, 10.0, encode="int8")
        task = a.recv("task")
        assert task.fields["encode"] == "int8"
        a.send(encode("result", 2, {"round": 1, "task": task.fields["task"], "num_samples": 4, "kind": "encoded",
                                    "codec": "topk", "metrics": {}}, [np.zeros(24, np.uint8)]))
        err = a.recv("error")
        assert err.fields["code"] == "refused-update" and "'topk'" in err.fields["text"]
        assert events.get(timeout=5).kind == "failed"
        gw.end_round()
    finally:
        a.close()
        gw.stop()
    # the payload's layout is checked where the driver unpacks it
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    int8 = Int8(stochastic=False).for_client(spec, None)
    frame = pack("int8", int8.encode(x))
    assert frame.size == 16 + 4 * 2  # one scale per tensor
    np.testing.assert_array_equal(int8.decode(unpack(Int8(), frame, spec), spec), int8.decode(int8.encode(x), spec))
    with pytest.raises(ValueError, match="an update encoded with int8 of 23 bytes; the model's needs 24"):
        unpack(Int8(), frame[:-1], spec)
    idx = np.array([5, 2], np.int32).view(np.uint8)
    with pytest.raises(ValueError, match="not ascending"):
        unpack(TopK(0.1), np.concatenate([idx, np.ones(2, np.float32).view(np.uint8)]), spec)
