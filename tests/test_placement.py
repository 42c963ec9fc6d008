"""Where LocalTrain trains: device="auto" settled once per run from every worker, explicit cuda refused early.

This machine has no GPU: the runs here check the CPU answer and the refusal on real worker processes; the
GPU answers are checked on injected per-worker CUDA counts (bench/gpu_check.py trains on a real GPU).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from flgraph.stages.placement import check_device, local_device, settle

import flgraph as fg
from flgraph import stages as st
from flgraph.errors import ConfigError


def _data(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    return rng.standard_normal((8, 4)).astype(np.float32), rng.integers(0, 2, 8)


def _run(client, train: st.LocalTrain) -> fg.Run:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    data = fg.data.FederatedDataset.from_function(_data, 20)
    pipe = st.Select(clients=6) >> st.Broadcast() >> train >> st.Aggregate(st.WeightedMean())
    return fg.Run(pipe, model=model, data=data, seed=3, cluster=client, progress=False, evaluate="never")


def test_auto_is_the_default_and_trains_on_the_cpu_of_workers_without_gpus(client2):
    train = st.LocalTrain(batch_size=4)
    assert train.device == "auto" and "device='auto'" in repr(train)
    with _run(client2, train) as run:
        run.fit(rounds=2)
        assert train.train_device() == "cpu"  # settled from both workers' answer (no CUDA device)
        auto = run.params.flat.copy()
    with _run(client2, st.LocalTrain(batch_size=4, device="cpu")) as run:
        run.fit(rounds=2)
        assert np.array_equal(run.params.flat, auto)


def test_explicit_cuda_on_workers_without_a_gpu_is_refused_before_any_round(client2):
    with _run(client2, st.LocalTrain(batch_size=4, device="cuda")) as run:
        with pytest.raises(ConfigError) as ei:
            run.fit(rounds=1)
        assert "LocalTrain(device='cuda') but 2 of the run's 2 workers have no CUDA device" in str(ei.value)
        assert all(addr in str(ei.value) for addr in client2.scheduler_info(n_workers=-1)["workers"])
        assert "device='auto'" in ei.value.fix
        assert len(run.history) == 0


def test_settle_on_injected_worker_answers():
    assert settle("LocalTrain", "auto", {"a": 1, "b": 4}) == "cuda"
    assert settle("LocalTrain", "cuda:1", {"a": 2, "b": 2}) == "cuda:1"
    assert settle("LocalTrain", "auto", {"a": 0}) == "cpu"
    assert settle("LocalTrain", "auto", {}) == "cpu"  # nothing reported: the CPU, which every process has
    assert settle("LocalTrain", "cpu", {"a": 1}) == "cpu"
    with pytest.warns(UserWarning, match=r"trains on the CPU: 1 of the run's 3 workers have no CUDA device"):
        assert settle("LocalTrain", "auto", {"a": 1, "b": 0, "c": 1}) == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false alarm where no worker has a GPU
        settle("LocalTrain", "auto", {"a": 0, "b": 0})
    with pytest.raises(ConfigError, match=r"7 of the run's 8 workers have no CUDA device \(w1, w2, w3, w4, w5 "
                                          r"and 2 more\)"):
        settle("LocalTrain", "cuda", {"w0": 1, **{f"w{i}": 0 for i in range(1, 8)}})


def test_device_names_are_checked_and_auto_alone_is_this_process():
    for bad in ("gpu", "", None, "tpu"):
        with pytest.raises(ConfigError, match="use 'auto'"):
            st.LocalTrain(device=bad)  # type: ignore[arg-type]
    assert check_device("LocalTrain", "cuda:3") == "cuda:3"
    import torch

    assert local_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert local_device("cpu") == "cpu"
