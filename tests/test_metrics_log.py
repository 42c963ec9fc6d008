"""Per-round metrics files (JSON lines, CSV), beside the checkpoint and after a resume; plots."""

from __future__ import annotations

import csv
import importlib.util
import logging

import pytest

import flgraph as fg
from flgraph import stages as st
from flgraph.errors import ConfigError
from flgraph.observe.history import History
from flgraph.observe.metrics_log import MetricsLog, TensorBoardLog, read_metrics


def _data():
    return fg.data.synthetic_classification(num_clients=20, samples_per_client=16, num_features=8,
                                            num_classes=3, seed=0, test_samples=60)


def _pipeline():
    return (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8)
            >> st.Aggregate(st.WeightedMean()) >> st.Evaluate(every=2))


class _FakeRun:
    def __init__(self, rows=()):
        self.history = History(list(rows))
        self.checkpoint_directory = None


def test_checkpointed_run_writes_metrics_jsonl_in_its_directory_and_resume_keeps_it_exact(client2, tmp_path):
    path = tmp_path / "run.zarr"
    with fg.Run(_pipeline(), model=fg.models.mlp(8, [16], 3), data=_data(), seed=0, cluster=client2,
                progress=False, checkpoint=fg.Checkpoints(path, every=2), dashboard=False) as run:
        run.fit(rounds=3)
        rows = read_metrics(path / "metrics.jsonl")
        assert rows == [{k: v for k, v in r.items()} for r in run.history.rows]
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert "accuracy" in rows[1] and "accuracy" not in rows[0] and "time_clients_wall" in rows[0]
    # the run stops after round 3 but snapshot 3 is the last one; simulate a crash after round 4 by
    # appending a row the snapshots never saw, then resume: the file matches the resumed history exactly
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "loss": 99.0}\n{"round": 5, "lo')  # a line cut short by the crash
    assert [r["round"] for r in read_metrics(path)] == [1, 2, 3, 4]
    with fg.resume(path, cluster=client2, progress=False) as run:
        run.fit(rounds=2)
        rows = read_metrics(path)
        assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
        assert rows[3]["loss"] == pytest.approx(run.history[3]["loss"]) and rows[3]["loss"] != 99.0
        assert History(rows).column("loss") == pytest.approx(run.history.column("loss"))


def test_csv_and_no_file_without_checkpoint(client2, tmp_path):
    out = tmp_path / "logs" / "m.csv"
    with fg.Run(_pipeline(), model=fg.models.mlp(8, [16], 3), data=_data(), seed=0, cluster=client2,
                progress=False, metrics_log=out, dashboard=False) as run:
        run.fit(rounds=3)
        auto = next(cb for cb in run.callbacks if isinstance(cb, MetricsLog))
        assert auto.path == out
    with open(out) as f:
        header = next(csv.reader(f))
    assert header[0] == "round" and "accuracy" in header and "loss" in header
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[1]["accuracy"] == pytest.approx(run.history[1]["accuracy"])
    assert rows[0]["loss"] == pytest.approx(run.history[0]["loss"])
    # "auto" without a checkpoint writes nothing
    log = MetricsLog("auto")
    log.on_start(_FakeRun())
    log.on_round(_FakeRun(), {"round": 1})
    assert log.path is None


def test_a_write_failure_is_logged_and_never_stops_the_run(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    log = MetricsLog(blocker / "m.jsonl")  # its parent is a file: cannot be created
    with caplog.at_level(logging.WARNING, logger="flgraph"):
        log.on_start(_FakeRun([{"round": 1, "loss": 1.0}]))
        log.on_round(_FakeRun(), {"round": 2, "loss": 0.5})
        log.on_end(_FakeRun())
    assert sum("metrics file" in r.getMessage() for r in caplog.records) == 1


def test_numpy_values_and_lists_are_written_as_plain_json(tmp_path):
    import numpy as np

    p = tmp_path / "m.jsonl"
    log = MetricsLog(p)
    log.on_start(_FakeRun())
    log.on_round(_FakeRun(), {"round": np.int64(1), "loss": np.float32(0.25), "failed_clients": [np.int64(3)],
                              "bad": float("nan")})
    log.on_end(_FakeRun())
    assert read_metrics(p) == [{"round": 1, "loss": 0.25, "failed_clients": [3], "bad": None}]
    with pytest.raises(ConfigError, match="no metrics file"):
        read_metrics(tmp_path / "missing.jsonl")


def test_tensorboard_writer_or_a_clear_error(tmp_path):
    have = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    if not have:
        with pytest.raises(ConfigError, match="tensorboard") as e:
            TensorBoardLog(tmp_path / "tb")
        assert "pip install tensorboard" in str(e.value)
        return
    cb = TensorBoardLog(tmp_path / "tb")
    cb.on_round(None, {"round": 1, "loss": 0.5, "failed_clients": [1, 2]})
    cb.on_end(None)
    cb.close()
    assert any((tmp_path / "tb").iterdir())


def test_history_plot_draws_the_usual_curves(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    rows = [{"round": r, "loss": 2.0 / r, "test_loss": 2.1 / r, "accuracy": 0.1 * r, "sim_time": 3.0 * r,
             "bytes_up": 100, "bytes_up_raw": 400, "bytes_broadcast": 800, "time_select": 0.01,
             "time_local-train": 0.2, "round_time": 0.3} for r in range(1, 6)]
    fig = History(rows).plot()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Loss", "Accuracy", "Bytes per round", "Time per stage (s)"]
    loss_ax = fig.axes[0]
    assert [ln.get_label() for ln in loss_ax.get_lines()] == ["loss", "test_loss"]
    assert list(loss_ax.get_lines()[0].get_ydata()) == pytest.approx([2.0 / r for r in range(1, 6)])
    assert {ln.get_label() for ln in fig.axes[3].get_lines()} == {"time_select", "time_local-train", "round_time"}
    fig.savefig(tmp_path / "h.png")
    sim = History(rows).plot(x="sim_time")
    assert list(sim.axes[0].get_lines()[0].get_xdata()) == [3.0, 6.0, 9.0, 12.0, 15.0]
    with pytest.raises(ConfigError, match="sim_time"):
        History([{"round": 1, "loss": 1.0}]).plot(x="sim_time")
