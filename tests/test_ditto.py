"""Ditto on the DAG: exact against an independent implementation, resumable with its personal models, and
run on a cluster reached by address.

The reference below is written here from the paper's Algorithm 1 (FedAvg as the global solver) with plain
torch: it shares only the data, the initial weights, the held-out split and the clients' batch-order
streams with flgraph.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flgraph.stages.ditto import personal_models
from flgraph.stages.split import heldout
from recipe_cohort import CHOSEN, PER_ROUND
from recipe_cohort import choose as _choose
from recipe_cohort import model as _model
from recipe_cohort import population as _data
from test_clusters import cli_cluster  # noqa: F401  (the fixture: `dask scheduler` + workers by address)

import flgraph as fg
from flgraph import recipes
from flgraph.rng import stage_tag, stream

EPOCHS, BATCH, LR = 2, 8, 0.1
LAM, P_EPOCHS, P_LR, HOLDOUT, SEED = 0.5, 3, 0.05, 0.25, 0


def _pipeline() -> fg.Pipeline:
    p = recipes.ditto(clients=PER_ROUND, lam=LAM, epochs=EPOCHS, batch_size=BATCH, lr=LR, personal_epochs=P_EPOCHS,
                      personal_lr=P_LR, holdout=HOLDOUT, evaluate_every=None)
    p.stages[0].sampler = _choose
    return p


def _flat(d: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([d[n].detach().numpy().ravel() for n in names])


def _reference(data, model, rounds: int, seed: int):
    """Ditto, Algorithm 1, written from the paper: (w, {k: v_k}, per-round mean held-out accuracy of v_k)."""
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    v: dict[int, dict[str, torch.Tensor]] = {}
    accs = []
    net = copy.deepcopy(model)

    def sgd(start, xs, ys, tag, rnd, k, epochs, lr, lam):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(start[n])
        rng = stream(seed, tag, rnd, k)
        for _ in range(epochs):
            perm = torch.from_numpy(rng.permutation(len(ys)))
            for i in range(0, len(ys), BATCH):
                idx = perm[i : i + BATCH]
                net.zero_grad(set_to_none=True)
                F.cross_entropy(net(xs[idx]), ys[idx]).backward()
                with torch.no_grad():
                    for n, p in net.named_parameters():
                        p -= lr * (p.grad + lam * (p - w[n]))
        return {n: p.detach().clone() for n, p in net.named_parameters()}

    for rnd in range(1, rounds + 1):
        deltas, sizes, correct, held = [], [], 0, 0
        for k in CHOSEN[rnd]:
            xs, ys = data.load(k)
            ho = heldout(seed, k, len(ys), HOLDOUT)
            xt, yt = torch.as_tensor(xs[~ho]), torch.as_tensor(ys[~ho])
            wk = sgd(w, xt, yt, stage_tag("LocalTrain", 0), rnd, k, EPOCHS, LR, 0.0)
            deltas.append({n: wk[n] - w[n] for n in names})
            sizes.append(len(yt))
            v[k] = sgd(v.get(k, w), xt, yt, stage_tag("DittoPersonal", 0), rnd, k, P_EPOCHS, P_LR, LAM)
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.copy_(v[k][n])
                correct += int((net(torch.as_tensor(xs[ho])).argmax(1) == torch.as_tensor(ys[ho])).sum())
            held += int(ho.sum())
        accs.append(correct / held)
        total = sum(sizes)
        for n in names:
            w[n] = w[n] + sum(s / total * d[n] for s, d in zip(sizes, deltas))
    return _flat(w, names), {k: _flat(vk, names) for k, vk in v.items()}, accs


def _run(cluster, rounds: int = 3, **kw):
    with fg.Run(_pipeline(), model=_model(), data=_data(), seed=SEED, cluster=cluster, progress=False,
                dashboard=False, metrics_log=None, **kw) as run:
        h = run.fit(rounds)
        return run.state.params.flat.copy(), personal_models(run), [row["ditto_accuracy"] for row in h]


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_ditto_equals_the_papers_algorithm_over_three_rounds(client2):
    w, v, accs = _run(client2)
    w_ref, v_ref, accs_ref = _reference(_data(), _model(), 3, SEED)
    assert _rel(w, w_ref) <= 1e-6
    assert sorted(v) == sorted(v_ref) == [0, 1, 2, 5, 7, 8, 9, 11]  # a v_k only for the clients selected
    for k in v_ref:
        assert _rel(v[k], v_ref[k]) <= 1e-6, k
    assert accs == pytest.approx(accs_ref, abs=1e-12)
    # the personal step leaves the update alone: FedAvg with the same holdout gives the same global model
    fedavg = recipes.fedavg(clients=PER_ROUND, epochs=EPOCHS, batch_size=BATCH, lr=LR, holdout=HOLDOUT,
                            evaluate_every=None)
    fedavg.stages[0].sampler = _choose
    with fg.Run(fedavg, model=_model(), data=_data(), seed=SEED, cluster=client2, progress=False,
                dashboard=False, metrics_log=None) as run:
        run.fit(3)
        assert np.array_equal(run.state.params.flat, w)
    assert max(np.abs(v[k] - w).max() for k in v) > 1e-2  # and the personal models are not the global one


def test_ditto_resumes_bit_exactly_with_its_personal_models(client2, tmp_path):
    w, v, _ = _run(client2, rounds=3)
    path = tmp_path / "run.zarr"
    with fg.Run(_pipeline(), model=_model(), data=_data(), seed=SEED, cluster=client2, progress=False,
                dashboard=False, checkpoint=str(path)) as run:
        run.fit(2)
    run = fg.resume(str(path), cluster=client2, pipeline=_pipeline(), progress=False, dashboard=False)
    with run:
        assert run.state.round == 2
        run.fit(1)
        assert np.array_equal(run.state.params.flat, w)
        got = personal_models(run)
    assert sorted(got) == sorted(v)
    for k in v:
        assert np.array_equal(got[k], v[k]), k


def test_ditto_on_a_cluster_reached_by_address(cli_cluster, client1, tmp_path):  # noqa: F811
    # the personal models live in the run directory, which every worker of this one machine reaches
    remote = _run(cli_cluster, rounds=2, workers=2, checkpoint=str(tmp_path / "run.zarr"))  # waits for 2
    assert (tmp_path / "run.zarr" / "client-state").is_dir()
    local = _run(client1, rounds=2)
    assert np.array_equal(remote[0], local[0]) and sorted(remote[1]) == sorted(local[1])
    assert all(np.array_equal(remote[1][k], local[1][k]) for k in local[1])


@pytest.mark.parametrize(("kw", "match"), [
    (dict(lam=-1.0), "lam=-1.0"), (dict(lr=0.0), "lr=0.0"), (dict(epochs=0), "epochs=0"),
    (dict(holdout=0.0), "holdout=0"), (dict(holdout=1.0), "holdout=1.0"),
])
def test_ditto_refuses_settings_it_cannot_honour(kw, match):
    with pytest.raises(fg.ConfigError, match=match):
        fg.stages.DittoPersonal(**kw)


def test_ditto_recipe_without_holdout_keeps_no_evaluation():
    p = recipes.ditto(clients=3, holdout=0.0, evaluate_every=None)
    assert "evaluation" not in p.stages[3].writes() and len(p) == 5
    with (pytest.raises(fg.ConfigError, match="no DittoPersonal"),
          fg.Run(recipes.fedavg(clients=2, evaluate_every=None), model=_model(), data=_data(), seed=0,
                 progress=False, dashboard=False, metrics_log=None) as run):
        personal_models(run)


def test_ditto_personal_steps_count_batches_across_epochs_without_evaluation(client1):
    def personal(**solver):  # 20 samples in batches of 8: 3 batches an epoch
        p = (fg.stages.Select(clients=PER_ROUND) >> fg.stages.Broadcast() >> fg.stages.LocalTrain(batch_size=BATCH)
             >> fg.stages.DittoPersonal(LAM, lr=P_LR, batch_size=BATCH, holdout=0.0, evaluate=False, **solver)
             >> fg.stages.Aggregate(fg.stages.WeightedMean()))
        with fg.Run(p, model=_model(), data=_data(), seed=SEED, cluster=client1, progress=False, dashboard=False,
                    metrics_log=None) as run:
            run.fit(2)
            return personal_models(run)

    by_epochs, by_steps = personal(epochs=3), personal(steps=9)
    assert sorted(by_epochs) == sorted(by_steps) and len(by_steps) >= PER_ROUND
    assert all(np.array_equal(by_epochs[k], by_steps[k]) for k in by_steps)
    assert not all(np.array_equal(by_epochs[k], v) for k, v in personal(steps=8).items())
