"""SecAgg+ over edge agents (in-process Agent threads on real CURVE sockets on 127.0.0.1): each agent runs its
client's phases itself and keeps its secrets; the gateway routes public keys, ciphertexts and masked inputs.

Shown: the unmasked sum equals the plain quantised sum of the agents' updates (recorded on the devices) and
the params equal the same rounds on Dask bit for bit; agents that leave after advertising keys, after
sharing keys (their training fails) or after sending their masked input (stopped threads, killed `flgraph
edge` processes, or simulated dropouts) up to the threshold leave the exact sum of the survivors; below it
a clean DropoutError and a run that goes on; nothing the gateway receives holds an individual quantised
update.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from flgraph.transports.zmq import ZmqTransport, gateway
from flgraph.transports.zmq.agent import EdgeResult, EdgeTask
from flgraph.transports.zmq.tasks import synthetic
from test_zmq_integration import CONFIG, HB, Agents, agent_threads, dataset

import flgraph as fg
from flgraph.rng import stream
from flgraph.secure import DropoutError, Dropouts
from flgraph.secure.client import AdvertiseKeys
from flgraph.secure.masks import quantise

CLIENTS = 6
SETTINGS = dict(clients=CLIENTS, neighbours=4, threshold=3, clip=0.05, levels=2**16, epochs=1, batch_size=8,
                lr=0.1, evaluate_every=None)

DELTAS: dict[tuple[int, int], np.ndarray] = {}  # (round, client) -> the update each device trained
_lock = threading.Lock()


def recording_task(task: EdgeTask) -> EdgeResult:
    """The synthetic task; the test keeps the update the device computed before it was masked."""
    out = synthetic(task)
    with _lock:
        DELTAS[(task.round, task.client)] = out.flat_delta(task).copy()
    return out


class LeavingTransport(ZmqTransport):
    """Stops chosen agents right after a phase: ``leave[phase] = [client, ...]`` (the phase's class name, or
    "masking" for the training round that sends the masked inputs)."""

    leave_fn: Any  # client -> None: makes its agent leave
    leave: dict[str, list[int]]

    def _stop(self, phase: str) -> None:
        for c in self.leave.get(phase, []):
            self.leave_fn(c)

    def map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        if type(fn).__name__ == "Unmask":
            self._stop("masking")
        out = super().map_clients(rnd, flat, ids, fn)
        self._stop(type(fn).__name__)
        return out


def transport(keys: Any, cls: type[ZmqTransport] = ZmqTransport, deadline_s: float = 20) -> ZmqTransport:
    return cls("tcp://127.0.0.1:0", secret_key=keys / "gateway.key_secret", allow=keys / "allow", heartbeat_s=HB,
               liveness=4, config=CONFIG, deadline_s=deadline_s)


def run_on(t: Any, dropouts: Dropouts | None = None, neighbours: int = 4, **kw: Any) -> tuple[fg.Run, fg.Pipeline]:
    p = fg.recipes.fedavg_secagg(**{**SETTINGS, "neighbours": neighbours}, dropouts=dropouts)
    run = fg.Run(p, model=fg.models.mlp(8, [16], 3), data=dataset(), seed=3, progress=False, metrics_log=None,
                 dashboard=False, evaluate="never", **kw)
    return run, p


def plain_sum(rnd: int, survivors: Any, tag: int, seed: int = 3) -> np.ndarray:
    """The sum of the survivors' quantised updates, from the updates their devices trained."""
    cfg = SETTINGS
    xs = [quantise(DELTAS[(rnd, int(c))], cfg["clip"], cfg["levels"], stream(seed, tag, rnd, int(c))).astype(np.uint64)
          for c in survivors]
    return np.sum(xs, axis=0, dtype=np.uint64) % np.uint64(2**32)


def test_secure_rounds_over_agents_equal_dask_and_the_gateway_sees_no_update(keys, client1, monkeypatch):
    received: list[Any] = []
    real_decode = gateway.decode

    def recording_decode(*args: Any, **kw: Any) -> Any:
        msg = real_decode(*args, **kw)
        received.append(msg)
        return msg

    monkeypatch.setattr(gateway, "decode", recording_decode)
    DELTAS.clear()
    t = transport(keys)
    t.gateway.start()
    with agent_threads(t, recording_task, range(CLIENTS), keys):
        run, p = run_on(t, transport=t)
        t.gateway.wait_for(clients=range(CLIENTS), timeout=30)
        run.fit(rounds=2)
        edge = run.params.flat.copy()
        report = p.stages[-1].last_round
        tag = t._secure.tag
        run.close()
    assert report is not None and sorted(report.survivors.tolist()) == list(range(CLIENTS))
    expected = plain_sum(2, report.survivors, tag)
    assert np.array_equal(report.total, expected)  # the unmasked sum is the plain quantised sum, exactly

    dask, _ = run_on(None, cluster=client1)
    dask.fit(rounds=2)
    assert np.array_equal(dask.params.flat, edge)  # the same rounds on Dask (keys do not change the sum)
    dask.close()

    # nothing the gateway received is (or contains) an individual quantised update or plain delta
    individual = [quantise(d, SETTINGS["clip"], SETTINGS["levels"], stream(3, tag, r, c)).astype(np.uint32)
                  for (r, c), d in DELTAS.items()]
    tensors = [np.asarray(x) for m in received for x in m.tensors]
    assert any(m.type == "result" and m.fields.get("kind") == "masked" for m in received)
    assert not any(m.type == "result" and m.fields.get("kind") in ("delta", "weights") for m in received)
    for x in tensors:
        raw = x.tobytes()
        for q in individual:
            assert q.tobytes() not in raw and q.view(np.int32).tobytes() not in raw
            if x.size == q.size and x.itemsize == 4:  # a masked input: almost no coordinate equals the update's
                assert np.mean(x.view(np.uint32) == q) < 0.01


