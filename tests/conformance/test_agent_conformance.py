"""Conformance tests for an edge agent of any implementation, driven through flgraph's gateway.

The agent under test is a command line (``FLGRAPH_AGENT_CMD``), with ``{endpoint}``, ``{client}``,
``{key}`` (its CURVE secret file), ``{server_key}`` (the gateway's public file) and ``{heartbeat}`` put in;
it must run the task of ``conformance_task.py``. By default it is flgraph's Python agent::

    FLGRAPH_AGENT_CMD='node my-agent.js --connect {endpoint} --client-id {client} --key {key} \\
        --server-key {server_key}' .venv/bin/python -m pytest tests/conformance

What is checked (transports/PROTOCOL.md): join with a fixed client id over CURVE and stay alive on
heartbeats; answer a task with a result naming its round and task, the exact update and sample count;
answer a failing task with ``task-failed``; reuse cached params when the agent announced
``params_cache``; take and send large tensors in parts when it announced ``parts``; never send a message
the gateway refuses (seq increasing, schema respected); join again after the gateway restarts.
"""

from __future__ import annotations

import os
import queue
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flgraph.transports.zmq import Gateway, Limits

from flgraph.params import ParamSpec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HEARTBEAT = 0.5
LIVENESS = 10  # generous: a loaded CI machine may starve a process for a second or two
CLIENT = 0
DEFAULT = (f"{shlex.quote(sys.executable)} -m flgraph.cli edge --connect {{endpoint}} --task conformance_task:scale "
           "--client-id {client} --key {key} --server-key {server_key} --heartbeat {heartbeat} --max-backoff 0.5")
SPEC = ParamSpec.from_shapes([("layer.weight", (3, 4), "float32"), ("layer.bias", (3,), "float32")])


@pytest.fixture(scope="module")
def setup(keys, tmp_path_factory):
    """A gateway (CURVE, parts of 64 KiB) and the agent under test, connected as client 0."""
    limits = Limits(part_bytes=64 << 10)
    gw = Gateway("tcp://127.0.0.1:0", secret_key=keys / "gateway.key_secret", allow=keys / "allow",
                 heartbeat_s=HEARTBEAT, liveness=LIVENESS, limits=limits)
    endpoint = gw.start()
    cmd = os.environ.get("FLGRAPH_AGENT_CMD", DEFAULT).format(
        endpoint=endpoint, client=CLIENT, key=keys / f"agent-{CLIENT}.key_secret", server_key=keys / "gateway.key",
        heartbeat=HEARTBEAT)
    log = open(tmp_path_factory.mktemp("agent") / "agent.log", "w")  # noqa: SIM115 (closed below)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(shlex.split(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        gw.wait_for(clients=[CLIENT], timeout=60)
        yield gw, proc, limits
    finally:
        gw.stop()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def run_task(gw, flat, config, rnd, params=None):
    encoded = params or gw.encode_params(flat)
    events: queue.SimpleQueue = queue.SimpleQueue()
    job = gw.begin_job(rnd, encoded, SPEC, 11, {CLIENT: config}, 20.0, events)
    try:
        return events.get(timeout=30)
    finally:
        gw.end_job(job)


def params(seed, size=SPEC.size):
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


def test_joins_with_its_client_id_and_stays_alive_on_heartbeats(setup):
    gw, proc, _ = setup
    info = gw.connected()[CLIENT]
    before = gw.counters["received"]
    time.sleep(HEARTBEAT * 5)  # idle: it sends heartbeats
    assert proc.poll() is None and CLIENT in gw.connected() and gw.counters["lost"] == 0
    assert gw.counters["received"] - before >= 3  # it heartbeats while idle
    assert info.session == gw.connected()[CLIENT].session


def test_answers_a_task_with_its_round_task_and_exact_update(setup):
    gw, _, _ = setup
    flat = params(1)
    ev = run_task(gw, flat, {"factor": 0.5, "samples": 13}, rnd=3)
    assert ev.kind == "result", ev.reason
    msg = ev.message
    assert msg.fields["round"] == 3 and msg.fields["num_samples"] == 13 and msg.fields["kind"] == "delta"
    np.testing.assert_array_equal(msg.tensors[0], -0.5 * flat)
    assert msg.fields["metrics"] == {"round": 3.0}


def test_answers_a_failing_task_with_task_failed(setup):
    gw, _, _ = setup
    ev = run_task(gw, params(2), {"fail": True}, rnd=4)
    assert ev.kind == "failed" and "task-failed" in ev.reason


def test_reuses_cached_params_when_it_says_so(setup):
    gw, _, _ = setup
    if not gw.connected()[CLIENT].caps.get("params_cache"):
        pytest.skip("the agent does not announce caps.params_cache")
    flat = params(3)
    encoded = gw.encode_params(flat)
    reused = gw.counters["params_reused"]
    for rnd, factor in ((5, 0.25), (6, 2.0)):
        ev = run_task(gw, flat, {"factor": factor, "samples": 1}, rnd=rnd, params=encoded)
        assert ev.kind == "result", ev.reason
        np.testing.assert_array_equal(ev.message.tensors[0], -factor * flat)
    assert gw.counters["params_reused"] == reused + 1  # the second task went without its frame


def test_takes_and_sends_large_tensors_in_parts_when_it_says_so(setup):
    gw, _, limits = setup
    if not gw.connected()[CLIENT].caps.get("parts"):
        pytest.skip("the agent does not announce caps.parts")
    big = ParamSpec.from_shapes([("w", (300_000,), "float32")])  # 1.2 MB: 19 parts each way
    flat = params(4, big.size)
    events: queue.SimpleQueue = queue.SimpleQueue()
    job = gw.begin_job(7, gw.encode_params(flat), big, 11, {CLIENT: {"factor": 0.5, "samples": 2}}, 20.0, events)
    try:
        ev = events.get(timeout=30)
    finally:
        gw.end_job(job)
    assert ev.kind == "result", ev.reason
    np.testing.assert_array_equal(ev.message.tensors[0], -0.5 * flat)
    assert ev.message.fields.get("xfer") is not None  # it came in parts
    assert limits.part_bytes < flat.nbytes


def test_sent_nothing_the_gateway_refused(setup):
    gw, _, _ = setup
    assert gw.counters["rejected"] == 0  # seq increasing, schema and limits respected


def test_joins_again_after_the_gateway_restarts(setup):
    gw, proc, _ = setup
    endpoint = gw.endpoint
    gw.stop()
    gw.bind = endpoint
    gw.start()
    gw.wait_for(clients=[CLIENT], timeout=30)
    ev = run_task(gw, params(5), {"factor": 0.5, "samples": 1}, rnd=8)
    assert ev.kind == "result", ev.reason
    assert proc.poll() is None
