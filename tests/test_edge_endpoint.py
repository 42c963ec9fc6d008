"""Federated evaluation on edge agents, and per-endpoint settings (a device's own, the operator's per client).

In-process agents (a thread each, real sockets on 127.0.0.1 with CURVE). FederatedEvaluate and
PersonalizedEvaluate run their client work on the agents and give the figures of the same run on Dask, bit
for bit. A device's ``settings`` (``flgraph edge --set``) and the operator's ``client_config`` set a client's
epochs, lr, batch size and samples: the round equals an independent FedAvg of LocalTrain runs with those
settings, and the history shows the settings used (sample-weighted means, as every client metric).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
from flgraph.transports.zmq import Agent, ZmqTransport
from flgraph.transports.zmq.tasks import synthetic
from test_zmq_integration import CONFIG, HB, dataset

import flgraph as fg
from flgraph import stages as st
from flgraph.context import ClientSet, ClientWork
from flgraph.data.dataset import ClientData
from flgraph.rng import stage_tag


def data():
    return fg.data.FederatedDataset.from_function(dataset().load, client_ids=[0, 1, 2])


def edge_transport(keys, **kw):
    return ZmqTransport("tcp://127.0.0.1:0", secret_key=keys / "gateway.key_secret", allow=keys / "allow",
                        heartbeat_s=HB, liveness=10, deadline_s=kw.pop("deadline_s", 30), config=CONFIG, **kw)


@contextlib.contextmanager
def agents(t, keys, settings=None):
    """An in-process agent per client 0..2 (``settings[c]``: that device's own settings)."""
    settings = settings or {}
    running = [Agent(t.endpoint, synthetic, client_id=c, secret_key=keys / f"agent-{c}.key_secret",
                     server_key=keys / "gateway.key", heartbeat_s=HB, settings=settings.get(c)) for c in range(3)]
    threads = [threading.Thread(target=a.run, daemon=True) for a in running]
    for th in threads:
        th.start()
    try:
        t.gateway.wait_for(clients=range(3), timeout=20)
        yield running
    finally:
        for a in running:
            a.stop()
        for th in threads:
            th.join(10)


def evaluated():
    return (st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8, lr=0.1, holdout=0.25)
            >> st.Aggregate(st.WeightedMean()) >> st.FederatedEvaluate(1, holdout=0.25)
            >> st.PersonalizedEvaluate(1, holdout=0.25, epochs=2, lr=0.05, finetune_batch_size=4, finetune=["3"]))


def test_federated_and_personalized_evaluation_on_agents_equal_dask(keys, client1):
    t = edge_transport(keys)
    t.gateway.start()
    with agents(t, keys) as running, fg.Run(evaluated(), model=fg.models.mlp(8, [16], 3), data=data(), seed=5,
                                            transport=t, progress=False, evaluate="never") as run:
        edge = run.fit(rounds=2)
        edge_params = run.state.params.flat.copy()
    # counted once the agents stopped (an agent counts a task after sending its result)
    assert sum(a.tasks_done for a in running) == 3 * 2 * 3  # train, evaluate, personalize: 3 clients, 2 rounds
    with fg.Run(evaluated(), model=fg.models.mlp(8, [16], 3), data=data(), seed=5, cluster=client1,
                progress=False, evaluate="never") as ref:
        dask = ref.fit(rounds=2)
        np.testing.assert_array_equal(ref.state.params.flat, edge_params)
    names = ["fed_loss", "fed_accuracy", "personal_loss", "personal_accuracy", "personal_loss_before",
             "personal_accuracy_before", "fed_eval_clients", "personal_eval_clients"]
    for name in names:
        assert edge.column(name) == dask.column(name), name
    assert edge.column("personal_accuracy") != edge.column("personal_accuracy_before")  # fine-tuning did something


def test_evaluation_needs_every_sampled_client_on_an_agent(keys):
    t = edge_transport(keys, deadline_s=3)
    t.gateway.start()
    four = fg.data.FederatedDataset.from_function(dataset().load, client_ids=[0, 1, 2, 3])  # 3 has no agent
    with agents(t, keys), fg.Run(evaluated(), model=fg.models.mlp(8, [16], 3), data=four, seed=5, transport=t,
                                 progress=False, evaluate="never", on_client_error="drop") as run, pytest.raises(
            fg.ClientError, match=r"client 3, stage FederatedEvaluate: edge: no result by the round's deadline.*no "
                                  "agent for this client was connected"):
        run.fit(rounds=1)


def _independent_round(settings, seed, flat, adapter):
    """FedAvg of one round, each client trained by LocalTrain with its own settings (first ``samples``)."""
    full = dataset()
    deltas, weights = [], []
    for c, s in settings.items():
        d = full.load(c)
        n = s.get("samples", len(d.y))
        local = fg.data.FederatedDataset.from_function(lambda cid, d=d, n=n: ClientData(d.x[:n], d.y[:n]),
                                                       client_ids=[c])
        stage = st.LocalTrain(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"])
        stage.tag = stage_tag("LocalTrain", 0)
        stage.prepare(local, adapter)
        work = ClientWork(1, c, 0, seed, fg.params.Params(adapter.spec, flat), local, ClientSet(np.array([c])),
                          adapter)
        work.tag = stage.tag
        stage.run(work)
        deltas.append(np.array(work.update.delta, np.float64))
        weights.append(work.update.num_samples)
    w = np.array(weights, np.float64)
    return flat + (np.sum([wi * di for wi, di in zip(w, deltas)], axis=0) / w.sum()).astype(flat.dtype), w


def test_devices_and_the_operator_set_their_own_settings(keys):
    run_stage = dict(epochs=1, batch_size=8, lr=0.1)
    device = {0: {"epochs": 2, "lr": 0.05}}  # the device's owner: flgraph edge --set epochs=2 --set lr=0.05
    operator = {1: {"batch_size": 4, "samples": 8}, 0: {"epochs": 3, "lr": 0.2}}  # the device wins for client 0
    t = edge_transport(keys, client_config=operator)
    t.gateway.start()
    p = (st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain(**run_stage) >> st.Aggregate(st.WeightedMean()))
    model = fg.models.mlp(8, [16], 3)
    with agents(t, keys, settings=device), fg.Run(p, model=model, data=data(), seed=2, transport=t,
                                                  progress=False, evaluate="never") as run:
        start = run.state.params.flat.copy()
        row = run.fit(rounds=1)[0]
        got = run.state.params.flat.copy()
        adapter = fg.models.ModelAdapter.from_module(fg.models.mlp(8, [16], 3))
    used = {0: {**run_stage, "epochs": 2, "lr": 0.05}, 1: {**run_stage, "batch_size": 4, "samples": 8},
            2: dict(run_stage)}
    want, n = _independent_round(used, 2, start, adapter)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert list(n) == [16, 8, 16] and row["samples"] == 40
    for name in ("epochs", "lr", "batch_size"):
        mean = sum(n[i] * used[c][name] for i, c in enumerate(used)) / n.sum()
        assert row[name] == pytest.approx(mean), name
