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
    _write_leaf(other, {"f0002_33": (np.zeros((1, 4)), np.zeros(1, np.int64))})  # rewritten without f0000_07
    with pytest.raises(DataError, match=r"all_data_1.*user 'f0000_07' is not in it any more"):
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


# -- TFF ClientData h5 ----------------------------------------------------------------------------------
def _write_tff(path, clients):
    import h5py

    with h5py.File(path, "w") as f:
        for name, (pixels, label) in clients.items():
            f[f"examples/{name}/pixels"] = pixels
            f[f"examples/{name}/label"] = label


def _emnist_clients(names, sizes):
    return {n: (RNG.random((s, 28, 28), dtype=np.float32), RNG.integers(0, 10, s).astype(np.int32))
            for n, s in zip(names, sizes)}


def test_tff_h5_clients_features_by_name_and_test_file(tmp_path):
    from flgraph.data.tff_h5 import TffH5Dataset

    train = _emnist_clients(["f0102_33", "f0001_01", "f0050_12"], [4, 2, 3])
    test = _emnist_clients(["f0102_33", "f0001_01", "f0050_12"], [1, 2, 1])
    _write_tff(tmp_path / "emnist_train.h5", train)
    _write_tff(tmp_path / "emnist_test.h5", test)
    ds = TffH5Dataset(tmp_path / "emnist_train.h5", x="pixels", y="label", test=tmp_path / "emnist_test.h5")
    assert ds.keys.tolist() == ["f0001_01", "f0050_12", "f0102_33"]
    assert [ds.num_samples(k) for k in ds.client_ids] == [2, 3, 4]
    for k, name in enumerate(ds.keys.tolist()):
        np.testing.assert_array_equal(ds.load(k).x, train[name][0])
        np.testing.assert_array_equal(ds.load(k).y, train[name][1])
        np.testing.assert_array_equal(ds.load_test(k).y, test[name][1])
    np.testing.assert_array_equal(ds.test.y, np.concatenate([test[n][1] for n in sorted(test)]))
    z = ds.to_zarr(tmp_path / "emnist.zarr")
    np.testing.assert_array_equal(z.load(2).x, train["f0102_33"][0])
    copy = pickle.loads(pickle.dumps(ds))  # open h5 handles stay behind; the copy opens its own
    assert copy._files == {}
    np.testing.assert_array_equal(copy.load(0).y, train["f0001_01"][1])


def test_tff_h5_load_reads_only_its_client(tmp_path, monkeypatch):
    import h5py

    from flgraph.data.tff_h5 import TffH5Dataset

    _write_tff(tmp_path / "t.h5", _emnist_clients(["a", "b", "c"], [2, 2, 2]))
    ds = TffH5Dataset(tmp_path / "t.h5", x="pixels", y="label")
    read = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        read.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    ds.load(ds.client_of("b"))
    assert sorted(read) == ["/examples/b/label", "/examples/b/pixels"]


def test_tff_h5_malformed_files_say_what_and_where(tmp_path):
    import h5py

    from flgraph.data.tff_h5 import TffH5Dataset

    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["pixels"] = np.zeros(3)
    with pytest.raises(DataError, match=r"flat.h5: no 'examples' group \(top level: \['pixels'\]\)"):
        TffH5Dataset(tmp_path / "flat.h5", x="pixels", y="label")
    _write_tff(tmp_path / "t.h5", _emnist_clients(["a"], [2]))
    with pytest.raises(DataError, match=r"t.h5: client 'a' has no feature 'image' \(it has \['label', 'pixels'\]\)"):
        TffH5Dataset(tmp_path / "t.h5", x="image", y="label")
    with h5py.File(tmp_path / "uneven.h5", "w") as f:
        f["examples/a/pixels"] = np.zeros((3, 2))
        f["examples/a/label"] = np.zeros(2)
    with pytest.raises(DataError, match=r"uneven.h5: client 'a' has 3 'pixels' but 2 'label'"):
        TffH5Dataset(tmp_path / "uneven.h5", x="pixels", y="label")
    (tmp_path / "not.h5").write_text("hello")
    with pytest.raises(DataError, match=r"not.h5: not an h5 file"):
        TffH5Dataset(tmp_path / "not.h5", x="pixels", y="label")
    with h5py.File(tmp_path / "shakespeare.h5", "w") as f:
        f["examples/THE_TEMPEST_MIRANDA/snippets"] = np.array([b"To be", b"or not"])
        f["examples/THE_TEMPEST_MIRANDA/label"] = np.array([0, 1])
    with pytest.raises(DataError, match=r"client 'THE_TEMPEST_MIRANDA': feature 'snippets' holds text"):
        TffH5Dataset(tmp_path / "shakespeare.h5", x="snippets", y="label").load(0)


