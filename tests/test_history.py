"""Unit tests for flgraph.history.History."""

from __future__ import annotations

import pytest

from flgraph.history import History


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
