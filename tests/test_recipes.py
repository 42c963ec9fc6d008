"""The recipes: each is FedAvg with stages swapped, has the paper's defaults, and runs on a real cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flgraph.recipes.compose import insert_after, swap
from torch import nn

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st
from flgraph.errors import ConfigError, PipelineError
from flgraph.spec import describe, differences, rebuild


def _names(p: fg.Pipeline) -> list[str]:
    return [type(s).__name__ for s in p]


def test_fedprox_is_fedavg_with_mu_and_stragglers():
    base = recipes.fedavg(10, epochs=20, batch_size=10, lr=0.01)
    p = recipes.fedprox()
    assert _names(p) == ["Select", "Broadcast", "LocalTrain", "Aggregate", "Evaluate"]
    assert differences(describe(base), describe(p)) == ["stage 3 (LocalTrain).mu: 0.0 -> 1.0"]
    s = recipes.fedprox(stragglers=0.9, mu=0.01)
    assert _names(s)[1] == "Stragglers"
    assert (s.stages[1].fraction, s.stages[1].epochs, s.stages[1].policy) == (0.9, 20, "partial")
    assert s.stages[3].mu == 0.01


@pytest.mark.parametrize(("recipe", "method", "lr"), [
    (recipes.fedavgm, "sgd", 1.0), (recipes.fedadam, "adam", 0.01), (recipes.fedyogi, "yogi", 0.01),
    (recipes.fedadagrad, "adagrad", 0.1),
])
def test_server_optimizer_recipes_swap_the_aggregate(recipe, method, lr):
    p = recipe(clients=10)
    base = recipes.fedavg(clients=10)
    assert _names(p) == ["Select", "Broadcast", "LocalTrain", "ServerOpt", "Evaluate"]
    agg = p.stages[3]
    assert agg.method == method and agg.lr == lr and isinstance(agg.reducer, st.WeightedMean)
    if method == "sgd":
        assert agg.momentum == 0.9
    else:
        assert (agg.beta1, agg.beta2, agg.tau) == (0.9, 0.99, 1e-3)
    assert describe(p)[:3] == describe(base)[:3]  # the client side is FedAvg's
    assert differences(describe(p), describe(rebuild(describe(p)))) == []


def test_fedbabu_freezes_the_head_and_personalizes():
    p = recipes.fedbabu(clients=5, head="classifier", finetune=["classifier"])
    train = p.stages[2]
    assert train.freeze == ("classifier",) and train.holdout == 0.2 and (train.epochs, train.batch_size) == (10, 50)
    ev = p.stages[-1]
    assert isinstance(ev, st.PersonalizedEvaluate)
    assert (ev.holdout, ev.epochs, ev.finetune) == (0.2, 5, ("classifier",))


def test_robust_fedavg():
    assert isinstance(recipes.robust_fedavg(10).stages[3].reducer, st.Median)
    assert recipes.robust_fedavg(10, aggregator="trimmed_mean", beta=0.3).stages[3].reducer.beta == 0.3
    with pytest.raises(ConfigError, match="aggregator='krum'"):
        recipes.robust_fedavg(10, aggregator="krum")


def test_robust_fedavg_with_server_momentum():
    p = recipes.robust_fedavg(10, aggregator="trimmed_mean", byzantine_fraction=0.2, momentum=0.9, server_lr=0.5)
    agg = p.stages[3]
    assert isinstance(agg, st.ServerOpt) and isinstance(agg.reducer, st.TrimmedMean)
    assert (agg.method, agg.momentum, agg.lr, agg.reducer.beta) == ("sgd", 0.9, 0.5, 0.2)
    assert isinstance(recipes.robust_fedavg(10).stages[3], st.Aggregate)  # Yin et al.'s rule as published
    with pytest.raises(ConfigError, match=r"momentum=1\.0"):
        recipes.robust_fedavg(10, momentum=1.0)


def test_robust_fedavg_trims_at_least_the_byzantine_share_and_keeps_the_server_lr():
    trimmed = recipes.robust_fedavg(10, aggregator="trimmed_mean", byzantine_fraction=0.2)
    assert trimmed.stages[3].reducer.beta == 0.2  # beta defaults to the assumed Byzantine share
    assert recipes.robust_fedavg(10, aggregator="trimmed_mean").stages[3].reducer.beta == 0.1
    with pytest.raises(ConfigError, match="trimming less than the Byzantine share") as ei:
        recipes.robust_fedavg(10, aggregator="trimmed_mean", byzantine_fraction=0.2, beta=0.1)
    assert "beta >= 0.2" in ei.value.fix
    with pytest.raises(ConfigError, match="the median trims nothing"):
        recipes.robust_fedavg(10, beta=0.2)
    with pytest.raises(ConfigError, match=r"byzantine_fraction=0.5\)"):
        recipes.robust_fedavg(10, byzantine_fraction=0.5)
    for aggregator in ("median", "trimmed_mean"):
        agg = recipes.robust_fedavg(10, aggregator=aggregator, server_lr=2.0).stages[3]
        assert isinstance(agg, st.Aggregate) and agg.server_lr == 2.0  # not lost when the mean is swapped out


def test_compose_helpers_refuse_ambiguity():
    p = recipes.fedavg(10)
    with pytest.raises(PipelineError, match="0 Stragglers stages"):
        swap(p, st.Stragglers, st.Stragglers())
    q = insert_after(p, st.LocalTrain, st.Compress("int8"))
    assert _names(q)[3] == "Compress"
    with pytest.raises(PipelineError):
        insert_after(p, st.Aggregate, st.Byzantine())  # a client stage after the aggregate


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _data() -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=20, samples_per_client=24, num_features=8, num_classes=3,
                                            alpha=0.5, seed=0, test_samples=150)


@pytest.mark.parametrize("name", ["fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "robust_fedavg",
                                  "fedbabu"])
def test_every_recipe_runs_and_learns(client2, name):
    small = {"epochs": 2, "batch_size": 8, "lr": 0.1}
    make = getattr(recipes, name)
    if name == "fedprox":
        p = make(6, mu=0.1, stragglers=0.5, **small)
    elif name == "fedbabu":
        p = make(6, personalize_every=3, finetune_epochs=2, **small)
    elif name in ("fedadam", "fedyogi"):
        p = make(6, server_lr=0.03, **small)
    else:
        p = make(6, **small)
    with fg.Run(p, model=Net(), data=_data(), seed=0, cluster=client2, progress=False) as run:
        h = run.fit(rounds=3)
        flat0 = fg.models.adapter.ModelAdapter.from_module(Net()).initial_params().flat
        moved = run.params.flat - flat0
    assert np.isfinite(run.params.flat).all() and np.any(moved != 0)
    if name == "fedbabu":
        head = run.adapter.spec.entry("head.weight")
        assert not np.any(moved[head.offset : head.offset + head.size])
        assert 0 < h.last("personal_accuracy") <= 1
    else:
        losses = h.column("test_loss")
        assert losses[-1] < losses[0] and h.last("accuracy") > 0.36, (losses, h.column("accuracy"))
    if name == "fedprox":
        assert h.column("stragglers") == [3, 3, 3]
