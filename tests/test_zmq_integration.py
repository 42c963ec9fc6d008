"""Edge agents over ZeroMQ: real `flgraph edge` processes on 127.0.0.1 against a gateway in the test.

FedAvg with several agents (bit-identical to the in-process reference), agents killed or too slow
mid-round (the round completes by its deadline, dropouts counted), a gateway restart (agents reconnect),
an agent whose key is not on the allow-list (refused), a mixed Dask + edge run, and FedBuff (the
asynchronous engine) over agents: every dispatch counted once, across a resume and when an agent dies.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flgraph.transports.zmq import Agent, MixedTransport, ZmqTransport
from flgraph.transports.zmq.agent import EdgeResult, EdgeTask
from flgraph.transports.zmq.tasks import synthetic

import flgraph as fg
from flgraph import stages as st
from flgraph.context import ClientSet
from flgraph.engine.clients import Partial, combine_partials, run_clients

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(num_clients=6, samples_per_client=16, num_features=8, num_classes=3)
CONFIG = {**DATA, "hidden": "16", "data_seed": 0, "model_seed": 0}
HB = 0.5


def slow_synthetic(task: EdgeTask) -> EdgeResult:
    """The synthetic task; clients listed in config["slow"] first sleep config["delay_s"] (a slow device)."""
    if str(task.client) in str(task.config.get("slow", "")).split(","):
        end = time.monotonic() + float(task.config.get("delay_s", 0.0))
        while time.monotonic() < end:  # bounded by delay_s
            time.sleep(0.05)
    return synthetic(task)


def dataset():
    return fg.data.synthetic_classification(**DATA, seed=0, test_samples=0)


def pipeline(clients):
    return (st.Select(clients=clients) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8, lr=0.1)
            >> st.Aggregate(st.WeightedMean()))


class LocalTransport:
    """The reference: the client segment in this process, along the same fixed tree."""

    def start(self, bundle, flat):
        self.bundle = bundle
        return 0.0

    def run_round(self, rnd, flat, clients, on_error="raise"):
        return run_clients(self.bundle, flat, rnd, clients, [(0, len(clients))], on_error)[0][1]

    def map_clients(self, rnd, flat, ids, fn):
        raise NotImplementedError

    def places(self):
        return 1

    def close(self):
        pass


class Agents:
    """`flgraph edge` processes started and stopped by the test."""

    def __init__(self, endpoint, keys, log_dir):
        self.endpoint, self.keys, self.log_dir = endpoint, keys, log_dir
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, client, key=None, task="test_zmq_integration:slow_synthetic", extra=()):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        key = key or f"agent-{client}"
        cmd = [sys.executable, "-m", "flgraph.cli", "edge", "--connect", self.endpoint, "--task", task,
               "--client-id", str(client), "--key", str(self.keys / f"{key}.key_secret"),
               "--server-key", str(self.keys / "gateway.key"), "--heartbeat", str(HB), "--max-backoff", "0.5",
               "--verbose", *extra]
        log = open(self.log_dir / f"agent-{client}-{key}.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs[client] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.procs[client].log = log  # type: ignore[attr-defined]
        return self.procs[client]

    def kill(self, client):
        self.procs[client].kill()
        self.procs[client].wait(10)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            p.log.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def agent_threads(t, task, clients, keys, device=None):
    """In-process agents (a thread each) for ``clients`` on transport ``t``; stopped, and ``t`` closed, at exit.
    ``device(client)``: the fields each agent announces when it joins."""
    agents = [Agent(t.endpoint, task, client_id=c, secret_key=keys / f"agent-{c}.key_secret",
                    server_key=keys / "gateway.key", heartbeat_s=HB, device=device(c) if device else None)
              for c in clients]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for th in threads:
        th.start()
    try:
        yield agents
    finally:
        for a in agents:
            a.stop()
        for th in threads:
            th.join(10)
        t.close()


def transport(keys, **kw):
    return ZmqTransport("tcp://127.0.0.1:0", secret_key=keys / "gateway.key_secret", allow=keys / "allow",
                        heartbeat_s=HB, liveness=4, config=kw.pop("config", CONFIG), **kw)


def test_fedavg_with_agents_matches_the_in_process_run(keys, tmp_path):
    t = transport(keys, deadline_s=20)
    t.gateway.start()
    agents = Agents(t.endpoint, keys, tmp_path)
    try:
        for c in range(3):
            agents.start(c)
        data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=[0, 1, 2])
        with fg.Run(pipeline(3), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=t, progress=False,
                    evaluate="never") as run:
            t.gateway.wait_for(clients=range(3), timeout=40)
            history = run.fit(rounds=3)
            edge_params = run.state.params.flat.copy()
        assert [r["clients_done"] for r in history] == [3, 3, 3]
        assert all(r["clients_failed"] == 0 for r in history)
        assert history.column("loss")[-1] < history.column("loss")[0]
        assert all(r["bytes_broadcast"] == 3 * edge_params.nbytes for r in history)
        ref = fg.Run(pipeline(3), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=LocalTransport(),
                     progress=False, evaluate="never")
        ref.fit(rounds=3)
        np.testing.assert_array_equal(ref.state.params.flat, edge_params)  # bit for bit
    finally:
        agents.stop()
        t.close()


def test_agents_killed_or_late_mid_round_are_counted_dropouts(keys, tmp_path):
    cfg = {**CONFIG, "slow": "2", "delay_s": 30.0}
    t = transport(keys, deadline_s=8.0, config=cfg)
    t.gateway.start()
    agents = Agents(t.endpoint, keys, tmp_path)
    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=[0, 1, 2])
    try:
        for c in range(3):
            agents.start(c)
        with fg.Run(pipeline(3), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=t,
                    progress=False, evaluate="never", on_client_error="drop") as run:
            t.gateway.wait_for(clients=range(3), timeout=40)
            run.fit(rounds=1)  # client 2 sleeps 30 s: it misses the deadline
            t.deadline_s = 3.0
            t.config["slow"] = "1,2"  # client 1 is still training when it is killed
            killer = threading.Timer(0.3, agents.kill, args=(1,))  # client 1 dies mid-round
            killer.start()
            t0 = time.monotonic()
            history = run.fit(rounds=1)
            took = time.monotonic() - t0
            killer.join()
        first, row = history[0], history[1]
        assert first["clients_done"] == 2 and first["failed_clients"] == [2]
        assert row["clients_done"] == 1 and row["clients_failed"] == 2
        assert sorted(row["failed_clients"]) == [1, 2]
        assert took < 3.0 + 2.0, f"the round took {took:.1f} s, its deadline is 3 s"
        assert row["samples"] == 16  # no double count
    finally:
        agents.stop()
        t.close()


def test_gateway_restart_agents_reconnect_and_the_run_goes_on(keys, tmp_path):
    t = transport(keys, deadline_s=20)
    t.gateway.start()
    agents = Agents(t.endpoint, keys, tmp_path)
    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=[0, 1])
    try:
        agents.start(0)
        agents.start(1)
        with fg.Run(pipeline(2), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=t,
                    progress=False, evaluate="never") as run:
            t.gateway.wait_for(clients=[0, 1], timeout=40)
            run.fit(rounds=1)
            endpoint = t.endpoint
            t.restart_gateway()
            assert t.endpoint == endpoint and t.gateway.connected() == {}
            t.gateway.wait_for(clients=[0, 1], timeout=20)
            history = run.fit(rounds=2)
        assert [r["clients_done"] for r in history] == [2, 2, 2]
        assert all(p.poll() is None for p in agents.procs.values())
    finally:
        agents.stop()
        t.close()


def test_an_agent_not_on_the_allow_list_is_refused(keys, tmp_path):
    t = transport(keys, deadline_s=5)
    t.gateway.start()
    agents = Agents(t.endpoint, keys, tmp_path)
    try:
        rogue = agents.start(5, key="rogue", extra=("--give-up-after", "2"))
        assert rogue.wait(60) == 3  # gave up: the CURVE handshake is refused, no accept ever comes
        assert t.gateway.connected() == {}
        assert t.gateway.counters["received"] == 0  # not one message of it reached the gateway
    finally:
        agents.stop()
        t.close()


def test_mixed_run_dask_and_edge_clients(keys, client1):
    from flgraph.transports.dask import DaskTransport

    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=list(range(6)))
    edge = transport(keys, deadline_s=20)
    edge.gateway.start()
    with agent_threads(edge, synthetic, (1, 4), keys) as agents:
        edge.gateway.wait_for(clients=[1, 4], timeout=20)
        mixed = MixedTransport(DaskTransport(client1, "mixed-test", "local-train"), edge, route={1, 4})
        with fg.Run(pipeline(6), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=mixed,
                    progress=False, evaluate="never") as run:
            history = run.fit(rounds=2)
            got = run.state.params.flat.copy()
        assert [r["clients_done"] for r in history] == [6, 6]
        assert sum(a.tasks_done for a in agents) == 4
        # The same rounds in this process: Dask clients' tree, then the edge clients' tree.
        ref = fg.Run(pipeline(6), model=fg.models.mlp(8, [16], 3), data=data, seed=0,
                     transport=_SplitLocal({1, 4}), progress=False, evaluate="never")
        ref.fit(rounds=2)
        np.testing.assert_array_equal(ref.state.params.flat, got)


class _SplitLocal(LocalTransport):
    def __init__(self, edge_ids):
        self.edge_ids = edge_ids

    def run_round(self, rnd, flat, clients, on_error="raise"):
        dask_pos, edge_pos = MixedTransport.split(clients.ids, lambda c: c in self.edge_ids)
        parts = []
        for pos in (dask_pos, edge_pos):
            sub = ClientSet(clients.ids[pos])
            parts.append(run_clients(self.bundle, flat, rnd, sub, [(0, len(sub))], on_error)[0][1])
        return combine_partials(self.bundle.reducer, parts[0], parts[1]) if parts else Partial(None)



def test_edge_transports_refuse_what_they_cannot_run(keys, client1):
    """What edge transports cannot run is refused up front, clearly: an asynchronous pipeline on the mixed
    transport (two clocks), simulated devices on real ones, per-client state kept by the run."""
    from flgraph.transports.dask import DaskTransport

    fedbuff = (st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8)
               >> st.BufferedAggregate(buffer=2))
    t = transport(keys)
    mixed = MixedTransport(DaskTransport(client1, "refuse-test", "local-train"), t, route={1})
    with pytest.raises(fg.ConfigError, match=r"serves synchronous rounds only.*lacks publish"):
        fg.Run(fedbuff, model=fg.models.mlp(8, [16], 3), data=dataset(), seed=0, transport=mixed, progress=False)
    simulated = fg.recipes.fedbuff(concurrency=3, buffer=2, evaluate_every=None,
                                   devices=fg.sim.DevicePopulation.lognormal(range(6), seed=0))
    with pytest.raises(fg.ConfigError, match="real devices"):
        fg.Run(simulated, model=fg.models.mlp(8, [16], 3), data=dataset(), seed=0, transport=t, progress=False)
    stateful = (st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8)
                >> st.Compress("topk", error_feedback=True) >> st.Aggregate(st.WeightedMean()))
    with fg.Run(stateful, model=fg.models.mlp(8, [16], 3), data=dataset(), seed=0, transport=t, progress=False,
                dashboard=False) as run, pytest.raises(fg.ConfigError, match="edge devices cannot reach"):
        run.fit(rounds=1)
    t.close()


# -- FedBuff (the asynchronous engine) over edge agents -------------------------------------------------

def fedbuff_pipeline():
    return fg.recipes.fedbuff(concurrency=3, buffer=2, batch_size=8, lr=0.1, evaluate_every=None)


def inflight_of(run):
    key = next(k for k in run.state.stage_states if k.endswith("buffered-aggregate"))
    st_ = run.state.stage_states[key]
    return [int(i) for i in np.asarray(st_["inflight"]).reshape(-1, 4)[:, 0]], int(st_["dispatched"])


def assert_each_dispatch_once(history, run):
    """Every dispatch index is processed once (in some row's arrivals) or is still in flight: never twice,
    never lost."""
    arrivals = [i for r in history for i in r["arrivals"]]
    inflight, dispatched = inflight_of(run)
    assert len(arrivals) == len(set(arrivals))
    assert sorted(arrivals + inflight) == list(range(dispatched))


def global_loss(flat, params_spec):
    """Cross-entropy of a global model on all six clients' data (computed here, independently of the run)."""
    import torch

    ds = dataset()
    model = fg.models.mlp(8, [16], 3)
    arrays = fg.params.Params(params_spec, flat).to_arrays()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    x = np.concatenate([ds.load(c).x for c in range(6)])
    y = np.concatenate([ds.load(c).y for c in range(6)])
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(torch.from_numpy(x).float()),
                                                       torch.from_numpy(y).long()))


