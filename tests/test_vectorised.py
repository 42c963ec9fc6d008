"""Vectorised local training (LocalTrain(clients_at_once=B)): each client's update equals sequential training's,
runs are bit-identical on 1 and 2 workers, and what cannot be vectorised falls back with a message.

The per-client reference is written here in plain torch (one client at a time, the documented batch-order
stream); it shares only the data, the initial weights and the stream scheme with flgraph.
"""

from __future__ import annotations

import copy
import itertools
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flgraph as fg
from flgraph import stages as st
from flgraph.context import ClientSet, ClientWork
from flgraph.engine.blocks import block_of
from flgraph.models.adapter import ModelAdapter
from flgraph.rng import stage_tag, stream

D, K, SEED, RND = 6, 3, 11, 3
SIZES = [3, 17, 8, 1, 12, 25, 5, 9, 14, 2, 20, 7]  # uneven: padding, masks, clients ending early


def _client(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([42, k])
    n = SIZES[k % len(SIZES)]
    y = rng.integers(0, K, n)
    x = rng.standard_normal((n, D)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y.astype(np.int64)


def _data(num: int = 48) -> fg.data.FederatedDataset:
    return fg.data.FederatedDataset.from_function(_client, num)


def _model() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, K))


def _reference_delta(model: torch.nn.Module, k: int, epochs: int, batch: int, lr: float, momentum: float,
                     mu: float) -> np.ndarray:
    """One client trained in plain torch: SGD(momentum), FedProx's gradient mu (w - w0), the seeded order."""
    net = copy.deepcopy(model)
    start = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    x, y = (torch.from_numpy(a) for a in _client(k))
    rng = stream(SEED, stage_tag("LocalTrain", 0), RND, k)
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(y)))
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            with torch.no_grad():
                for p, p0 in zip(net.parameters(), start):
                    p.grad += mu * (p - p0)
            opt.step()
    return torch.cat([(p.detach() - p0).reshape(-1) for p, p0 in zip(net.parameters(), start)]).numpy()


def _works(ids: list[int], data: fg.data.FederatedDataset, ad: ModelAdapter) -> list[ClientWork]:
    clients = ClientSet(np.array(ids))
    gp = ad.initial_params()
    out = []
    for pos, k in enumerate(ids):
        w = ClientWork(RND, k, pos, SEED, gp, data, clients, ad)
        w.tag = stage_tag("LocalTrain", 0)
        out.append(w)
    return out


@pytest.mark.parametrize("momentum,mu", [(0.0, 0.0), (0.0, 0.1), (0.9, 0.0), (0.9, 0.05)],
                         ids=["fedavg", "fedprox", "momentum", "momentum+fedprox"])
