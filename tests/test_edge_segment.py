"""Client stages on edge agents run exactly as on a Dask worker, or the run refuses before it starts.

Real `flgraph edge` processes on 127.0.0.1 (CURVE) run the round's client segment, sent as plain data and
rebuilt on the device: FedBABU (a frozen head), momentum SGD, int8 and top-k compression (their payload
uploaded as it is: the round's bytes_up equal Dask's) and a custom training function named by import path
(allowed by the device with ``--allow-code``) give bit-identical params to the same run on a Dask cluster.
Stages agents cannot run, code the device does not allow, and agents that run no segment are refused
with errors that name them.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from edge_code import signed_step
from flgraph.transports.zmq import Agent, ZmqTransport
from flgraph.transports.zmq.tasks import synthetic
from test_zmq_integration import CONFIG, HB, Agents, agent_threads, dataset

import flgraph as fg
from flgraph import stages as st

SYNTHETIC = "flgraph.transports.zmq.tasks:synthetic"


def _chain(stages):
    p = st.Select(clients=3) >> st.Broadcast()
    for s in stages:
        p = p >> s
    return p >> st.Aggregate(st.WeightedMean())


CASES = {
    "fedbabu": lambda: [st.LocalTrain(epochs=1, batch_size=8, lr=0.1, freeze=["3"])],
    "momentum": lambda: [st.LocalTrain(epochs=1, batch_size=8, lr=0.05, optimizer=st.SGD(0.05, momentum=0.9))],
    "int8": lambda: [st.LocalTrain(epochs=1, batch_size=8, lr=0.1), st.Compress("int8")],
    "topk": lambda: [st.LocalTrain(epochs=1, batch_size=8, lr=0.1), st.Compress(st.TopK(fraction=0.1))],
    "custom": lambda: [st.LocalTrain(epochs=1, batch_size=8, lr=0.01, train_fn=signed_step)],
}


def edge_transport(keys, bind="tcp://127.0.0.1:0", **kw):
    # liveness 10 (5 s): these tests are about what agents run, not about silences on a loaded machine
    return ZmqTransport(bind, secret_key=keys / "gateway.key_secret", allow=keys / "allow", heartbeat_s=HB,
                        liveness=10, deadline_s=kw.pop("deadline_s", 30), config=kw.pop("config", CONFIG), **kw)


def data():
    return fg.data.FederatedDataset.from_function(dataset().load, client_ids=[0, 1, 2])


def model():
    return fg.models.mlp(8, [16], 3)


def test_client_stages_on_agent_processes_equal_dask(keys, tmp_path, client1):
    first = edge_transport(keys)
    endpoint = first.gateway.start()
    agents = Agents(endpoint, keys, tmp_path)
    got, want = {}, {}
    try:
        for c in range(3):
            agents.start(c, task=SYNTHETIC, extra=("--allow-code", "edge_code.*"))
        for i, (name, make) in enumerate(CASES.items()):
            t = first if i == 0 else edge_transport(keys, bind=endpoint)  # agents rejoin the same endpoint
            t.gateway.start()
            with fg.Run(_chain(make()), model=model(), data=data(), seed=3, transport=t, progress=False,
                        evaluate="never") as run:
                t.gateway.wait_for(clients=range(3), timeout=40)
                history = run.fit(rounds=1)
                got[name] = run.state.params.flat.copy()
            assert [r["clients_done"] for r in history] == [3], name
            with fg.Run(_chain(make()), model=model(), data=data(), seed=3, cluster=client1, progress=False,
                        evaluate="never") as ref:
                dask = ref.fit(rounds=1)
                want[name] = ref.state.params.flat.copy()
            if name in ("int8", "topk"):  # the codec's payload travelled as it is: the same bytes as on Dask
                assert (history[0]["bytes_up"], history[0]["bytes_up_raw"]) == (dask[0]["bytes_up"],
                                                                                dask[0]["bytes_up_raw"]), name
                assert history[0]["bytes_up"] < history[0]["bytes_up_raw"] / 3.5, name
    finally:
        agents.stop()
    for name in CASES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    init = fg.models.ModelAdapter.from_module(model()).initial_params()
    head = np.concatenate([init.to_arrays()[n].ravel() for n in ("3.weight", "3.bias")])
    spec = init.spec
    trained = fg.params.Params(spec, got["fedbabu"]).to_arrays()
    np.testing.assert_array_equal(np.concatenate([trained["3.weight"].ravel(), trained["3.bias"].ravel()]), head)
    assert not np.array_equal(trained["1.weight"], init.to_arrays()["1.weight"])  # the body trained
    assert len({got[n].tobytes() for n in CASES}) == len(CASES)  # each pipeline did something of its own


def test_what_agents_cannot_run_is_refused_before_the_run_starts(keys):
    t = edge_transport(keys)
    refused = {
        "Byzantine: it draws its attackers from the whole population":
            [st.LocalTrain(epochs=1, batch_size=8), st.Byzantine(0.5)],
        r"LocalTrain.train_fn = .*lambda.*code travels by import path only":
            [st.LocalTrain(epochs=1, batch_size=8, train_fn=lambda m, d, c: 0.0)],
        r"Compress\(error_feedback=True\)|edge devices cannot reach":
            [st.LocalTrain(epochs=1, batch_size=8), st.Compress("int8", error_feedback=True)],
    }
    for pattern, stages in refused.items():
        with fg.Run(_chain(stages), model=model(), data=data(), seed=0, transport=t, progress=False,
                    evaluate="never") as run, pytest.raises(fg.ConfigError, match=pattern):
            run.fit(rounds=1)
        t = edge_transport(keys)
    t.close()


def not_a_segment_runner(task):
    """A task function of the device's own that runs LocalTrain from the config only (no caps.segment)."""
    return synthetic(task)


