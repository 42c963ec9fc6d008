"""A tiny ``transformers`` model (config built here, nothing downloaded) trained through LocalTrain with
its own loss, on CPU: the loss falls, and 1 or 2 workers give bit-identical weights."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import flgraph as fg
from flgraph import stages as st
from flgraph.errors import ClientError
from flgraph.models.own_loss import OwnLossTrain

transformers = pytest.importorskip("transformers")


def _model():
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _data():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 32, (48, 6))
    y = (x[:, 0] >= 16).astype(np.int64)  # the class is read from the first token
    return fg.data.FederatedDataset.from_arrays(x, y, fg.data.iid(48, 4, seed=0))


def _fit(cluster):
    train = OwnLossTrain(optimizer=functools.partial(torch.optim.Adam, lr=0.02))
    pipeline = (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(epochs=2, batch_size=8, train_fn=train)
                >> st.Aggregate(st.WeightedMean()))
    with fg.Run(pipeline, model=_model(), data=_data(), seed=3, cluster=cluster, progress=False,
                dashboard=False, metrics_log=None) as run:
        run.fit(rounds=3)
        return run.history.column("loss"), run.params.flat.copy()


@pytest.mark.slow
def test_a_tiny_bert_trains_with_its_own_loss_identically_on_1_and_2_workers(client1, client2):
    losses1, params1 = _fit(client1)
    losses2, params2 = _fit(client2)
    assert losses1[-1] < 0.8 * losses1[0], losses1
    assert np.array_equal(params1, params2)
    assert losses1 == losses2
    # the weights are the model's: the global model classifies the training rule
    model = _model()
    flat = fg.Params(fg.models.ModelAdapter.from_module(model).initial_params().spec, params1)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in flat.to_arrays().items()}, strict=False)
    data = _data()
    x = np.concatenate([data.load(k).x for k in range(4)])
    y = np.concatenate([data.load(k).y for k in range(4)])
    with torch.no_grad():
        pred = model(input_ids=torch.from_numpy(x)).logits.argmax(1).numpy()
    assert (pred == y).mean() >= 0.7


def test_a_model_without_its_own_loss_is_a_clear_error(client1):
    pipeline = (st.Select(clients=2) >> st.Broadcast() >> st.LocalTrain(train_fn=OwnLossTrain())
                >> st.Aggregate())
    x = np.arange(8).reshape(4, 2)
    data = fg.data.FederatedDataset.from_arrays(x, np.zeros(4, np.int64), [[0, 1], [2, 3]])

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(8, 2)

        def forward(self, input_ids, labels=None):
            return self.emb(input_ids).mean(1)

    with fg.Run(pipeline, model=Logits(), data=data, cluster=client1, progress=False, dashboard=False,
                metrics_log=None) as run, pytest.raises((ClientError, fg.errors.ConfigError),
                                                        match=r"returned no \.loss when given labels="):
        run.fit(rounds=1)
