"""Small-scale versions of the stage library's experiments, on a real Dask cluster.

The full-size runs are ``bench/fedprox.py`` (200 rounds, the FedProx paper's settings),
``bench/compression_w1.py`` and ``bench/robust_w1.py`` (W1, 20 rounds); these tests check the same claims
at a size that runs in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
from flgraph.recipes.compose import insert_after, swap

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compression_w1
import fedbabu
import fedprox
import w1

for _bench in (w1, fedbabu):  # the session's workers were started before bench/ was on the path
    cloudpickle.register_pickle_by_value(_bench)


def test_fedprox_with_partial_work_beats_fedavg_that_drops_stragglers(client2):
    """Synthetic(1,1), 90% stragglers: FedProx (mu=1, stragglers do 1..E-1 epochs) ends with a lower
    training loss and a higher test accuracy than FedAvg that drops them (Li et al. 2020, Fig. 1)."""
    rounds = 12
    runs = {name: fedprox.run(name, p, rounds, cluster=client2)
            for name, p in fedprox.pipelines(clients=10, epochs=10, batch_size=10, lr=0.01, stragglers=0.9).items()}
    avg, prox = runs["fedavg"], runs["fedprox"]
    assert len(prox["train_loss"]) == rounds
    assert prox["train_loss"][-1] < avg["train_loss"][-1]
    assert prox["test_accuracy"][-1] > avg["test_accuracy"][-1]
    # partial work is accepted and reported: FedProx's rounds do fewer steps per sample than full epochs
    assert all(s > 0 for s in prox["steps"])


def test_int8_cuts_upload_bytes_4x_and_keeps_w1_accuracy(client2):
    rounds, clients = 6, 30
    plain = compression_w1.run(None, rounds, client2, clients=clients)
    int8 = compression_w1.run("int8", rounds, client2, clients=clients)
    assert plain["ratio"] == 1.0
    assert int8["ratio"] >= 3.9, int8
    assert int8["bytes_raw"] == plain["bytes_raw"]
    assert abs(int8["accuracy"] - plain["accuracy"]) <= 0.01, (int8, plain)


def _byzantine_accuracy(client2, rounds: int) -> Any:
    """``accuracy(pipeline, attack=True)``: final test accuracy after ``rounds`` rounds on label-skewed
    synthetic data (Dirichlet 0.5, 5 classes), with 20% of the clients sending -10x their update
    (``Byzantine(0.2)``) unless ``attack=False``; a run whose model diverged scores chance, 0.2."""
    data = fg.data.synthetic_classification(num_clients=100, samples_per_client=32, num_features=20, num_classes=5,
                                            alpha=0.5, seed=0, signal=1.0, test_samples=500)
    byzantine = st.Byzantine(0.2, attack="sign_flip", scale=10.0)

    def accuracy(p: fg.Pipeline, attack: bool = True) -> float:
        p = insert_after(p, st.LocalTrain, byzantine) if attack else p
        with fg.Run(p, model=fg.models.mlp(20, [32], 5), data=data, seed=0, cluster=client2, progress=False,
                    on_client_error="drop") as run:
            try:
                return float(run.fit(rounds=rounds)[-1]["accuracy"])
            except fg.FlgraphError:  # every client's update non-finite: the model diverged
                return 1 / 5

    return accuracy


def test_median_and_trimmed_mean_converge_near_clean_accuracy_under_a_fifth_of_sign_flippers(client2):
    """20% of the clients send -10x their update: the plain mean collapses to chance, while the median and
    the trimmed mean (``beta`` = the Byzantine share) and multi-Krum end within 0.05 of clean FedAvg once
    training has converged (60 rounds here). At a fixed early round budget they lag behind without server
    momentum (``bench/robust_w1.py``: W1 after 20 rounds); see recipes/robust.py."""
    rounds, clients = 60, 20
    accuracy = _byzantine_accuracy(client2, rounds)
    kw = {"epochs": 1, "batch_size": 16, "lr": 0.05, "evaluate_every": rounds}
    clean = accuracy(recipes.fedavg(clients, **kw), attack=False)
    mean = accuracy(recipes.fedavg(clients, **kw))
    median = accuracy(recipes.robust_fedavg(clients, **kw))
    trimmed = accuracy(recipes.robust_fedavg(clients, aggregator="trimmed_mean", byzantine_fraction=0.2, **kw))
    krum = accuracy(swap(recipes.fedavg(clients, **kw), st.Aggregate, st.Aggregate(st.Krum(f=6, m=8))))
    assert clean > 0.9, clean
    assert mean < 0.25, mean  # chance is 0.2 (5 classes)
    for robust in (median, trimmed, krum):
        assert robust > clean - 0.05, (clean, mean, median, trimmed, krum)


def test_with_server_momentum_median_and_trimmed_mean_match_clean_accuracy_early(client2):
    """The same attack with server momentum 0.9 on every aggregate (FedAvgM-style; ``robust_fedavg(momentum=)``):
    after 15 rounds median and trimmed mean are within 0.05 of the clean run with the same momentum, and the
    mean with momentum collapses (``bench/robust_w1.py --momentum 0.9`` shows the same on W1 at 20 rounds)."""
    rounds, clients = 15, 20
    accuracy = _byzantine_accuracy(client2, rounds)
    kw = {"epochs": 1, "batch_size": 16, "lr": 0.05, "evaluate_every": rounds}
    clean = accuracy(recipes.fedavgm(clients, momentum=0.9, **kw), attack=False)
    mean = accuracy(recipes.fedavgm(clients, momentum=0.9, **kw))
    median = accuracy(recipes.robust_fedavg(clients, momentum=0.9, **kw))
    trimmed = accuracy(recipes.robust_fedavg(clients, aggregator="trimmed_mean", byzantine_fraction=0.2,
                                             momentum=0.9, **kw))
    assert clean > 0.9 and mean < 0.3, (clean, mean)
    assert median > clean - 0.05 and trimmed > clean - 0.05, (clean, mean, median, trimmed)


@pytest.mark.parametrize("codec", ["bf16", "int8", "topk"])
def test_codec_bytes_appear_in_the_run_metrics(client2, codec):
    data = fg.data.synthetic_classification(num_clients=10, samples_per_client=16, num_features=8, num_classes=3,
                                            seed=0, test_samples=30)
    p = (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(batch_size=8) >> st.Compress(codec)
         >> st.Aggregate(st.Median()))
    with fg.Run(p, model=fg.models.mlp(8, [16], 3), data=data, seed=0, cluster=client2, progress=False) as run:
        row = run.fit(rounds=1)[0]
        assert np.isfinite(run.params.flat).all()
    size = run.state.params.nbytes
    assert row["bytes_up_raw"] == 4 * size
    want = {"bf16": 4 * size / 2, "int8": 4 * (size / 4 + 4 * len(run.state.params.spec.entries))}
    if codec in want:
        assert row["bytes_up"] == want[codec]
    else:  # top 1%: int32 index + float32 value per kept entry
        assert row["bytes_up"] < row["bytes_up_raw"] / 10


def test_fedbabu_keeps_the_head_at_its_initial_values_and_beats_fedavg_after_fine_tuning(client2):
    """Label-skewed data, two classes per client, heavy local training (E = 10, SGD momentum 0.9, as in the
    paper): FedBABU never updates the head, and its personalized accuracy after fine-tuning the head beats
    FedAvg's under the same fine-tuning (Oh et al. 2022). bench/fedbabu.py: 8 of 8 seeds at 20 rounds."""
    rounds = 20
    ps = fedbabu.pipelines(**{k: fedbabu.SETTINGS[k] for k in ("clients", "epochs", "batch_size", "lr", "momentum",
                                                                "holdout", "finetune_epochs", "finetune_lr")})
    babu = fedbabu.run(ps["fedbabu"], seed=0, rounds=rounds, cluster=client2)
    avg = fedbabu.run(ps["fedavg"], seed=0, rounds=rounds, cluster=client2)
    assert babu["head_kept"], "FedBABU never updates the head (weight and bias)"
    assert not avg["head_kept"]
    assert babu["after"] > babu["before"] + 0.1, babu  # fine-tuning the head on the client's own data pays
    assert babu["after"] > avg["after"] + 0.01, (babu, avg)
