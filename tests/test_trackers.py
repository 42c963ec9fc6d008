"""Experiment trackers: a real run's config and metrics read back from TensorBoard's event files, a W&B
offline run's transaction log and an MLflow file store."""

from __future__ import annotations

import glob
import json
import struct
import sys

import numpy as np
import pytest

import flgraph as fg
from flgraph import stages as st
from flgraph.errors import ConfigError
from flgraph.observe.trackers import MLflowTracker, TensorBoardTracker, Tracker, WandbTracker, run_config


def _pipeline(reducer=None):
    return (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8)
            >> st.Aggregate(reducer or st.WeightedMean()))


def _wandb_records(path):
    """The protobuf records of a W&B transaction log (LevelDB log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        raw = f.read()
    assert struct.unpack("<4sHB", raw[:7])[:2] == (b":W&B", 0xBEE1)
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def test_a_run_sends_config_and_metrics_to_tensorboard_wandb_and_mlflow(client2, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "wandb").mkdir()
    tb = TensorBoardTracker(tmp_path / "tb")
    wb = WandbTracker(project="flgraph-test", dir=str(tmp_path / "wandb"))
    ml = MLflowTracker(f"file:{tmp_path / 'mlruns'}", experiment="fl", run_name="r1")
    data = fg.data.synthetic_classification(num_clients=12, samples_per_client=16, num_features=6,
                                            num_classes=3, seed=0)
    with fg.Run(_pipeline(), model=fg.models.mlp(6, [8], 3), data=data, seed=5, cluster=client2,
                progress=False, dashboard=False, metrics_log=None, callbacks=[tb, wb, ml]) as run:
        run.fit(rounds=3)
        losses = run.history.column("loss")
        config = run_config(run)
    # the run adds a final Evaluate (the data has a test split): the config is what runs
    assert config["seed"] == 5 and config["pipeline"] == "Select >> Broadcast >> LocalTrain >> Aggregate >> Evaluate"
    assert config["clients"] == 12 and config["stage1.Select.clients"] == 4

    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = ea.Scalars("flgraph/loss")
    assert [e.step for e in scalars] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx(losses, rel=1e-6)
    text = ea.Tensors("flgraph/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| seed | 5 |" in text
    assert "| pipeline | Select >> Broadcast >> LocalTrain >> Aggregate >> Evaluate |" in text

    [log] = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = list(_wandb_records(log))
    [start] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    sent = {i.key: json.loads(i.value_json) for i in start.config.update}
    assert {k: sent[k] for k in config} == config
    logged = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert [h.step.num for h in logged] == [1, 2, 3]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in logged]
    assert [h["loss"] for h in history] == pytest.approx(losses)
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # on_close finished the run

    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    got = client.get_run(ml.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "r1"
    assert got.data.params["seed"] == "5" and got.data.params["clients"] == "12"
    history = client.get_metric_history(ml.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(r, pytest.approx(v)) for r, v in zip([1, 2, 3], losses)]


def test_config_redacts_secrets_and_holds_no_dp_key():
    class FakeRun:
        seed = 11
        pipeline = fg.recipes.dp_fedavg(clients=5, noise_multiplier=0.5, adaptive=False, sampling="fixed")

    run = fg.Run(FakeRun.pipeline, model=fg.models.mlp(4, [4], 2), seed=11, progress=False, dashboard=False,
                 metrics_log=None, data=fg.data.synthetic_classification(num_clients=20, samples_per_client=4,
                                                                         num_features=4, num_classes=2, seed=0))
    try:
        config = run_config(run)
        keys = [np.asarray(v).tobytes().hex() for s in run.state.stage_states.values() for k, v in s.items()
                if "key" in k]
    finally:
        run.close()
    assert config["seed"] == 11
    assert any(k.endswith(".noise_multiplier") and v == 0.5 for k, v in config.items())
    text = json.dumps(config)
    assert keys and not any(key in text for key in keys)  # the DP noise keys live in the state, never here

    class Keyed(st.Broadcast):
        def settings(self):
            return {"api_key": "abc", "secret_token": "xyz", "mode": "full"}

    FakeRun.pipeline = st.Select(clients=2) >> Keyed() >> st.LocalTrain() >> st.Aggregate()
    config = run_config(FakeRun())
    assert config["stage2.Keyed.api_key"] == config["stage2.Keyed.secret_token"] == "<redacted>"
    assert config["stage2.Keyed.mode"] == "full"


def test_a_tracker_gets_finite_numbers_once_configured():
    seen = []

    class Recorder(Tracker):
        def log_config(self, config):
            seen.append(("config", config))

        def log_metrics(self, metrics, step):
            seen.append((step, metrics))

        def finish(self):
            seen.append("finish")

    class FakeRun:
        seed, pipeline = 1, []

    r = Recorder()
    r.on_start(FakeRun())
    r.on_start(FakeRun())  # a second fit: the config is not sent again
    r.on_round(FakeRun(), {"round": 2, "loss": 0.25, "bad": float("nan"), "ok": True, "ids": [1, 2], "n": 3})
    r.on_close(FakeRun())
    assert seen == [("config", {"seed": 1, "pipeline": ""}), (2, {"loss": 0.25, "n": 3.0}), "finish"]


def test_missing_packages_and_refused_stores_are_clear(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="needs the wandb package") as e:
        WandbTracker(project="x")
    assert "flgraph[wandb]" in str(e.value)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ConfigError, match="needs the mlflow package"):
        MLflowTracker(f"file:{tmp_path}")
    monkeypatch.delitem(sys.modules, "mlflow.tracking")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    import mlflow

    if int(mlflow.__version__.split(".")[0]) >= 3:  # file stores are opt-in since MLflow 3
        with pytest.raises(ConfigError, match="MLflow cannot open the tracking store") as e:
            MLflowTracker(f"file:{tmp_path / 'mlruns'}")
        assert "MLFLOW_ALLOW_FILE_STORE=true" in str(e.value)
