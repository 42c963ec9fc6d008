"""Bad input gets a clear error naming the client and the stage, and the run stays usable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flgraph as fg
from flgraph import stages as st

D, K = 6, 3


class GenData:
    """Clients 0..19 with 8 samples; client 5 may be empty, client 7 may hold NaN features."""

    def __init__(self, empty: bool = False, nan: bool = False) -> None:
        self.empty, self.nan = empty, nan

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(k)
        n = 0 if (self.empty and k == 5) else 8
        x = rng.standard_normal((n, D)).astype(np.float32)
        if self.nan and k == 7:
            x[0, 0] = np.nan
        return x, rng.integers(0, K, n).astype(np.int64)


def dataset(**kw) -> fg.data.FederatedDataset:
    return fg.data.FederatedDataset.from_function(GenData(**kw), num_clients=20)


def all_clients(rnd, population, count, rng):
    return population  # every client, every round: the bad one is always in


def pipe(sampler=all_clients, clients=20) -> fg.Pipeline:
    return (st.Select(clients=clients, sampler=sampler) >> st.Broadcast() >> st.LocalTrain(batch_size=4, lr=0.1)
            >> st.Aggregate())


def run_for(data, client, model=None, sampler=all_clients, clients=20) -> fg.Run:
    return fg.Run(pipe(sampler, clients), model=model or fg.models.mlp(D, [8], K), data=data, seed=0,
                  cluster=client, progress=False, evaluate="never")


def test_model_output_does_not_fit_labels(client2):
    labels10 = fg.data.FederatedDataset.from_function(
        lambda k: (np.ones((8, D), np.float32), np.arange(8, dtype=np.int64) + 2), num_clients=4)
    run = run_for(labels10, client2, model=fg.models.mlp(D, [8], 3), sampler=None, clients=2)
    with pytest.raises(fg.ClientError) as e:
        run.fit(rounds=1)
    err = e.value
    assert err.stage == "LocalTrain" and err.round == 1 and err.client in range(4)
    assert "output of shape (4, 3)" in str(err) and "values 2..9" in str(err)
    assert "one output per class" in err.fix
    assert run.round == 0
    run.close()


def test_empty_client_raises_then_drop_mode_continues(client2):
    run = run_for(dataset(empty=True), client2)
    before = run.params.flat
    with pytest.raises(fg.ClientError) as e:
        run.fit(rounds=1)
    assert e.value.client == 5 and e.value.stage == "LocalTrain" and "no samples" in str(e.value)
    assert run.round == 0 and np.array_equal(run.params.flat, before)  # nothing changed
    run.on_client_error = "drop"
    h = run.fit(rounds=2)
    assert run.round == 2
    assert h.column("clients_failed") == [1, 1] and h.column("clients_done") == [19, 19]
    assert h[0]["failed_clients"] == [5]
    run.close()


def test_nan_loss_names_client(client2):
    run = run_for(dataset(nan=True), client2)
    with pytest.raises(fg.ClientError) as e:
        run.fit(rounds=1)
    assert e.value.client == 7 and e.value.stage == "LocalTrain"
    assert "non-finite loss" in str(e.value) and "learning rate" in e.value.fix
    run.on_client_error = "drop"
    assert run.fit(rounds=1)[-1]["failed_clients"] == [7]
    assert np.isfinite(run.params.flat).all()
    run.close()


class FlakySampler:
    """Returns an unknown client id on its first call only (a sampler bug)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rnd, population, count, rng):
        self.calls += 1
        ids = list(population[:count])
        if self.calls == 1:
            ids[-1] = 5000
        return ids


def test_unknown_client_id(client2):
    run = run_for(dataset(), client2, sampler=FlakySampler(), clients=4)
    with pytest.raises(fg.ClientError) as e:
        run.fit(rounds=1)
    assert e.value.client == 5000 and e.value.stage == "Select"
    assert "5000" in str(e.value) and "20 clients" in str(e.value)
    assert run.round == 0
    assert run.fit(rounds=1)[-1]["clients_done"] == 4  # the run stays usable
    run.close()


def test_all_clients_failing_is_an_error_not_a_hang(client2):
    run = run_for(dataset(empty=True), client2, sampler=lambda r, p, c, g: [5], clients=1)
    run.on_client_error = "drop"
    with pytest.raises(fg.ClientError, match="all 1 clients of the round failed"):
        run.fit(rounds=1)
    assert run.round == 0
    run.close()


def test_nan_update_from_custom_step_refused(client2):
    def poison(model, data, ctx):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return 0.5

    p = st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain(train_fn=poison) >> st.Aggregate()
    with fg.Run(p, model=fg.models.mlp(D, [8], K), data=dataset(), cluster=client2, progress=False,
                evaluate="never") as run, pytest.raises(fg.ClientError, match="non-finite values"):
        run.fit(rounds=1)


def test_config_errors_before_anything_runs():
    with pytest.raises(fg.PipelineError, match="Broadcast"):
        st.Select(clients=2) >> st.LocalTrain() >> st.Aggregate()
    with pytest.raises(fg.ConfigError, match="more clients than the dataset"):
        fg.Run(pipe(sampler=None, clients=50), model=fg.models.mlp(D, [8], K), data=dataset(), progress=False)
    with pytest.raises(fg.ConfigError, match=r"torch\.nn\.Module"):
        fg.Run(pipe(), model="not a model", data=dataset(), progress=False)
    with pytest.raises(fg.ConfigError, match="FederatedDataset"):
        fg.Run(pipe(), model=fg.models.mlp(D, [8], K), data=np.zeros(3), progress=False)
    with pytest.raises(fg.PipelineError, match="nothing aggregates"):
        fg.Run(st.Select(clients=2) >> st.Broadcast() >> st.LocalTrain(), model=fg.models.mlp(D, [8], K),
               data=dataset(), progress=False)
    with pytest.raises(fg.ConfigError, match="no held-out data"):
        fg.Run(pipe() >> st.Evaluate(), model=fg.models.mlp(D, [8], K), data=dataset(), progress=False)


def test_model_input_does_not_fit_features(client2):
    run = run_for(dataset(), client2, model=fg.models.mlp(D + 5, [8], K), sampler=None, clients=2)
    with pytest.raises(fg.ClientError) as e:
        run.fit(rounds=1)
    assert e.value.stage == "LocalTrain" and "the model failed on a batch of shape (4, 6)" in str(e.value)
    assert "input size" in e.value.fix
    run.close()
