"""Readers of the formats FL data comes in: LEAF JSON, TFF h5, FedScale CSV, Hugging Face and torch datasets.

Every file is written here in the published layout; expected values come from what the test wrote.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from flgraph.data import FederatedDataset, by_key, dirichlet, iid
from flgraph.data.fedscale_csv import FedScaleDataset
from flgraph.data.leaf import LEAF_LETTERS, LeafDataset, shakespeare_chars
from flgraph.errors import DataError

RNG = np.random.default_rng(0)


# -- LEAF -----------------------------------------------------------------------------------------------
def _femnist_users(names, sizes, dim=4):
    """LEAF FEMNIST-style user data: x lists of floats, y ints; returned also as arrays for checking."""
    data = {}
    for name, n in zip(names, sizes):
        x = RNG.random((n, dim)).round(3)
        y = RNG.integers(0, 62, n)
        data[name] = (x, y)
    return data


def _write_leaf(path, users):
    doc = {"users": list(users), "num_samples": [len(y) for _, y in users.values()],
           "user_data": {u: {"x": x.tolist(), "y": y.tolist()} for u, (x, y) in users.items()}}
    path.write_text(json.dumps(doc))


@pytest.fixture
def leaf(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    a = _femnist_users(["f0003_12", "f0001_40"], [5, 3])
    b = _femnist_users(["f0000_07", "f0002_33"], [2, 4])
    _write_leaf(train / "all_data_0_niid_0_keep_0_train_9.json", a)
    _write_leaf(train / "all_data_1_niid_0_keep_0_train_9.json", b)
    ta = _femnist_users(["f0003_12", "f0001_40"], [2, 1])
    tb = _femnist_users(["f0000_07", "f0002_33"], [1, 2])
    _write_leaf(test / "all_data_0_niid_0_keep_0_test_9.json", ta)
    _write_leaf(test / "all_data_1_niid_0_keep_0_test_9.json", tb)
    return tmp_path, {**a, **b}, {**ta, **tb}


def test_leaf_users_become_clients_in_name_order_with_their_samples(leaf):
    root, train, test = leaf
    ds = LeafDataset(root / "train", root / "test")
    assert ds.keys.tolist() == ["f0000_07", "f0001_40", "f0002_33", "f0003_12"]
    assert [ds.num_samples(k) for k in ds.client_ids] == [2, 3, 4, 5]
    for k, user in enumerate(ds.keys.tolist()):
        got = ds.load(k)
        np.testing.assert_array_equal(got.x, train[user][0].astype(np.float32))
        np.testing.assert_array_equal(got.y, train[user][1])
        assert got.x.dtype == np.float32 and got.y.dtype == np.int64
        np.testing.assert_array_equal(ds.load_test(k).y, test[user][1])
    # the central test set: every test user's samples in user order
    order = sorted(test)
    np.testing.assert_array_equal(ds.test.y, np.concatenate([test[u][1] for u in order]))
    assert ds.test.num_samples == 6
    assert ds.client_of("f0002_33") == 2


def test_leaf_loads_read_only_the_file_that_holds_the_user(leaf):
    root, train, _ = leaf
    ds = LeafDataset(root / "train")
    other = root / "train" / "all_data_1_niid_0_keep_0_train_9.json"
    other.write_text("{ not json")  # broken after indexing: only its own users may notice
    k = ds.client_of("f0003_12")  # lives in all_data_0
    np.testing.assert_array_equal(ds.load(k).y, train["f0003_12"][1])
    with pytest.raises(DataError, match=r"all_data_1.*not valid JSON \(line 1, column 3"):
        ds.load(ds.client_of("f0000_07"))
    # a pickled copy (what a worker gets) carries the index, not parsed data
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._cached is None
    np.testing.assert_array_equal(copy.load(ds.client_of("f0001_40")).y, train["f0001_40"][1])


def test_leaf_to_zarr_is_one_call_and_keeps_clients_and_test(leaf, tmp_path):
    root, _, _ = leaf
    ds = LeafDataset(root / "train", root / "test")
    z = ds.to_zarr(tmp_path / "leaf.zarr")
    assert z.num_clients == 4
    for k in ds.client_ids.tolist():
        np.testing.assert_array_equal(z.load(k).x, ds.load(k).x)
        np.testing.assert_array_equal(z.load(k).y, ds.load(k).y)
    np.testing.assert_array_equal(z.test.y, ds.test.y)


def test_leaf_shakespeare_and_sent140_text_need_a_transform(tmp_path):
    lines = {"THE_TEMPEST_MIRANDA": (["abc", "b c"], ["d", "!"]), "HAMLET_HAMLET": (["to "], ["b"])}
    doc = {"users": list(lines), "num_samples": [2, 1], "hierarchies": ["x", "y"],
           "user_data": {u: {"x": x, "y": y} for u, (x, y) in lines.items()}}
    (tmp_path / "shakespeare.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"shakespeare.json: user 'THE_TEMPEST_MIRANDA': x holds text") as e:
        LeafDataset(tmp_path / "shakespeare.json").load(0)
    assert "shakespeare_chars" in str(e.value)
    ds = LeafDataset(tmp_path / "shakespeare.json", transform=shakespeare_chars)
    got = ds.load(ds.client_of("THE_TEMPEST_MIRANDA"))
    assert got.x.tolist() == [[LEAF_LETTERS.index(c) for c in s] for s in ["abc", "b c"]]
    assert got.y.tolist() == [LEAF_LETTERS.index("d"), LEAF_LETTERS.index("!")]
    # Sent140: x is [tweet id, date, query, user, text]; a transform turns text into features
    sent = {"users": ["alice"], "num_samples": [2], "user_data": {"alice": {
        "x": [["1", "Mon Apr 06", "NO_QUERY", "alice", "good day"], ["2", "Mon Apr 06", "NO_QUERY", "alice", "bad"]],
        "y": [1, 0]}}}
    (tmp_path / "sent.json").write_text(json.dumps(sent))

    def words(x, y):
        return np.array([[len(row[4].split())] for row in x], np.float32), np.array(y, np.int64)

    got = LeafDataset(tmp_path / "sent.json", transform=words).load(0)
    assert got.x.tolist() == [[2.0], [1.0]] and got.y.tolist() == [1, 0]


@pytest.mark.parametrize(("doc", "message"), [
    ({"users": ["a"], "num_samples": [1]}, r"bad.json: no user_data \(keys present: \['num_samples', 'users'\]\)"),
    ({"users": ["a", "b"], "num_samples": [1], "user_data": {}}, r"bad.json: users and num_samples .* 2 users and 1"),
    ({"users": ["a"], "num_samples": [1], "user_data": {}}, r"bad.json: user 'a' has no x and y"),
    ({"users": ["a"], "num_samples": [3], "user_data": {"a": {"x": [[1]], "y": [1]}}},
     r"bad.json: user 'a' has 1 x and 1 y but num_samples says 3"),
    ([1, 2], r"bad.json: the top level is a list"),
])
def test_leaf_malformed_files_say_what_and_where(tmp_path, doc, message):
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message):
        LeafDataset(tmp_path)


def test_leaf_a_user_in_two_files_is_refused(tmp_path):
    users = _femnist_users(["u1"], [2])
    _write_leaf(tmp_path / "a.json", users)
    _write_leaf(tmp_path / "b.json", users)
    with pytest.raises(DataError, match=r"user 'u1' is in both .*a.json and .*b.json"):
        LeafDataset(tmp_path)
    with pytest.raises(DataError, match="has no test split"):
        LeafDataset(tmp_path / "a.json").load_test(0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.json file in .*empty"):
        LeafDataset(tmp_path / "empty")