def test_fedbuff_over_agents_counts_each_update_once_and_resumes(keys, tmp_path):
    t = transport(keys, deadline_s=20)
    t.gateway.start()
    endpoint = t.endpoint
    agents = Agents(endpoint, keys, tmp_path)
    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=list(range(6)))
    path = tmp_path / "fedbuff.zarr"
    try:
        for c in range(4):  # clients 4 and 5 have no agent: they are never drawn
            agents.start(c)
        with fg.Run(fedbuff_pipeline(), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=t,
                    progress=False, evaluate="never", checkpoint=path) as run:
            t.gateway.wait_for(clients=range(4), timeout=40)
            initial = run.state.params.flat.copy()
            spec = run.state.params.spec
            t0 = time.monotonic()
            history = run.fit(rounds=4)
            took = time.monotonic() - t0
            assert t.gateway.counters["rejected"] == 0  # no late, duplicate or unknown result
            # A gateway restart between fits: the jobs in flight go to their agents when they join again.
            t.restart_gateway()
            t.gateway.wait_for(clients=range(4), timeout=20)
            history = run.fit(rounds=2)
            assert_each_dispatch_once(history, run)
            first_inflight, _ = inflight_of(run)
            after = run.state.params.flat.copy()
        assert len(history) == 6 and all(r["clients_done"] == 2 for r in history)
        assert all(r["clients_failed"] == 0 and r["clients_stale"] == 0 for r in history)
        assert sum(r["clients_dispatched"] for r in history) == inflight_of(run)[1] - 3  # + the first fill
        sim = [r["sim_time"] for r in history]  # real seconds since the first dispatch
        assert sim == sorted(sim) and 0 < sim[3] <= took + 0.5
        assert len(first_inflight) == 3
        assert global_loss(after, spec) < global_loss(initial, spec)
        # Resume: the clients in flight at the snapshot are dispatched again, under the same indices.
        t.gateway.bind = endpoint  # the agents reconnect to the same address
        t.gateway.start()
        with fg.resume(path, transport=t, data=data, progress=False) as run:
            assert run.round == 6
            t.gateway.wait_for(clients=range(4), timeout=40)
            history = run.fit(rounds=3)
            assert_each_dispatch_once(history, run)
            final = run.state.params.flat.copy()
        later = {i for r in history[6:] for i in r["arrivals"]}
        assert set(first_inflight) <= later | set(inflight_of(run)[0])
        assert len(history) == 9 and all(r["clients_done"] == 2 for r in history[6:])
        assert history[6]["sim_time"] >= history[5]["sim_time"]  # the clock goes on from the snapshot's
        assert global_loss(final, spec) < global_loss(initial, spec)
    finally:
        agents.stop()
        t.close()


