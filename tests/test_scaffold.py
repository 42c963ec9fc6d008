"""SCAFFOLD on the DAG: exact against an independent implementation, deterministic, resumable.

The reference below is written here from the paper's Algorithm 1 (option II) with plain torch: it shares
only the data, the initial weights and the clients' batch-order streams with flgraph.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recipe_cohort import CHOSEN, NUM_CLIENTS, PER_ROUND
from recipe_cohort import choose as _choose
from recipe_cohort import model as _model
from recipe_cohort import population as _data

import flgraph as fg
from flgraph import recipes
from flgraph.rng import stage_tag, stream

EPOCHS, BATCH, LR, LR_G = 2, 8, 0.1, 1.0


def _pipeline() -> fg.Pipeline:
    p = recipes.scaffold(clients=PER_ROUND, epochs=EPOCHS, batch_size=BATCH, lr=LR, server_lr=LR_G,
                         evaluate_every=None)
    p.stages[0].sampler = _choose
    return p


def _reference(data, model, rounds: int, seed: int) -> np.ndarray:
    """SCAFFOLD, Algorithm 1 option II, written from the paper."""
    tag = stage_tag("LocalTrain", 0)
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = {n: torch.zeros_like(v) for n, v in x.items()}
    ci: dict[int, dict[str, torch.Tensor]] = {}
    net = copy.deepcopy(model)
    for rnd in range(1, rounds + 1):
        dys, dcs = [], []
        for k in CHOSEN[rnd]:
            xs, ys = data.load(k)
            xs, ys = torch.as_tensor(xs), torch.as_tensor(ys)
            mine = ci.get(k, {n: torch.zeros_like(v) for n, v in x.items()})
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.copy_(x[n])
            rng = stream(seed, tag, rnd, k)
            steps = 0
            for _ in range(EPOCHS):
                perm = torch.from_numpy(rng.permutation(len(ys)))
                for i in range(0, len(ys), BATCH):
                    idx = perm[i : i + BATCH]
                    net.zero_grad(set_to_none=True)
                    F.cross_entropy(net(xs[idx]), ys[idx]).backward()
                    with torch.no_grad():
                        for n, p in net.named_parameters():
                            p -= LR * (p.grad - mine[n] + c[n])
                    steps += 1
            y = {n: p.detach().clone() for n, p in net.named_parameters()}
            new = {n: mine[n] - c[n] + (x[n] - y[n]) / (steps * LR) for n in x}
            dys.append({n: y[n] - x[n] for n in x})
            dcs.append({n: new[n] - mine[n] for n in x})
            ci[k] = new
        for n in x:
            x[n] = x[n] + LR_G * torch.stack([d[n] for d in dys]).mean(0)
            c[n] = c[n] + len(dcs) / NUM_CLIENTS * torch.stack([d[n] for d in dcs]).mean(0)
    return np.concatenate([x[n].numpy().ravel() for n, _ in model.named_parameters()])


def _run(cluster, rounds: int = 3, **kw) -> np.ndarray:
    with fg.Run(_pipeline(), model=_model(), data=_data(), seed=0, cluster=cluster, progress=False,
                dashboard=False, metrics_log=None, **kw) as run:
        run.fit(rounds)
        return run.state.params.flat.copy()


def test_scaffold_equals_the_papers_algorithm_over_three_rounds(client2):
    got = _run(client2)
    want = _reference(_data(), _model(), 3, seed=0)
    assert got.shape == want.shape
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-6, rel
    # and the control variates are doing something: plain FedAvg on the same clients differs
    fedavg = recipes.fedavg(clients=PER_ROUND, epochs=EPOCHS, batch_size=BATCH, lr=LR, evaluate_every=None)
    fedavg.stages[0].sampler = _choose
    with fg.Run(fedavg, model=_model(), data=_data(), seed=0, cluster=client2, progress=False, dashboard=False,
                metrics_log=None) as run:
        run.fit(3)
        assert np.abs(run.state.params.flat - want).max() > 100 * np.abs(got - want).max()


def test_scaffold_is_bit_identical_on_one_or_two_workers_and_any_chunking(client1, client2):
    a = _run(client1)
    assert np.array_equal(a, _run(client2))
    assert np.array_equal(a, _run(client2, chunk_size=1))
    assert np.array_equal(a, _run(client2, chunk_size=3))


def test_scaffold_resumes_bit_exactly_with_its_controls(client2, tmp_path):
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


@pytest.mark.parametrize("bad", [
    dict(train_fn=lambda m, d, c: 0.0), dict(optimizer=fg.stages.SGD(0.1, momentum=0.9)), dict(freeze=["3"]),
])
def test_scaffold_refuses_what_its_client_step_cannot_honour(bad):
    with pytest.raises(fg.ConfigError, match="correction='scaffold'"):
        fg.stages.LocalTrain(correction="scaffold", **bad)
    with pytest.raises(fg.ConfigError, match="correction='momentum'"):
        fg.stages.LocalTrain(correction="momentum")
