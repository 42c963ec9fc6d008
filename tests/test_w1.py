"""The reference workload W1 run through flgraph, with W1's own sampler and training step plugged into
Select and LocalTrain, ends at the reference accuracy 0.7650 after 20 rounds (WORKLOAD.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import cloudpickle
import pytest

import flgraph as fg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import w1

cloudpickle.register_pickle_by_value(w1)  # the session's workers were started before bench/ was on the path


@pytest.mark.slow
def test_w1_reaches_reference_accuracy(client2):
    with fg.Run(w1.pipeline(clients=100, epochs=1), model=w1.initial_model("mlp"), data=w1.dataset(), seed=0,
                cluster=client2, progress=False) as run:
        h = run.fit(rounds=20)
        acc, loss = w1.evaluate(run.model, *w1.test_data())
    assert round(acc, 4) == 0.7650, acc
    assert round(loss, 4) == pytest.approx(2.0247, abs=2e-4)
    assert round(h.last("accuracy"), 4) == 0.7650  # flgraph's own Evaluate agrees
    assert h.column("clients_done") == [100] * 20


def test_w1_three_rounds(client2):
    """WORKLOAD.md: 0.1810 / loss 2.2771 after 3 rounds."""
    with fg.Run(w1.pipeline(clients=100, epochs=1), model=w1.initial_model("mlp"), data=w1.dataset(), seed=0,
                cluster=client2, progress=False, evaluate="never") as run:
        run.fit(rounds=3)
        acc, loss = w1.evaluate(run.model, *w1.test_data())
    assert round(acc, 4) == 0.1810 and round(loss, 4) == pytest.approx(2.2771, abs=2e-4)