def test_fedbuff_agent_killed_mid_run_is_one_failure_and_the_run_goes_on(keys, tmp_path):
    cfg = {**CONFIG, "slow": "0,1,2,3", "delay_s": 0.4}  # every task takes a while: agents are busy
    t = transport(keys, deadline_s=20, config=cfg)
    t.gateway.start()
    agents = Agents(t.endpoint, keys, tmp_path)
    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=list(range(6)))
    killed: list[int] = []

    def kill_a_busy_agent():
        busy = sorted(set(t.gateway.connected()) - t.gateway.idle())
        killed.append(busy[0])
        agents.kill(busy[0])

    try:
        for c in range(4):
            agents.start(c)
        with fg.Run(fedbuff_pipeline(), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=t,
                    progress=False, evaluate="never", on_client_error="drop") as run:
            t.gateway.wait_for(clients=range(4), timeout=40)
            history = run.fit(rounds=1)
            killer = threading.Timer(0.5, kill_a_busy_agent)  # during the next fit: agents are mid-task
            killer.start()
            t0 = time.monotonic()
            history = run.fit(rounds=8)
            took = time.monotonic() - t0
            killer.join()
            assert_each_dispatch_once(history, run)
        assert len(killed) == 1
        failed = [c for r in history for c in r.get("failed_clients", [])]
        assert failed == killed  # its in-flight client failed once, and was not dispatched again
        assert t.gateway.counters["lost"] == 1  # found silent by the heartbeats, within the deadline
        assert len(history) == 9 and all(r["clients_done"] == 2 for r in history)
        assert took < 60, f"8 steps took {took:.0f} s"
    finally:
        agents.stop()
        t.close()