# -- FedScale client-partition CSV ----------------------------------------------------------------------
def _fedscale(tmp_path, rows, csv_name="train.csv"):
    lines = ["client_id,sample_path,label_name,label_id"] + [",".join(map(str, r)) for r in rows]
    (tmp_path / csv_name).write_text("\n".join(lines) + "\n")
    return tmp_path / csv_name


def test_fedscale_csv_over_image_and_npy_files(tmp_path):
    from PIL import Image

    (tmp_path / "data").mkdir()
    images = {}
    rows = []
    for i, (client, label) in enumerate([(12, 1), (3, 0), (12, 0), (12, 1), (3, 1)]):
        img = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "data" / f"img_{i}.png")
        images[i] = img
        rows.append((client, f"data/img_{i}.png", ["cat", "dog"][label], label))
    ds = FedScaleDataset(_fedscale(tmp_path, rows), tmp_path)
    assert ds.keys.tolist() == [3, 12] and ds.label_names == {1: "dog", 0: "cat"}
    assert [ds.num_samples(k) for k in ds.client_ids] == [2, 3]
    got = ds.load(ds.client_of(12))  # CSV order within the client: rows 0, 2, 3
    np.testing.assert_array_equal(got.x, np.stack([images[0], images[2], images[3]]))
    assert got.y.tolist() == [1, 0, 1] and got.x.dtype == np.uint8
    # numpy samples and a test CSV
    for i in range(2):
        np.save(tmp_path / "data" / f"t{i}.npy", np.full(3, i, np.float32))
    ds2 = FedScaleDataset(_fedscale(tmp_path, [("a", "data/t0.npy", "x", 0)]), tmp_path,
                          test=_fedscale(tmp_path, [("z", "data/t1.npy", "x", 0), ("z", "data/t0.npy", "x", 0)],
                                         "test.csv"))
    assert ds2.keys.tolist() == ["a"] and ds2.test.x.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    z = ds.to_zarr(tmp_path / "fedscale.zarr")
    np.testing.assert_array_equal(z.load(1).x, got.x)


def test_fedscale_load_reads_only_its_own_sample_files(tmp_path):
    for i in range(4):
        np.save(tmp_path / f"s{i}.npy", np.array([i]))
    seen = []

    def loader(path):
        seen.append(path.name)
        return np.load(path)

    ds = FedScaleDataset(_fedscale(tmp_path, [(0, "s0.npy", "a", 0), (1, "s1.npy", "a", 0), (0, "s2.npy", "a", 0),
                                              (2, "s3.npy", "a", 0)]), tmp_path, loader=loader)
    (tmp_path / "s3.npy").unlink()  # another client's file: never needed for client 0
    assert ds.load(0).x.ravel().tolist() == [0, 2] and seen == ["s0.npy", "s2.npy"]
    with pytest.raises(DataError, match=r"client 2: sample file .*s3.npy does not exist"):
        ds.load(2)


