"""FedNova on the DAG: exact against an independent implementation, FedAvg's step when every client does the
same work, deterministic, resumable, on the embedded cluster and on one reached by address.

The reference below is written here from the paper's update rule (Sec. 4, vanilla local SGD) with plain
torch: it shares only the data, the initial weights, the clients' batch-order streams and the stream the
per-client epochs are drawn from with flgraph.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recipe_cohort import CHOSEN, NUM_CLIENTS, PER_ROUND
from recipe_cohort import choose as _choose
from recipe_cohort import model as _model

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st
from flgraph.graph import Pipeline
from flgraph.rng import stage_tag, stream

LOW, HIGH, BATCH, LR = 1, 4, 8, 0.1
SIZES = [9, 24, 13, 20, 7, 24, 16, 11, 24, 18, 5, 22]  # unequal n_i: p_i and tau_i differ by client


def _data(equal: bool = False) -> fg.data.FederatedDataset:
    base = fg.data.synthetic_classification(num_clients=NUM_CLIENTS, samples_per_client=24, num_features=6,
                                            num_classes=3, alpha=0.3, seed=3, test_samples=30)
    if equal:
        return base
    parts = [base.load(k) for k in range(NUM_CLIENTS)]
    x = np.concatenate([p.x[:n] for p, n in zip(parts, SIZES)])
    y = np.concatenate([p.y[:n] for p, n in zip(parts, SIZES)])
    bounds = np.cumsum([0, *SIZES])
    return fg.data.FederatedDataset.from_arrays(x, y, [np.arange(a, b) for a, b in itertools.pairwise(bounds)])


def _pipeline(epochs=(LOW, HIGH)) -> fg.Pipeline:
    p = recipes.fednova(clients=PER_ROUND, epochs=epochs, batch_size=BATCH, lr=LR, evaluate_every=None)
    p.stages[0].sampler = _choose
    return p


def _reference(data, model, rounds: int, seed: int) -> np.ndarray:
    """FedNova with vanilla local SGD: d_i = (y_i - x) / tau_i, x <- x + tau_eff sum_i p_i d_i."""
    train_tag, epochs_tag = stage_tag("LocalTrain", 0), stage_tag("RandomEpochs", 0)
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    net = copy.deepcopy(model)
    for rnd in range(1, rounds + 1):
        chosen = CHOSEN[rnd]
        epochs = stream(seed, epochs_tag, rnd).integers(LOW, HIGH + 1, size=len(chosen))
        ds, taus, ns = [], [], []
        for k, e in zip(chosen, epochs):
            xs, ys = (torch.as_tensor(a) for a in (data.load(k).x, data.load(k).y))
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.copy_(x[n])
            rng = stream(seed, train_tag, rnd, k)
            tau = 0
            for _ in range(e):
                perm = torch.from_numpy(rng.permutation(len(ys)))
                for i in range(0, len(ys), BATCH):
                    idx = perm[i : i + BATCH]
                    net.zero_grad(set_to_none=True)
                    F.cross_entropy(net(xs[idx]), ys[idx]).backward()
                    with torch.no_grad():
                        for p in net.parameters():
                            p -= LR * p.grad
                    tau += 1
            ds.append({n: (p.detach() - x[n]).double() / tau for n, p in net.named_parameters()})
            taus.append(tau)
            ns.append(len(ys))
        p_i = np.array(ns, np.float64) / sum(ns)
        tau_eff = float(p_i @ np.array(taus, np.float64))
        for n in x:
            x[n] = (x[n].double() + tau_eff * sum(w * d[n] for w, d in zip(p_i, ds))).float()
    return np.concatenate([x[n].numpy().ravel() for n, _ in model.named_parameters()])


def _run(cluster, rounds: int = 3, pipeline=None, data=None, **kw) -> np.ndarray:
    with fg.Run(pipeline or _pipeline(), model=_model(), data=data or _data(), seed=0, cluster=cluster,
                progress=False, dashboard=False, metrics_log=None, **kw) as run:
        h = run.fit(rounds)
        assert h.last("clients_done") == PER_ROUND
        return run.state.params.flat.copy()


def test_fednova_equals_the_papers_update_over_three_rounds(client2):
    got = _run(client2)
    want = _reference(_data(), _model(), 3, seed=0)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-6, rel
    # the local work was heterogeneous, and the normalisation matters: FedAvg on the same work differs
    fedavg = recipes.fedavg(clients=PER_ROUND, epochs=HIGH, batch_size=BATCH, lr=LR, evaluate_every=None)
    fedavg = Pipeline([fedavg.stages[0], st.RandomEpochs(LOW, HIGH), *fedavg.stages[1:]])
    fedavg.stages[0].sampler = _choose
    other = _run(client2, pipeline=fedavg)
    assert np.abs(other - want).max() > 100 * np.abs(got - want).max()


def test_with_equal_local_steps_fednova_is_fedavgs_step(client2):
    # 24 samples on every client, 2 epochs of batch 8: tau_i = 6 for all, so tau_eff * mean(d_i) = mean(delta_i)
    fedavg = recipes.fedavg(clients=PER_ROUND, epochs=2, batch_size=BATCH, lr=LR, evaluate_every=None)
    fedavg.stages[0].sampler = _choose
    a = _run(client2, pipeline=fedavg, data=_data(equal=True))
    b = _run(client2, pipeline=_pipeline(epochs=2), data=_data(equal=True))
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())


def test_fednova_is_bit_identical_on_one_or_two_workers_and_resumes_exactly(client1, client2, tmp_path):
    whole = _run(client2)
    assert np.array_equal(whole, _run(client1))
    assert np.array_equal(whole, _run(client2, chunk_size=1))
    path = tmp_path / "run.zarr"
    with fg.Run(_pipeline(), model=_model(), data=_data(), seed=0, cluster=client2, progress=False,
                dashboard=False, checkpoint=str(path)) as run:
        run.fit(2)
    with fg.resume(str(path), cluster=client2, pipeline=_pipeline(), progress=False, dashboard=False) as run:
        assert run.state.round == 2
        row = run.fit(1)[-1]
        assert np.array_equal(run.state.params.flat, whole)
        assert LOW * 1 <= row["tau_eff"] <= HIGH * 3  # steps: epochs x ceil(n_i / 8), n_i <= 24


@pytest.fixture
def by_address(tmp_path):
    """A `dask scheduler` and a `dask worker` (2 processes) started as separate processes on 127.0.0.1."""
    dask_cli = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    assert dask_cli
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.monotonic() + 30
        while not sched_file.exists() or not sched_file.read_text().strip().endswith("}"):
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(subprocess.Popen([dask_cli, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                       "--host", "127.0.0.1", "--no-dashboard"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        yield address
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def test_fednova_on_a_cluster_reached_by_address_gives_the_same_bits(by_address, client1):
    remote = _run(by_address, rounds=2, workers=2)
    assert np.array_equal(remote, _run(client1, rounds=2))


def test_fednova_refuses_what_its_normalisation_cannot_honour(client1):
    with pytest.raises(fg.ConfigError, match="plain SGD"):
        recipes.fednova(clients=4, mu=0.1)
    with pytest.raises(fg.ConfigError, match="plain SGD"):
        recipes.fednova(clients=4, optimizer=st.SGD(0.1, momentum=0.9))
    with pytest.raises(fg.ConfigError, match="1 <= low <= high"):
        st.RandomEpochs(3, 2)
    no_steps = recipes.fednova(clients=PER_ROUND, train_fn=lambda m, d, c: 0.5, evaluate_every=None)
    with pytest.raises(fg.ClientError, match="no 'steps' metric"):
        _run(client1, rounds=1, pipeline=no_steps)