def test_fedbuff_without_a_free_agent_fails_by_the_deadline(keys):
    """No agent connected: the first dispatch waits for a free one, bounded by deadline_s, then a clear error."""
    t = transport(keys, deadline_s=1.0)
    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=list(range(6)))
    with fg.Run(fedbuff_pipeline(), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=t,
                progress=False, evaluate="never", dashboard=False) as run:
        t0 = time.monotonic()
        with pytest.raises(fg.ClusterError, match="no edge agent is free"):
            run.fit(rounds=1)
        assert time.monotonic() - t0 < 5
        assert run.round == 0


def failing_task(task: EdgeTask) -> EdgeResult:
    raise RuntimeError(f"no data on device {task.client}")


def test_fedbuff_client_error_in_raise_mode_leaves_the_run_unchanged(keys):
    t = transport(keys, deadline_s=20)
    t.gateway.start()
    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=list(range(6)))
    with agent_threads(t, failing_task, range(4), keys):
        t.gateway.wait_for(clients=range(4), timeout=20)
        with fg.Run(fedbuff_pipeline(), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=t,
                    progress=False, evaluate="never", dashboard=False) as run:
            before = run.state.params.flat.copy()
            with pytest.raises(fg.ClientError, match="no data on device"):
                run.fit(rounds=2)
            assert run.round == 0 and np.array_equal(run.state.params.flat, before)