def test_block_equals_sequential_per_client(momentum: float, mu: float) -> None:
    model, data = _model(), _data()
    ad = ModelAdapter.from_module(model)
    ids = list(range(12))
    stage = st.LocalTrain(3, batch_size=4, lr=0.1, optimizer=st.SGD(0.1, momentum), mu=mu, clients_at_once=12)
    stage.tag = stage_tag("LocalTrain", 0)
    stage.prepare(data, ad)
    block = _works(ids, data, ad)
    assert stage.run_block(block) == [None] * len(ids)
    seq = _works(ids, data, ad)
    for w in seq:
        st.LocalTrain(3, batch_size=4, lr=0.1, optimizer=st.SGD(0.1, momentum), mu=mu).run(w)
    for wb, ws, k in zip(block, seq, ids):
        assert wb.update is not None and ws.update is not None
        want = _reference_delta(model, k, 3, 4, 0.1, momentum, mu)
        for got in (wb.update.delta, ws.update.delta):
            assert got is not None
            rel = np.abs(got - want).max() / np.abs(want).max()
            assert rel <= 1e-5, (k, rel)
        assert wb.update.num_samples == SIZES[k]
        assert wb.update.metrics["steps"] == ws.update.metrics["steps"] == 3 * -(-SIZES[k] // 4)
        assert wb.update.metrics["samples_processed"] == 3 * SIZES[k]
        assert wb.update.metrics["loss"] == pytest.approx(ws.update.metrics["loss"], rel=1e-5)
        assert wb.update.metrics["vectorised"] == 1.0


def test_steps_freeze_and_holdout_match_sequential() -> None:
    model, data = _model(), _data()
    ad = ModelAdapter.from_module(model)
    ids = [5, 0, 10, 3, 7]
    opts = dict(steps=7, batch_size=5, lr=0.05, freeze=["0"], holdout=0.2)
    stage = st.LocalTrain(**opts, clients_at_once=8)
    stage.prepare(data, ad)
    block, seq = _works(ids, data, ad), _works(ids, data, ad)
    assert stage.run_block(block) == [None] * len(ids)
    for w in seq:
        st.LocalTrain(**opts).run(w)
    n0 = D * 16 + 16  # the frozen first layer
    for wb, ws in zip(block, seq):
        assert wb.update and ws.update and wb.update.delta is not None and ws.update.delta is not None
        assert not wb.update.delta[:n0].any()
        np.testing.assert_allclose(wb.update.delta, ws.update.delta, rtol=0, atol=1e-5 * np.abs(ws.update.delta).max())
        assert wb.update.metrics["steps"] == ws.update.metrics["steps"] == 7


class _Norm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, K)
        self.bn = torch.nn.BatchNorm1d(K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def _eight(k: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _client(5)  # 25 samples
    return x[:8] + k, y[:8]


def test_batchnorm_falls_back_with_a_message(client1, caplog) -> None:
    data = fg.data.FederatedDataset.from_function(_eight, 24)
    pipe = (st.Select(clients=8) >> st.Broadcast() >> st.LocalTrain(1, batch_size=4, lr=0.1, clients_at_once=8)
            >> st.Aggregate(st.WeightedMean()))
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, "flgraph"):
        warnings.simplefilter("always")
        with fg.Run(pipe, model=_Norm(), data=data, seed=SEED, cluster=client1, progress=False,
                    evaluate="never") as run:
            run.fit(rounds=1)
            metrics = run.history[-1]
    said = [str(w.message) for w in seen if "one client at a time" in str(w.message)]
    assert len(said) == 1 and "BatchNorm" in said[0], said
    assert metrics["vectorised"] == 0.0
    assert metrics["clients_done"] == 8


def test_custom_train_fn_falls_back() -> None:
    stage = st.LocalTrain(train_fn=lambda model, data, ctx: 0.0, clients_at_once=4)
    with pytest.warns(UserWarning, match="custom train_fn"):
        stage.prepare(_data(), ModelAdapter.from_module(_model()))


def test_clients_at_once_is_checked() -> None:
    with pytest.raises(fg.errors.ConfigError, match="clients_at_once"):
        st.LocalTrain(clients_at_once=0)
    assert "clients_at_once" not in repr(st.LocalTrain())


def test_blocks_are_tree_nodes_covering_the_round() -> None:
    for n in (1, 7, 100, 1000):
        for size in (1, 3, 64):
            seen = sorted({block_of(n, p, size) for p in range(n)})
            assert seen[0][0] == 0 and seen[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(seen))
            assert all(0 < hi - lo <= size for lo, hi in seen)
            assert all(hi - lo > size // 2 or n <= size for lo, hi in seen)


def _run(client, at_once: int, rounds: int = 2) -> tuple[np.ndarray, dict]:
    pipe = (st.Select(clients=40) >> st.Broadcast()
            >> st.LocalTrain(2, batch_size=4, lr=0.1, optimizer=st.SGD(0.1, 0.5), mu=0.01, clients_at_once=at_once)
            >> st.Aggregate(st.WeightedMean()))
    with fg.Run(pipe, model=_model(), data=_data(), seed=SEED, cluster=client, progress=False,
                evaluate="never") as run:
        run.fit(rounds=rounds)
        return run.params.flat.copy(), dict(run.history[-1])


def test_runs_bit_identical_on_one_and_two_workers_and_close_to_sequential(client1, client2) -> None:
    one, m1 = _run(client1, 16)
    two, m2 = _run(client2, 16)
    assert m1["vectorised"] == m2["vectorised"] == 1.0
    np.testing.assert_array_equal(one, two)
    seq, ms = _run(client2, 1)
    assert "vectorised" not in ms
    start = ModelAdapter.from_module(_model()).initial_params().flat
    rel = np.abs(one - seq).max() / np.abs(seq - start).max()
    assert rel <= 1e-5, rel


class _Branchy(torch.nn.Module):
    """Python control flow on a tensor's value: fine one client at a time, impossible to vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out * 2 if float(out.detach().sum()) > 0 else out


def test_a_model_torch_func_cannot_batch_falls_back_at_run_time() -> None:
    torch.manual_seed(0)
    model, data = _Branchy(), _data()
    ad = ModelAdapter.from_module(model)
    stage = st.LocalTrain(2, batch_size=4, lr=0.1, clients_at_once=8)
    stage.prepare(data, ad)  # nothing to see before it runs
    ids = [0, 1, 2, 4]
    block, seq = _works(ids, data, ad), _works(ids, data, ad)
    with pytest.warns(UserWarning, match="torch.func could not batch the model"):
        assert stage.run_block(block) == [None] * len(ids)
    for w in seq:
        st.LocalTrain(2, batch_size=4, lr=0.1).run(w)
    for wb, ws in zip(block, seq):
        assert wb.update and ws.update and wb.update.delta is not None
        np.testing.assert_array_equal(wb.update.delta, ws.update.delta)
        assert wb.update.metrics["vectorised"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next block goes one by one without trying again
        assert stage.run_block(_works(ids, data, ad)) == [None] * len(ids)


def test_asynchronous_runs_refuse_clients_at_once() -> None:
    pipe = (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(clients_at_once=8) >> st.BufferedAggregate(2))
    with pytest.raises(fg.errors.ConfigError, match="one client per task"):
        fg.Run(pipe, model=_model(), data=_data(), progress=False)


def test_over_selection_trains_blocks_too(client2) -> None:
    def run(at_once: int) -> tuple[np.ndarray, dict]:
        devices = fg.sim.DevicePopulation.lognormal(48, seed=1)  # the first 12 to finish: by simulated time
        pipe = (st.Select(clients=12, over_select=1.5) >> st.Simulate(devices) >> st.Broadcast()
                >> st.LocalTrain(2, batch_size=4, lr=0.1, clients_at_once=at_once) >> st.Aggregate(st.WeightedMean()))
        with fg.Run(pipe, model=_model(), data=_data(), seed=SEED, cluster=client2, progress=False,
                    evaluate="never") as r:
            r.fit(rounds=1)
            return r.params.flat.copy(), dict(r.history[-1])

    vec, mv = run(8)
    assert mv["vectorised"] == 1.0 and mv["clients_done"] == 12
    seq, ms = run(1)
    assert ms["clients_done"] == 12
    start = ModelAdapter.from_module(_model()).initial_params().flat
    assert np.abs(vec - seq).max() / np.abs(seq - start).max() <= 1e-5


def test_a_buffer_refilled_with_new_params_is_read_again() -> None:
    model, data = _model(), _data()
    ad = ModelAdapter.from_module(model)
    stage = st.LocalTrain(1, batch_size=4, lr=0.1, clients_at_once=4)
    stage.prepare(data, ad)
    first = _works([0, 1], data, ad)
    assert stage.run_block(first) == [None, None]
    gp = first[0].global_params
    gp.flat += 0.25  # the same buffer object, refilled (as a worker may do for the next round)
    again = _works([0, 1], data, ad)
    for w in again:
        w.global_params = gp
    assert stage.run_block(again) == [None, None]
    seq = _works([0, 1], data, ad)
    for w in seq:
        w.global_params.flat[:] = gp.flat
        st.LocalTrain(1, batch_size=4, lr=0.1).run(w)
    for wa, ws in zip(again, seq):
        assert wa.update and ws.update and wa.update.delta is not None and ws.update.delta is not None
        np.testing.assert_allclose(wa.update.delta, ws.update.delta, rtol=1e-5, atol=1e-6)
