"""Real clusters: the embedded LocalCluster, `dask scheduler` + `dask worker` processes reached by address,
and a worker process killed in the middle of a round."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import Client

import flgraph as fg
from flgraph import stages as st
from flgraph.cluster import embedded, worker_threads

D, K = 10, 3


def data() -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=30, samples_per_client=16, num_features=D, num_classes=K,
                                            seed=1, test_samples=60)


def pipeline(clients: int = 10) -> fg.Pipeline:
    return st.Select(clients=clients) >> st.Broadcast() >> st.LocalTrain(batch_size=8) >> st.Aggregate()


def test_embedded_cluster_is_worker_processes():
    run = fg.Run(pipeline(), model=fg.models.mlp(D, [8], K), data=data(), seed=0, workers=2, progress=False)
    try:
        h = run.fit(rounds=2)
        assert run.dashboard_link.startswith("http://127.0.0.1:")
        assert run._handle is not None
        pids = run._handle.client.run(os.getpid)
        assert len(pids) == 2 and os.getpid() not in pids.values()
        # the driver's client reaches the in-process scheduler in-process; the workers reach it over TCP
        assert run._handle.client.scheduler.address.startswith("inproc://")
        assert all(w.startswith("tcp://127.0.0.1:") for w in worker_threads(run._handle.client))
        assert h.last("clients_done") == 10 and "accuracy" in h[-1]  # evaluate="final" on data with a test set
    finally:
        run.close()
    assert run._handle is None


def _wait_for_file(path: Path, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear")


@pytest.fixture
def cli_cluster(tmp_path):
    """`dask scheduler` and `dask worker` (2 worker processes) as separate processes on 127.0.0.1."""
    dask_cli = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    assert dask_cli, "the dask command comes with distributed"
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_": "1000000000"}
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        address = _wait_for_file(sched_file)["address"]
        procs.append(subprocess.Popen([dask_cli, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                       "--host", "127.0.0.1", "--no-dashboard"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        yield address
    finally:
        for p in reversed(procs):
            with __import__("contextlib").suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def test_scheduler_and_workers_by_address(cli_cluster, client1):
    with fg.Run(pipeline(), model=fg.models.mlp(D, [8], K), data=data(), seed=3, cluster=cli_cluster, workers=2,
                progress=False) as run:
        assert len(worker_threads(run._ensure_started().client)) == 2
        run.fit(rounds=3)
        remote = run.params.flat
    with fg.Run(pipeline(), model=fg.models.mlp(D, [8], K), data=data(), seed=3, cluster=client1,
                progress=False) as run:
        run.fit(rounds=3)
        local = run.params.flat
    assert np.array_equal(remote, local)  # same seed, different cluster: the same bits


def test_worker_list_survives_the_clients_periodic_scheduler_info_refresh(client2):
    # client.scheduler_info(n_workers=-1) returns a cache that the client's periodic refresh (no per-worker
    # entries) can overwrite mid-call, and then reports "the Dask cluster has no workers" on a cluster that
    # has two. A refresh every 1 ms makes that race frequent; worker_threads asks the scheduler directly.
    with dask.config.set({"distributed.client.scheduler-info-interval": "1ms"}):
        address = client2.run_on_scheduler(lambda dask_scheduler: dask_scheduler.address)  # its TCP listener
        client = Client(address, set_as_default=False)
    try:
        seen = [worker_threads(client) for _ in range(300)]
        assert all(s == {a: 1 for a in seen[0]} and len(s) == 2 for s in seen)
        run = fg.Run(pipeline(), model=fg.models.mlp(D, [8], K), data=data(), seed=0, cluster=client,
                     progress=False, dashboard=False)
        with run:
            assert run.fit(rounds=1)[0]["clients_done"] == 10
    finally:
        client.close()


def test_unreachable_scheduler_is_a_clear_error():
    run = fg.Run(pipeline(), model=fg.models.mlp(D, [8], K), data=data(), cluster="tcp://127.0.0.1:1",
                 progress=False, connect_timeout=2)
    with pytest.raises(fg.ClusterError, match="could not reach the Dask scheduler"):
        run.fit(rounds=1)


def slow_sgd(model, d, ctx):
    """A training step that takes a while, so a worker can be killed in the middle of a round."""
    time.sleep(0.08)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(d.x), torch.from_numpy(d.y)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss)


def test_worker_killed_mid_round_counts_every_client_once():
    p = st.Select(clients=20) >> st.Broadcast() >> st.LocalTrain(train_fn=slow_sgd) >> st.Aggregate()
    cluster = embedded(2)
    client = __import__("distributed").Client(cluster, set_as_default=False)
    try:
        with fg.Run(p, model=fg.models.mlp(D, [8], K), data=data(), seed=5, cluster=client, progress=False,
                    evaluate="never") as quiet:
            quiet.fit(rounds=2)
            expected = quiet.params.flat
        run = fg.Run(p, model=fg.models.mlp(D, [8], K), data=data(), seed=5, cluster=client, progress=False,
                     evaluate="never")
        run.fit(rounds=1)
        victim = sorted(client.run(os.getpid).values())[0]
        killer = threading.Timer(0.4, os.kill, (victim, signal.SIGKILL))
        killer.start()
        h = run.fit(rounds=1)  # round 2: one worker dies ~0.4 s in; its chunk is rerun elsewhere
        killer.join()
        assert h[-1]["round_time"] > 0.5  # the kill landed inside the round
        assert victim not in client.run(os.getpid).values()  # the nanny replaced the dead process
        assert h[-1]["clients_done"] == 20 and h[-1]["samples"] == 20 * 16
        assert np.array_equal(run.params.flat, expected)
        run.close()
    finally:
        client.close()
        cluster.close()


def test_gpu_machines_start_one_worker_per_gpu_each_seeing_its_own_device():
    # No GPU on this machine: the device count is injected (gpus=2), so this checks the workers' layout
    # (processes, CUDA_VISIBLE_DEVICES, Dask resources), not training on a GPU; bench/gpu_check.py does that.
    cluster = embedded(gpus=2)
    client = Client(cluster, set_as_default=False)
    try:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        info = client.scheduler_info(n_workers=-1)["workers"]
        assert [w["resources"] for w in info.values()] == [{"GPU": 1}, {"GPU": 1}]
        assert set(worker_threads(client).values()) == {1}
    finally:
        client.close()
        cluster.close()
    from flgraph.cluster import gpu_workers

    assert gpu_workers(0, 3) == [] and len(gpu_workers(4, None)) == 4
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in gpu_workers(2, 3)] == ["0", "1", "0"]
    assert all("resources" not in w for w in gpu_workers(2, 3))  # shared devices: no whole GPU to offer