def test_tiers_over_agents_equal_tiers_on_dask(keys, client1):
    """Edge agents' updates are reduced per site, then across sites, exactly as Dask workers' are."""
    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=list(range(4)))
    data.with_attributes(site=lambda ids: ids % 2)

    def tiered():
        return (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8, lr=0.1)
                >> st.Aggregate(st.WeightedMean(), by="site") >> st.Aggregate(st.Median()))

    edge = transport(keys, deadline_s=20)
    edge.gateway.start()
    with agent_threads(edge, synthetic, range(4), keys):
        edge.gateway.wait_for(clients=range(4), timeout=20)
        with fg.Run(tiered(), model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=edge, progress=False,
                    evaluate="never", dashboard=False) as run:
            history = run.fit(rounds=2)
            got = run.state.params.flat.copy()
    assert [r["clients_done"] for r in history] == [4, 4]
    with fg.Run(tiered(), model=fg.models.mlp(8, [16], 3), data=data, seed=0, cluster=client1, progress=False,
                evaluate="never", dashboard=False) as run:
        run.fit(rounds=2)
        np.testing.assert_array_equal(run.state.params.flat, got)


def test_tiers_group_edge_clients_by_what_their_agents_announced(keys, client1):
    """The groups come from the edge: each agent announces its site when it joins (``device``), and the
    round's per-site reduction equals the same reduction on Dask with the sites as a dataset attribute."""
    data = fg.data.FederatedDataset.from_function(dataset().load, client_ids=list(range(4)))
    tiered = (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8, lr=0.1)
              >> st.Aggregate(st.WeightedMean(), by="site") >> st.Aggregate(st.Median()))
    edge = transport(keys, deadline_s=20)
    edge.gateway.start()
    with agent_threads(edge, synthetic, range(4), keys, device=lambda c: {"site": f"lab-{c % 2}"}):
        edge.gateway.wait_for(clients=range(4), timeout=20)
        assert edge.client_attribute("site", np.arange(5)).tolist() == ["lab-0", "lab-1", "lab-0", "lab-1", None]
        assert edge.client_attribute("region", np.arange(4)) is None
        with fg.Run(tiered, model=fg.models.mlp(8, [16], 3), data=data, seed=0, transport=edge, progress=False,
                    evaluate="never", dashboard=False) as run:
            run.fit(rounds=2)
            got = run.state.params.flat.copy()
    sites = fg.data.FederatedDataset.from_function(dataset().load, client_ids=list(range(4)))
    sites.with_attributes(site=np.array([f"lab-{c % 2}" for c in range(4)]))
    with fg.Run(tiered, model=fg.models.mlp(8, [16], 3), data=sites, seed=0, cluster=client1, progress=False,
                evaluate="never", dashboard=False) as run:
        run.fit(rounds=2)
        np.testing.assert_array_equal(run.state.params.flat, got)
