"""Unit tests for flgraph.observe.history.History."""

from __future__ import annotations

import pytest

from flgraph.observe.history import History


def _history() -> History:
    h = History()
    h.append({"round": 1, "loss": 2.0, "clients_done": 10, "round_time": 0.25})
    h.append({"round": 2, "loss": 1.5, "accuracy": 0.6, "clients_done": 9, "round_time": 0.125})
    h.append({"round": 3, "loss": 1.25, "clients_done": 10, "custom": "x", "round_time": 0.2})
    return h


def test_len_iter_getitem():
    h = _history()
    assert len(h) == 3
    assert [r["round"] for r in h] == [1, 2, 3]
    assert h[1]["accuracy"] == 0.6
    assert h[-1]["round"] == 3


def test_append_copies_the_row():
    h = History()
    row = {"round": 1, "loss": 1.0}
    h.append(row)
    row["loss"] = 99.0
    assert h.last("loss") == 1.0


def test_constructor_copies_the_list():
    rows = [{"round": 1}]
    h = History(rows)
    rows.append({"round": 2})
    assert len(h) == 1
    assert len(History()) == 0 and len(History(None)) == 0


def test_last_is_the_most_recent_round_reporting_the_key():
    h = _history()
    assert h.last("loss") == 1.25
    assert h.last("accuracy") == 0.6  # round 3 did not evaluate
    assert h.last("round") == 3
    assert h.last("custom") == "x"


def test_column_skips_rounds_without_the_key():
    h = _history()
    assert h.column("loss") == [2.0, 1.5, 1.25]
    assert h.column("accuracy") == [0.6]
    assert h.column("nothing") == []


def test_keys_in_first_seen_order():
    assert _history().keys() == ["round", "loss", "clients_done", "round_time", "accuracy", "custom"]
    assert History().keys() == []


def test_last_unknown_key_lists_known_metrics():
    h = _history()
    with pytest.raises(KeyError) as ei:
        h.last("f1")
    msg = ei.value.args[0]
    assert msg == ("no round reported 'f1'; metrics reported: "
                   "['round', 'loss', 'clients_done', 'round_time', 'accuracy', 'custom']")


def test_last_accuracy_missing_suggests_evaluate():
    h = History([{"round": 1, "loss": 0.5}])
    with pytest.raises(KeyError) as ei:
        h.last("accuracy")
    msg = ei.value.args[0]
    assert msg.startswith("no round reported 'accuracy'; metrics reported: ['round', 'loss']")
    assert msg.endswith("(add st.Evaluate() to the pipeline for accuracy)")


def test_last_on_empty_history():
    with pytest.raises(KeyError, match=r"metrics reported: \[\]"):
        History().last("loss")


def test_default_table():
    lines = _history().table().splitlines()
    assert lines == [
        "round    loss  accuracy  clients_done  round_time",
        "    1  2.0000                      10      0.2500",
        "    2  1.5000    0.6000             9      0.1250",
        "    3  1.2500                      10      0.2000",
    ]


def test_table_with_chosen_keys_right_aligned():
    h = _history()
    assert h.table(["round", "custom"]).splitlines() == ["round  custom", "    1        ", "    2        ",
                                                         "    3       x"]
    assert h.table(["loss"]).splitlines() == ["  loss", "2.0000", "1.5000", "1.2500"]


def test_table_columns_are_aligned():
    lines = _history().table().splitlines()
    assert len({len(line) for line in lines}) == 1


def test_repr():
    assert repr(History()) == "History(0 rounds)"
    h = _history()
    r = repr(h)
    assert r.splitlines()[0] == "History(3 rounds)"
    assert r.endswith(h.table())


# -- the window: a bounded number of rows in memory --------------------------------------------------------
import logging  # noqa: E402

import numpy as np  # noqa: E402
import zarr  # noqa: E402
import zarr.storage  # noqa: E402

from flgraph.errors import HistoryError  # noqa: E402
from flgraph.store.checkpoint import RunDirectory, Snapshot  # noqa: E402


def _row(r: int) -> dict:
    return {"round": r, "loss": 1.0 / r, **({"accuracy": r / 100} if r % 10 == 0 else {})}


def test_without_a_run_directory_the_window_bounds_memory_and_a_dropped_row_says_how_to_keep_it(caplog):
    h = History(window=50)
    with caplog.at_level(logging.WARNING, logger="flgraph"):
        for r in range(1, 1001):
            h.append(_row(r))
    assert len(h.recent) == 50 and len(h) == 1000 and h.first_kept == 950  # the bound
    assert [m for m in caplog.messages if "newest 50 rows" in m and "checkpoint=" in m]
    assert len(caplog.messages) == 1  # said once, not every round
    assert h[-1]["round"] == 1000 and h[950]["round"] == 951 and [r["round"] for r in h[998:]] == [999, 1000]
    assert h.column("round") == list(range(951, 1001)) and h.last("accuracy") == 10.0
    with pytest.raises(HistoryError) as e:
        h[0]
    assert "round 1" in e.value.message and "window" in e.value.message
    assert "checkpoint=" in e.value.fix and "History.default_window" in e.value.fix
    with pytest.raises(HistoryError):
        h[10:20]
    with pytest.raises(IndexError):
        h[1000]
    with pytest.raises(Exception, match="at least one row"):
        History(window=0)


def test_the_default_window_keeps_a_typical_run_whole(monkeypatch):
    assert History.default_window == 10_000
    monkeypatch.setattr(History, "default_window", 3)
    h = History()
    for r in range(1, 6):
        h.append(_row(r))
    assert h.window == 3 and len(h.recent) == 3




def test_with_a_run_directory_older_rows_are_read_back_and_only_saved_rows_leave_memory():
    rd = RunDirectory.create(zarr.storage.MemoryStore(), meta={}, blobs={})
    h = History(window=20, store=rd)
    reference = []
    for r in range(1, 301):
        row = {**_row(r), "arrivals": [r, r + 1]} if r % 3 == 0 else _row(r)
        h.append(row)
        reference.append(row)
        if r % 25 == 0:  # a snapshot every 25 rounds: it carries the rows the directory does not hold yet
            first = rd.rows_written
            rd.write(Snapshot(r, 300, np.zeros(2, np.float32), {}, h[first:], first_row=first))
        assert len(h.recent) <= 20 + 25  # the window, and the rows not saved yet
    assert len(h) == 300 and h.first_kept == 0 and len(h.recent) <= 45
    assert h.rows == reference  # every row, numbers and lists, read back in order
    assert h[0] == reference[0] and h[2]["arrivals"] == [3, 4] and h[10:13] == reference[10:13]
    assert h.column("accuracy") == [r / 100 for r in range(10, 301, 10)]
    assert h.last("accuracy") == 3.0 and h.time_to(0.5, clock="round") == 50
    assert h.keys()[:3] == ["round", "loss", "arrivals"]
    assert "  300" in h.table()


def test_a_resumed_history_starts_from_the_snapshots_newest_rows():
    rd = RunDirectory.create(zarr.storage.MemoryStore(), meta={}, blobs={})
    rows = [_row(r) for r in range(1, 41)]
    rd.write(Snapshot(40, 50, np.zeros(2, np.float32), {}, rows))
    snap, _ = rd.latest(rows=5)
    assert snap.first_row == 35 and [r["round"] for r in snap.rows] == [36, 37, 38, 39, 40]
    h = History(snap.rows, first=snap.first_row, store=rd)
    assert len(h) == 40 and h.rows == rows
    assert rd.read(40).rows == rows  # all of them, by default