def test_code_the_device_does_not_allow_and_agents_without_segments_are_refused(keys, caplog):
    custom = _chain(CASES["custom"]())
    # The agent announced no allow-list: the driver refuses before any task goes out.
    t = edge_transport(keys)
    t.gateway.start()
    with agent_threads(t, synthetic, (0, 1, 2), keys):
        t.gateway.wait_for(clients=range(3), timeout=20)
        with fg.Run(custom, model=model(), data=data(), seed=0, transport=t, progress=False,
                    evaluate="never") as run, pytest.raises(fg.ConfigError, match=r"edge_code:signed_step.*does not "
                                                                                  "allow"):
            run.fit(rounds=1)
        assert t.gateway.counters["params_sent"] == 0
    # An agent that announced the pattern but no longer allows it: the device refuses, the reason reaches the run.
    t = edge_transport(keys, deadline_s=20)
    t.gateway.start()
    with agent_threads(t, synthetic, (0, 1, 2), keys) as agents:
        t.gateway.wait_for(clients=range(3), timeout=20)
        with caplog.at_level(logging.WARNING, logger="flgraph"), fg.Run(
                custom, model=model(), data=data(), seed=0, transport=t, progress=False, evaluate="never",
                on_client_error="drop") as run:
            for a in agents:  # what the task function is given on the device: clients 0 and 1 refuse
                a.allow = ("edge_code.*",) if a.client_id == 2 else ()
            for info in t.gateway.connected().values():
                info.caps["allow"] = "edge_code.*"  # what they announced at join
            row = run.fit(rounds=1)[0]
        assert row["clients_done"] == 1 and sorted(row["failed_clients"]) == [0, 1]
        dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped: round 1")]
        assert len(dropped) == 2
        assert all("task-failed" in m and "'edge_code:signed_step', which this device does not allow" in m
                   for m in dropped)
    # A task function that runs no segment, under a pipeline with more than LocalTrain's plain settings.
    t = edge_transport(keys)
    t.gateway.start()
    with agent_threads(t, not_a_segment_runner, (0, 1, 2), keys):
        t.gateway.wait_for(clients=range(3), timeout=20)
        with fg.Run(_chain(CASES["fedbabu"]()), model=model(), data=data(), seed=0, transport=t, progress=False,
                    evaluate="never") as run, pytest.raises(fg.ConfigError, match=r"does not run client segments.*"
                                                                                  "freeze"):
            run.fit(rounds=1)


def test_an_agent_refuses_allow_patterns_that_cannot_travel():
    with pytest.raises(fg.ConfigError, match="comma-separated"):
        Agent("tcp://127.0.0.1:1", synthetic, allow=["a,b"])
    with pytest.raises(fg.ConfigError, match="a device sets only"):
        Agent("tcp://127.0.0.1:1", synthetic, settings={"momentum": 0.9})
    with pytest.raises(fg.ConfigError, match=r"epochs=2\.5: a whole number"):
        Agent("tcp://127.0.0.1:1", synthetic, settings={"epochs": 2.5})
    with pytest.raises(fg.ConfigError, match=r"lr=-0\.1: a positive learning rate"):
        Agent("tcp://127.0.0.1:1", synthetic, settings={"lr": -0.1})
