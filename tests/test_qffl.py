"""q-FFL / q-FedAvg on the DAG: exact against an independent implementation, FedAvg at q = 0, resumable.

The reference below is written here from the paper's Algorithm 2 with plain torch and numpy: it shares only
the data, the initial weights and the clients' batch-order streams with flgraph.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recipe_cohort import CHOSEN, PER_ROUND
from recipe_cohort import choose as _choose
from recipe_cohort import model as _model
from recipe_cohort import population as _data

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st
from flgraph.rng import stage_tag, stream

EPOCHS, BATCH, LR = 2, 8, 0.1


def _pipeline(q: float = 1.0) -> fg.Pipeline:
    p = recipes.qffl(PER_ROUND, q=q, epochs=EPOCHS, batch_size=BATCH, lr=LR, weighting="uniform",
                     evaluate_every=None)
    p.stages[0].sampler = _choose
    return p


def _reference(data, model, rounds: int, seed: int, q: float) -> np.ndarray:
    """q-FedAvg, Algorithm 2, written from the paper (L = 1/lr)."""
    tag = stage_tag("LocalTrain", 0)
    lip = 1.0 / LR
    names = [n for n, _ in model.named_parameters()]
    w = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    net = copy.deepcopy(model)

    def load(flat: np.ndarray) -> None:
        at = 0
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.from_numpy(flat[at : at + p.numel()].astype(np.float32)).view(p.shape))
                at += p.numel()

    for rnd in range(1, rounds + 1):
        deltas, hs = [], []
        for k in CHOSEN[rnd]:
            xs, ys = data.load(k)
            xs, ys = torch.as_tensor(xs), torch.as_tensor(ys)
            load(w)
            with torch.no_grad():
                fk = float(F.cross_entropy(net(xs), ys))  # F_k(w^t), before any local step
            rng = stream(seed, tag, rnd, k)
            for _ in range(EPOCHS):
                perm = torch.from_numpy(rng.permutation(len(ys)))
                for i in range(0, len(ys), BATCH):
                    idx = perm[i : i + BATCH]
                    net.zero_grad(set_to_none=True)
                    F.cross_entropy(net(xs[idx]), ys[idx]).backward()
                    with torch.no_grad():
                        for p in net.parameters():
                            p -= LR * p.grad
            wbar = np.concatenate([dict(net.named_parameters())[n].detach().numpy().ravel() for n in names])
            dw = lip * (w.astype(np.float64) - wbar.astype(np.float64))
            deltas.append(fk**q * dw)
            hs.append(q * fk ** (q - 1) * float(dw @ dw) + lip * fk**q)
        w = (w - np.sum(deltas, axis=0) / np.sum(hs)).astype(np.float32)
    return w


def _run(cluster, rounds: int = 3, q: float = 1.0, **kw) -> np.ndarray:
    with fg.Run(_pipeline(q), model=_model(), data=_data(), seed=0, cluster=cluster, progress=False,
                dashboard=False, metrics_log=None, **kw) as run:
        run.fit(rounds)
        return run.state.params.flat.copy()


@pytest.mark.parametrize("q", [0.5, 2.0])
def test_qffl_equals_the_papers_algorithm_over_three_rounds(client2, q):
    got = _run(client2, q=q)
    want = _reference(_data(), _model(), 3, seed=0, q=q)
    assert got.shape == want.shape
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-6, rel


def test_q_zero_is_fedavg_with_uniform_client_weights(client2):
    fedavg = (st.Select(PER_ROUND, sampler=_choose) >> st.Broadcast()
              >> st.LocalTrain(EPOCHS, batch_size=BATCH, lr=LR) >> st.Aggregate(st.Mean()))
    with fg.Run(fedavg, model=_model(), data=_data(), seed=0, cluster=client2, progress=False, dashboard=False,
                metrics_log=None) as run:
        run.fit(3)
        want = run.state.params.flat.copy()
    got = _run(client2, q=0.0)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()  # float rounding of L (w - wbar) / L only
    # and q > 0 is another algorithm: it moves away from FedAvg by far more than rounding
    assert np.abs(_run(client2, q=2.0) - want).max() > 1e3 * np.abs(got - want).max()


def test_qffl_resumes_bit_exactly(client2, tmp_path):
    whole = _run(client2, rounds=3)
    path = tmp_path / "run.zarr"
    with fg.Run(_pipeline(), model=_model(), data=_data(), seed=0, cluster=client2, progress=False,
                dashboard=False, checkpoint=str(path)) as run:
        run.fit(2)
    run = fg.resume(str(path), cluster=client2, pipeline=_pipeline(), progress=False, dashboard=False)
    with run:
        assert run.state.round == 2
        run.fit(1)
        assert np.array_equal(run.state.params.flat, whole)


def test_qffl_on_a_cluster_reached_by_address(client2):
    address = client2.run_on_scheduler(lambda dask_scheduler: dask_scheduler.address)  # its TCP listener
    assert address.startswith("tcp://")
    assert np.array_equal(_run(address, rounds=2), _run(client2, rounds=2))


@pytest.mark.parametrize("make, match", [
    (lambda: st.QFFLUpdate(q=-1.0), "q=-1.0"),
    (lambda: st.QFFLUpdate(q=float("nan")), "q=nan"),
    (lambda: st.QFFLUpdate(lr=0.0), "lr=0.0"),
    (lambda: recipes.qffl(optimizer=st.SGD(0.1, momentum=0.9)), "optimizer="),
    (lambda: recipes.qffl(loss=F.mse_loss), "loss="),
])
def test_qffl_refuses_what_it_cannot_honour(make, match):
    with pytest.raises(fg.ConfigError, match=match):
        make()


def test_qffl_step_refuses_values_reduced_over_different_clients():
    spec = fg.params.ParamSpec.from_arrays({"w": np.zeros(2, np.float32)})
    ctx = fg.context.RoundContext(1, 0, fg.params.Params(spec, np.zeros(2, np.float32)), None, None, False)
    ctx.aggregates = {"qffl_delta": (np.ones(2, np.float32), 4.0), "qffl_h": (np.ones(1, np.float32), 3.0)}
    with pytest.raises(fg.PipelineError, match="different weights"):
        st.QFedAvgStep().run(ctx)