@pytest.mark.parametrize("how", ["stopped", "simulated", "stopped after shares"])
def test_agents_leaving_at_a_phase_up_to_the_threshold_leave_the_exact_sum(keys, how):
    DELTAS.clear()
    t = transport(keys, LeavingTransport, deadline_s=6)
    t.gateway.start()
    with agent_threads(t, recording_task, range(CLIENTS), keys) as agents:
        assert isinstance(t, LeavingTransport)
        t.leave_fn = lambda c: agents[c].stop()
        extra: dict[str, Any] = {}
        if how == "stopped":
            t.leave, dropouts = {AdvertiseKeys.__name__: [1], "masking": [4]}, None
        elif how == "simulated":
            t.leave, dropouts = {}, Dropouts(after_keys=1, after_masking=1)
        else:  # its training task fails: counted as a dropout, its masks removed with its reconstructed key
            t.leave, dropouts, extra = {"ShareKeys": [2], "masking": [4]}, None, {"on_client_error": "drop"}
        # two leave: each client keeps 3 neighbours, the threshold
        run, p = run_on(t, dropouts, neighbours=CLIENTS - 1, transport=t, **extra)
        t.gateway.wait_for(clients=range(CLIENTS), timeout=30)
        run.fit(rounds=1)
        report = p.stages[-1].last_round
        tag = t._secure.tag
        run.close()
    assert report is not None and len(report.survivors) == CLIENTS - 1
    gone_keys, gone_masking = report.dropped["after_keys"], report.dropped["after_masking"]
    if how == "stopped":
        assert gone_keys == [1] and report.dropped["during_unmasking"] == [4]
    elif how == "simulated":
        assert len(gone_keys) == 1 and len(gone_masking) == 1
    else:
        assert gone_keys == [] and report.dropped["before_masked_input"] == [2]
        assert report.dropped["during_unmasking"] == [4]
    assert not set(gone_keys + report.dropped["before_masked_input"]) & set(report.survivors.tolist())
    assert np.array_equal(report.total, plain_sum(1, report.survivors, tag))


def test_below_threshold_over_agents_fails_cleanly_and_the_run_goes_on(keys):
    DELTAS.clear()
    t = transport(keys)
    t.gateway.start()
    with agent_threads(t, recording_task, range(CLIENTS), keys):
        run, p = run_on(t, Dropouts(after_masking=3, rounds=(2,)), transport=t)
        t.gateway.wait_for(clients=range(CLIENTS), timeout=30)
        run.fit(rounds=1)
        before = run.params.flat.copy()
        with pytest.raises(DropoutError, match=r"round 2 cannot be unmasked: .*fewer than threshold=3"):
            run.fit(rounds=1)
        assert run.state.round == 1 and np.array_equal(run.params.flat, before)
        p.stages[2].dropouts = None
        run.fit(rounds=1)
        report = p.stages[-1].last_round
        tag = t._secure.tag
        run.close()
    assert run.state.round == 2 and len(report.survivors) == CLIENTS
    assert np.array_equal(report.total, plain_sum(2, report.survivors, tag))


def test_killed_agent_processes_leave_the_same_sum_as_stopped_agents(keys, tmp_path):
    """Real `flgraph edge` processes, one killed after advertising keys and one after sending its masked
    input: the round completes with the same unmasked sum and params as the in-process agents stopped at
    the same phases (whose sum the test above checks against the devices' own updates)."""
    leave = {AdvertiseKeys.__name__: [1], "masking": [4]}

    def once(processes: bool) -> tuple[np.ndarray, np.ndarray, Any]:
        t = transport(keys, LeavingTransport, deadline_s=8)
        assert isinstance(t, LeavingTransport)
        t.gateway.start()
        t.leave = leave
        procs = Agents(t.endpoint, keys, tmp_path)
        try:
            if processes:
                for c in range(CLIENTS):
                    procs.start(c)
                t.leave_fn = procs.kill
                run, p = run_on(t, neighbours=CLIENTS - 1, transport=t)
                t.gateway.wait_for(clients=range(CLIENTS), timeout=60)
                run.fit(rounds=1)
            else:
                with agent_threads(t, recording_task, range(CLIENTS), keys) as agents:
                    t.leave_fn = lambda c: agents[c].stop()
                    run, p = run_on(t, neighbours=CLIENTS - 1, transport=t)
                    t.gateway.wait_for(clients=range(CLIENTS), timeout=30)
                    run.fit(rounds=1)
            report = p.stages[-1].last_round
            out = run.params.flat.copy(), report.total.copy(), report.dropped
            run.close()
            return out
        finally:
            procs.stop()
            t.close()

    killed, stopped = once(True), once(False)
    assert killed[2]["after_keys"] == [1] and killed[2]["during_unmasking"] == [4]
    assert np.array_equal(killed[1], stopped[1]) and np.array_equal(killed[0], stopped[0])