@pytest.mark.parametrize(("text", "message"), [
    ("client,path,label\n0,a.npy,1\n", r"train.csv: line 1 is \['client', 'path', 'label'\], expected the header"),
    ("client_id,sample_path,label_name,label_id\n0,a.npy,cat\n", r"train.csv, line 2: 3 fields, expected 4"),
    ("client_id,sample_path,label_name,label_id\n0,a.npy,cat,one\n", r"train.csv, line 2: label_id 'one' is not"),
    ("client_id,sample_path,label_name,label_id\n0,a.npy,cat,1\n1,b.npy,dog,1\n",
     r"train.csv, line 3: label_id 1 is named 'dog' here but 'cat' before"),
    ("client_id,sample_path,label_name,label_id\n", r"train.csv: no samples after the header"),
])
def test_fedscale_malformed_csv_says_what_and_where(tmp_path, text, message):
    (tmp_path / "train.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        FedScaleDataset(tmp_path / "train.csv", tmp_path)


def test_fedscale_unknown_files_and_mixed_shapes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x01\x02")
    np.save(tmp_path / "b.npy", np.zeros(2))
    np.save(tmp_path / "c.npy", np.zeros(3))
    ds = FedScaleDataset(_fedscale(tmp_path, [(0, "a.bin", "x", 0), (1, "b.npy", "x", 0), (1, "c.npy", "x", 0)]),
                         tmp_path)
    with pytest.raises(DataError, match=r"client 0: no loader for 'a.bin'") as e:
        ds.load(0)
    assert "loader=" in str(e.value)
    with pytest.raises(DataError, match=r"client 1: .*c.npy gives shape \(3,\) float64 but .*b.npy gives \(2,\)"):
        ds.load(1)
    raw = FedScaleDataset(tmp_path / "train.csv", tmp_path, loader=lambda p: np.frombuffer(p.read_bytes(), np.uint8))
    assert raw.load(0).x.tolist() == [[1, 2]]


# -- Hugging Face datasets --------------------------------------------------------------------------------
def _hf_table(n=60):
    from datasets import Dataset

    features = RNG.random((n, 3)).astype(np.float32)
    labels = RNG.integers(0, 4, n)
    writers = RNG.choice(["w07", "w01", "w33", "w12"], n)
    return Dataset.from_dict({"pixels": features.tolist(), "label": labels.tolist(), "writer": writers.tolist(),
                              "a": features[:, 0].tolist(), "b": features[:, 1].tolist()}), features, labels, writers


def test_hf_dataset_by_key_column_iid_and_dirichlet(tmp_path):
    from flgraph.data.hf import HuggingFaceDataset

    table, features, labels, writers = _hf_table()
    natural = HuggingFaceDataset(table, "writer", x="pixels", y="label")
    assert natural.keys.tolist() == ["w01", "w07", "w12", "w33"]
    for k, w in enumerate(natural.keys.tolist()):
        rows = np.flatnonzero(writers == w)
        got = natural.load(k)
        np.testing.assert_allclose(got.x, features[rows])
        np.testing.assert_array_equal(got.y, labels[rows])
        assert natural.num_samples(k) == len(rows)
    part = iid(len(table), 5, seed=1)
    spread = HuggingFaceDataset(table, part, x=["a", "b"], y="label", test=table.select(range(10)))
    np.testing.assert_allclose(spread.load(3).x, features[part.indices[3]][:, :2])
    np.testing.assert_array_equal(spread.test.y, labels[:10])
    skew = HuggingFaceDataset(table, dirichlet(labels, 3, alpha=0.3, seed=2), x="pixels", y="label")
    assert sum(skew.num_samples(k) for k in skew.client_ids) == 60
    np.testing.assert_array_equal(np.sort(np.concatenate([skew.load(k).y for k in range(3)])), np.sort(labels))
    z = natural.to_zarr(tmp_path / "hf.zarr")
    np.testing.assert_allclose(z.load(2).x, natural.load(2).x)
    with pytest.raises(DataError, match=r"no column 'image' in the dataset \(columns: \['pixels'"):
        HuggingFaceDataset(table, "writer", x="image", y="label")
    with pytest.raises(DataError, match=r"client 0 holds rows outside 0\.\.59"):
        HuggingFaceDataset(table, iid(100, 2, seed=0), x="pixels", y="label")


# -- torch datasets -----------------------------------------------------------------------------------------
class _CountingDataset:
    """A map-style torch dataset that records which rows were read."""

    def __init__(self, n):
        import torch

        self.x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
        self.targets = torch.arange(n) % 3
        self.read = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.read.append(i)
        return self.x[i], self.targets[i]


def test_torch_dataset_reads_only_the_clients_rows(tmp_path):
    from flgraph.data.torch_dataset import TorchDataset, labels_of

    source = _CountingDataset(30)
    labels = labels_of(source)
    assert labels.tolist() == (np.arange(30) % 3).tolist() and source.read == []  # from .targets
    part = dirichlet(labels, 4, alpha=1.0, seed=0)
    ds = TorchDataset(source, part)
    got = ds.load(2)
    assert sorted(source.read) == part.indices[2].tolist()
    np.testing.assert_array_equal(got.x, np.arange(60, dtype=np.float32).reshape(30, 2)[part.indices[2]])
    np.testing.assert_array_equal(got.y, labels[part.indices[2]])
    natural = TorchDataset(source, by_key(np.arange(30) // 10))
    assert natural.keys.tolist() == [0, 1, 2] and natural.num_samples(1) == 10
    z = ds.to_zarr(tmp_path / "torch.zarr")
    np.testing.assert_array_equal(z.load(2).y, got.y)


def test_readers_load_on_dask_workers(client2, tmp_path, leaf):
    """A worker process gets the pickled index and reads its clients itself (no parsed data travels)."""
    root, train, _ = leaf
    ds = LeafDataset(root / "train")
    futures = client2.map(lambda k, d: d.load(k).y, ds.client_ids.tolist(), d=ds)
    for k, y in zip(ds.client_ids.tolist(), client2.gather(futures)):
        np.testing.assert_array_equal(y, train[ds.keys[k]][1])
    assert isinstance(ds, FederatedDataset)
    from flgraph.data.tff_h5 import TffH5Dataset

    clients = _emnist_clients(["a", "b", "c", "d"], [1, 2, 3, 4])
    _write_tff(tmp_path / "w.h5", clients)
    h5 = TffH5Dataset(tmp_path / "w.h5", x="pixels", y="label")
    h5.load(0)  # the driver's open file stays on the driver
    futures = client2.map(lambda k, d: d.load(k).x, h5.client_ids.tolist(), d=h5)
    for k, x in zip(h5.client_ids.tolist(), client2.gather(futures)):
        np.testing.assert_array_equal(x, clients[h5.keys[k]][0])
