"""Tests for flgraph.data: partitioners, dataset kinds, synthetic data and the zarr store."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pytest
import zarr

from flgraph.data import (
    ArrayDataset,
    ClientData,
    FederatedDataset,
    FunctionDataset,
    Partition,
    ZarrDataset,
    by_key,
    dirichlet,
    iid,
    shards,
    synthetic_classification,
)
from flgraph.errors import DataError


def _assert_exact_cover(part: Partition, n: int) -> None:
    """Every sample 0..n-1 is held by exactly one client; indices are int64 and sorted."""
    assert np.array_equal(np.sort(np.concatenate(part.indices)), np.arange(n))
    for ix in part.indices:
        assert ix.dtype == np.int64
        assert np.all(np.diff(ix) > 0)


def _labels(num_classes: int = 10, per_class: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _small_dataset(with_test: bool = True) -> ArrayDataset:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 2, 3)).astype(np.float32)
    y = rng.integers(0, 4, 30).astype(np.int64)
    test = ClientData(rng.standard_normal((7, 2, 3)).astype(np.float32), np.arange(7)) if with_test else None
    # ids 5, 9, 40 (not contiguous), client 9 is empty
    return FederatedDataset.from_arrays(
        x, y, {40: np.arange(10, 30), 5: np.arange(0, 10), 9: np.array([], np.int64)}, test=test
    )


# ---------------------------------------------------------------- partitioners


def test_iid_sizes_cover_and_determinism():
    part = iid(103, 10, seed=4)
    assert len(part) == 10
    assert sorted(set(part.sizes().tolist())) == [10, 11]
    assert int(part.sizes().sum()) == 103
    _assert_exact_cover(part, 103)
    assert part == iid(103, 10, seed=4)
    assert part != iid(103, 10, seed=5)


def test_iid_rejects_bad_arguments():
    with pytest.raises(DataError, match="num_clients"):
        iid(10, 0, seed=0)
    with pytest.raises(DataError, match="cannot give each of 11 clients") as e:
        iid(10, 11, seed=0)
    assert e.value.fix and "fewer clients" in e.value.fix


def test_dirichlet_cover_min_size_and_determinism():
    labels = _labels()
    part = dirichlet(labels, 20, alpha=0.3, seed=1, min_size=5)
    assert len(part) == 20
    _assert_exact_cover(part, len(labels))
    assert part.sizes().min() >= 5
    assert part == dirichlet(labels, 20, alpha=0.3, seed=1, min_size=5)
    assert part != dirichlet(labels, 20, alpha=0.3, seed=2, min_size=5)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels(num_classes=10, per_class=300)

    def mean_top_share(alpha: float) -> float:
        part = dirichlet(labels, 30, alpha=alpha, seed=0, min_size=0)
        tops = [np.bincount(labels[ix], minlength=10).max() / len(ix) for ix in part.indices if len(ix)]
        return float(np.mean(tops))

    shares = [mean_top_share(a) for a in (100.0, 1.0, 0.05)]
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] < 0.3  # near iid: about 1/10 of each class
    assert shares[2] > 0.7  # very skewed: mostly one class


def test_dirichlet_errors_name_the_problem_and_fix():
    labels = _labels(num_classes=10, per_class=10)
    with pytest.raises(DataError, match="alpha must be > 0"):
        dirichlet(labels, 5, alpha=0.0, seed=0)
    with pytest.raises(DataError, match="min_size=2 samples") as e:
        dirichlet(labels, 60, alpha=1.0, seed=0, min_size=2)
    assert "fewer clients" in (e.value.fix or "")
    with pytest.raises(DataError, match="after 3 tries") as e:
        dirichlet(labels, 90, alpha=0.01, seed=0, max_tries=3)
    assert "larger alpha" in (e.value.fix or "") and "min_size=0" in (e.value.fix or "")
    with pytest.raises(DataError, match="integer class labels"):
        dirichlet(labels.astype(float), 5, alpha=1.0, seed=0)


def test_shards_sizes_labels_per_client_and_determinism():
    labels = _labels(num_classes=10, per_class=100)
    part = shards(labels, 50, shards_per_client=2, seed=7)
    assert part.sizes().tolist() == [20] * 50
    _assert_exact_cover(part, len(labels))
    per_client = [len(np.unique(labels[ix])) for ix in part.indices]
    assert max(per_client) <= 2 and min(per_client) >= 1
    assert np.mean(per_client) > 1.5
    assert part == shards(labels, 50, shards_per_client=2, seed=7)
    assert part != shards(labels, 50, shards_per_client=2, seed=8)
    with pytest.raises(DataError, match="cannot fill 600 clients x 2 shards"):
        shards(labels, 600, shards_per_client=2, seed=0)


def test_by_key_one_client_per_key_in_sorted_order():
    keys = np.array([30, 10, 30, 20, 10, 10])
    part = by_key(keys)
    assert part.keys is not None and part.keys.tolist() == [10, 20, 30]
    assert [ix.tolist() for ix in part.indices] == [[1, 4, 5], [3], [0, 2]]
    _assert_exact_cover(part, len(keys))
    ds = FederatedDataset.from_arrays(np.arange(6.0)[:, None], keys, part, client_ids=part.keys)
    assert ds.client_ids.tolist() == [10, 20, 30]
    assert np.all(ds.load(30).y == 30)
    with pytest.raises(DataError, match="non-empty 1-D"):
        by_key(np.array([]))


def test_partition_validates_and_compares():
    with pytest.raises(DataError, match="client 1: sample indices have dtype float64"):
        Partition((np.array([0]), np.array([1.0])))
    with pytest.raises(DataError, match="flatnonzero"):
        Partition((np.array([True, False]),))
    with pytest.raises(DataError, match="one key per client"):
        Partition((np.array([0]),), keys=np.array([1, 2]))
    a = Partition((np.array([0, 1]), np.array([], dtype=np.int64)))
    assert a == Partition((np.array([0, 1]), np.array([])))  # empty float array: fine, nothing to index
    assert a.sizes().tolist() == [2, 0]
    assert a != Partition((np.array([0, 1]), np.array([2])))
    assert a != Partition((np.array([0, 1]), np.array([], np.int64)), keys=np.array([1, 2]))


# ---------------------------------------------------------------- in-memory datasets


def test_from_arrays_round_trip_for_every_partition_form():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10, dtype=np.int64)
    groups = [np.array([0, 3]), np.array([1, 2, 4]), np.array([5, 6, 7, 8, 9])]
    for partition in (groups, Partition(tuple(groups)), dict(enumerate(groups))):
        ds = FederatedDataset.from_arrays(x, y, partition)
        assert isinstance(ds, ArrayDataset)
        assert ds.client_ids.dtype == np.int64 and ds.client_ids.tolist() == [0, 1, 2]
        assert not ds.client_ids.flags.writeable
        for k, ix in enumerate(groups):
            data = ds.load(k)
            assert np.array_equal(data.x, x[ix]) and np.array_equal(data.y, y[ix])
            assert data.num_samples == ds.num_samples(k) == len(ix)
    assert ds.test is None


def test_from_arrays_sorts_given_ids_and_allows_overlap():
    x, y = np.arange(5.0)[:, None], np.arange(5)
    ds = FederatedDataset.from_arrays(x, y, [[0, 1, 2], [2, 3]], client_ids=[70, 3])
    assert ds.client_ids.tolist() == [3, 70]
    assert ds.load(70).y.tolist() == [0, 1, 2]
    assert ds.load(3).y.tolist() == [2, 3]  # sample 2 belongs to both clients


def test_from_arrays_rejects_bad_input():
    x, y = np.zeros((5, 2)), np.zeros(5, np.int64)
    with pytest.raises(DataError, match=r"client 1: sample indices out of range 0..4: \[5, 9\]"):
        FederatedDataset.from_arrays(x, y, [[0], [5, 1, 9]])
    with pytest.raises(DataError, match="out of range") as e:
        FederatedDataset.from_arrays(x, y, [[-1]])
    assert "negative" in (e.value.fix or "")
    with pytest.raises(DataError, match="x has 5 samples but y has 4"):
        FederatedDataset.from_arrays(x, y[:4], [[0]])
    with pytest.raises(DataError, match="client_ids given together with a mapping"):
        FederatedDataset.from_arrays(x, y, {0: [0]}, client_ids=[1])
    with pytest.raises(DataError, match="client_ids repeat"):
        FederatedDataset.from_arrays(x, y, [[0], [1]], client_ids=[4, 4])
    with pytest.raises(DataError, match="2 client_ids given for 3 clients"):
        FederatedDataset.from_arrays(x, y, [[0], [1], [2]], client_ids=[1, 2])
    with pytest.raises(DataError, match="no clients"):
        FederatedDataset.from_arrays(x, y, [])
    with pytest.raises(DataError, match="test set: x has 2 samples but y has 3"):
        FederatedDataset.from_arrays(x, y, [[0]], test=(np.zeros((2, 2)), np.zeros(3)))


def test_unknown_client_id_error_names_the_id_and_the_range():
    ds = FederatedDataset.from_arrays(np.zeros((1000, 1)), np.zeros(1000, np.int64), iid(1000, 1000, seed=0))
    with pytest.raises(DataError) as e:
        ds.load(5000)
    assert "client 5000 is not in this dataset" in e.value.message
    assert "1000 clients, ids 0..999" in e.value.message
    assert e.value.fix is not None and "client_ids" in e.value.fix
    with pytest.raises(DataError, match="client 5000"):
        ds.num_samples(5000)
    with pytest.raises(DataError, match="must be an integer, got str"):
        ds.load("3")  # type: ignore[arg-type]
    sparse = _small_dataset()
    with pytest.raises(
        DataError, match=r"client 6 is not in this dataset \(it holds 3 clients, ids \[5, 9, 40\]\)"
    ):
        sparse.load(6)


def test_check_ids_and_contains():
    ds = FederatedDataset.from_arrays(np.zeros((1000, 1)), np.zeros(1000, np.int64), iid(1000, 1000, seed=0))
    ds.check_ids(np.array([0, 999, 5]))
    ds.check_ids([])
    with pytest.raises(DataError) as e:
        ds.check_ids([7000, 1, 5001, 5000, 5000])
    assert e.value.message == (
        "3 client ids are not in this dataset: [5000, 5001, 7000] (it holds 1000 clients, ids 0..999)"
    )
    with pytest.raises(DataError) as e:
        ds.check_ids(np.arange(2000, 2025))
    assert e.value.message.startswith("25 client ids are not in this dataset: [2000, 2001,")
    assert "2009, ...]" in e.value.message and "2010" not in e.value.message
    with pytest.raises(DataError, match="1 client id is not in this dataset: \\[-1\\]"):
        ds.check_ids([-1])
    with pytest.raises(DataError, match="must be integers"):
        ds.check_ids([0.5])  # type: ignore[list-item]
    assert 999 in ds and np.int64(3) in ds
    assert 1000 not in ds and -1 not in ds and "3" not in ds and True not in ds


def test_from_function_validates_shapes_and_counts():
    def fn(k: int) -> tuple[np.ndarray, np.ndarray]:
        n = 3 if k != 4 else 2
        return np.ones((3, 5), np.float32), np.full(n, k, np.int64)

    ds = FederatedDataset.from_function(fn, 6, num_samples=3)
    assert isinstance(ds, FunctionDataset)
    assert ds.load(2).y.tolist() == [2, 2, 2] and ds.num_samples(4) == 3
    with pytest.raises(DataError, match=r"client 4: x has 3 samples but y has 2"):
        ds.load(4)
    with pytest.raises(DataError, match="client 6 is not in this dataset"):
        ds.load(6)

    def not_a_pair(k: int) -> Any:
        return np.zeros(3)

    bad = FederatedDataset.from_function(not_a_pair, 2)
    with pytest.raises(DataError, match="client 1: expected an \\(x, y\\) pair"):
        bad.load(1)
    counted = FederatedDataset.from_function(
        lambda k: (np.zeros((k, 1)), np.zeros(k)), client_ids=[9, 2, 4], num_samples=lambda k: k
    )
    assert counted.client_ids.tolist() == [2, 4, 9]
    assert counted.num_samples(9) == 9 and counted.load(4).num_samples == 4
    uncounted = FederatedDataset.from_function(lambda k: (np.zeros((k, 1)), np.zeros(k)), 3)
    assert uncounted.num_samples(2) == 2
    with pytest.raises(DataError, match="neither num_clients nor client_ids"):
        FederatedDataset.from_function(fn)
    with pytest.raises(DataError, match="2 client_ids given for 3 clients"):
        FederatedDataset.from_function(fn, 3, client_ids=[0, 1])


def test_empty_clients_load_as_empty_arrays():
    ds = _small_dataset()
    data = ds.load(9)
    assert data.num_samples == 0 and ds.num_samples(9) == 0
    assert data.x.shape == (0, 2, 3) and data.y.shape == (0,)
    fds = FederatedDataset.from_function(lambda k: (np.zeros((0, 4)), np.zeros(0, np.int64)), 2)
    assert fds.load(1).x.shape == (0, 4)


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_determinism_and_scheme():
    ds = synthetic_classification(
        num_clients=50, samples_per_client=32, num_features=20, seed=3, test_samples=0
    )
    assert ds.num_clients == 50 and ds.client_ids.tolist() == list(range(50))
    assert ds.test is None and ds.num_samples(49) == 32
    a = ds.load(7)
    assert a.x.shape == (32, 20) and a.x.dtype == np.float32 and a.y.dtype == np.int64
    assert a.y.min() >= 0 and a.y.max() < 10
    again = synthetic_classification(num_clients=50, samples_per_client=32, num_features=20, seed=3).load(7)
    assert np.array_equal(a.x, again.x) and np.array_equal(a.y, again.y)
    assert not np.array_equal(a.x, ds.load(8).x)
    other_seed = synthetic_classification(num_clients=50, samples_per_client=32, num_features=20, seed=4)
    assert not np.array_equal(a.x, other_seed.load(7).x)
    # the documented scheme, spelled out
    mu = np.random.default_rng(np.random.SeedSequence(3, spawn_key=(0,))).standard_normal((10, 20))
    rng = np.random.default_rng(np.random.SeedSequence(3, spawn_key=(1, 7)))
    p = rng.dirichlet([0.5] * 10)
    y = rng.choice(10, size=32, p=p).astype(np.int64)
    x = (0.3 * mu.astype(np.float32)[y] + rng.standard_normal((32, 20), dtype=np.float32)).astype(np.float32)
    assert np.array_equal(a.y, y) and np.array_equal(a.x, x)


def test_synthetic_test_set_is_balanced_and_label_skew_follows_alpha():
    ds = synthetic_classification(num_clients=200, samples_per_client=50, num_features=4, alpha=0.1, seed=0)
    test = ds.test
    assert test is not None and test.x.shape == (2000, 4) and test.x.dtype == np.float32
    assert np.bincount(test.y, minlength=10).tolist() == [200] * 10
    assert not np.array_equal(test.y[:20], np.sort(test.y[:20]))  # permuted, not grouped by class
    skewed = np.mean([np.bincount(ds.load(k).y, minlength=10).max() / 50 for k in range(40)])
    flat_ds = synthetic_classification(num_clients=200, samples_per_client=50, num_features=4, alpha=100.0)
    flat = np.mean([np.bincount(flat_ds.load(k).y, minlength=10).max() / 50 for k in range(40)])
    assert skewed > 0.6 > 0.3 > flat
    odd = synthetic_classification(num_clients=2, num_features=3, num_classes=3, test_samples=100)
    assert odd.test is not None and np.bincount(odd.test.y).tolist() == [33, 33, 33]


def test_synthetic_pickles_small_without_data():
    ds = synthetic_classification(num_clients=1000, samples_per_client=64, num_features=784)
    _ = ds.test  # generated and cached here: must not travel
    blob = pickle.dumps(ds)
    assert len(blob) < 1_000
    back = pickle.loads(blob)
    assert back._test_cache is None
    assert np.array_equal(back.load(11).x, ds.load(11).x)
    assert back.test is not None and ds.test is not None
    assert np.array_equal(back.test.y, ds.test.y)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(DataError, match="alpha must be > 0"):
        synthetic_classification(alpha=-1.0)
    with pytest.raises(DataError, match="num_clients must be an integer >= 1"):
        synthetic_classification(num_clients=0)
    with pytest.raises(DataError, match="leaves the balanced test set empty"):
        synthetic_classification(num_classes=10, test_samples=5)


# ---------------------------------------------------------------- zarr


@pytest.fixture(scope="module")
def synthetic_zarr(tmp_path_factory: pytest.TempPathFactory) -> tuple[FunctionDataset, ZarrDataset]:
    src = synthetic_classification(num_clients=100, samples_per_client=64, num_features=784, test_samples=500)
    return src, src.to_zarr(tmp_path_factory.mktemp("zarr") / "synthetic.zarr")


def _array(group: zarr.Group, name: str) -> Any:
    node = group[name]
    assert isinstance(node, zarr.Array)
    return node


def _assert_same(a: FederatedDataset, b: FederatedDataset) -> None:
    assert np.array_equal(a.client_ids, b.client_ids) and b.client_ids.dtype == np.int64
    for k in a.client_ids.tolist():
        da, db = a.load(k), b.load(k)
        assert b.num_samples(k) == da.num_samples
        assert da.x.dtype == db.x.dtype and da.y.dtype == db.y.dtype
        assert np.array_equal(da.x, db.x) and np.array_equal(da.y, db.y)
    if a.test is None:
        assert b.test is None
    else:
        assert b.test is not None
        assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.test.y, b.test.y)


def test_to_zarr_round_trip_with_empty_client_and_sparse_ids(tmp_path):
    src = _small_dataset()
    out = src.to_zarr(tmp_path / "small.zarr")
    again = FederatedDataset.open_zarr(str(tmp_path / "small.zarr"))
    for ds in (out, again):
        assert isinstance(ds, ZarrDataset)
        _assert_same(src, ds)
    assert again.load(9).x.shape == (0, 2, 3)
    group = zarr.open_group(str(tmp_path / "small.zarr"), mode="r")
    assert dict(group.attrs) == {"flgraph_format": "federated-dataset", "format_version": 1}
    assert _array(group, "offsets")[:].tolist() == [0, 10, 10, 30]
    assert _array(group, "client_ids")[:].tolist() == [5, 9, 40]
    assert _array(group, "x").chunks[0] == 15  # median of the non-empty client sizes 10 and 20
    no_test = _small_dataset(with_test=False).to_zarr(tmp_path / "no_test.zarr")
    assert no_test.test is None


def test_to_zarr_round_trip_synthetic(synthetic_zarr):
    src, ds = synthetic_zarr
    _assert_same(src, ds)
    group = zarr.open_group(str(ds.store), mode="r")
    assert _array(group, "x").shape == (6400, 784)
    assert _array(group, "x").chunks == (64, 784)  # one chunk per 64-sample client


def test_zarr_dataset_pickles_small_and_loads_in_a_spawned_process(synthetic_zarr):
    src, ds = synthetic_zarr
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        pid, loaded = pool.submit(_load_in_child, blob, [0, 57, 99]).result(timeout=120)
    assert pid != os.getpid()
    for k, (x, y, test_y) in zip([0, 57, 99], loaded):
        want = src.load(k)
        assert np.array_equal(x, want.x) and np.array_equal(y, want.y)
        assert np.array_equal(test_y, src.test.y)


def _load_in_child(
    blob: bytes, ids: list[int]
) -> tuple[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    ds = pickle.loads(blob)
    assert ds._cache is None  # nothing open travelled with it
    return os.getpid(), [(ds.load(k).x, ds.load(k).y, ds.test.y) for k in ids]


def test_open_zarr_rejects_what_is_not_a_dataset(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="is not a zarr group") as e:
        FederatedDataset.open_zarr(plain)
    assert "to_zarr" in (e.value.fix or "")
    with pytest.raises(DataError, match="does not exist"):
        FederatedDataset.open_zarr(tmp_path / "missing.zarr")
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.attrs["owner"] = "someone else"
    with pytest.raises(DataError, match="zarr group but not a flgraph federated dataset"):
        FederatedDataset.open_zarr(tmp_path / "other.zarr")
    zarr.open_array(str(tmp_path / "arr.zarr"), mode="w", shape=(3,), dtype="i8")
    with pytest.raises(DataError, match="holds a zarr array"):
        FederatedDataset.open_zarr(tmp_path / "arr.zarr")


def test_open_zarr_rejects_newer_format_and_missing_arrays(tmp_path):
    path = tmp_path / "d.zarr"
    _small_dataset().to_zarr(path)
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["format_version"] = 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format_version 2; this flgraph reads up to 1") as e:
        FederatedDataset.open_zarr(path)
    assert "upgrade" in (e.value.fix or "")
    path2 = tmp_path / "d2.zarr"
    _small_dataset().to_zarr(path2)
    zarr.open_group(str(path2), mode="a").__delitem__("offsets")
    with pytest.raises(DataError, match="array 'offsets' is missing"):
        FederatedDataset.open_zarr(path2)


def test_to_zarr_refuses_to_clobber(tmp_path):
    src = _small_dataset()
    path = tmp_path / "d.zarr"
    first = src.to_zarr(path)
    with pytest.raises(DataError, match="already holds zarr data") as e:
        src.to_zarr(path)
    assert "overwrite=True" in (e.value.fix or "")
    smaller = FederatedDataset.from_arrays(np.ones((2, 2, 3), np.float32), np.zeros(2, np.int64), [[0, 1]])
    replaced = smaller.to_zarr(path, overwrite=True)
    assert replaced.num_clients == 1 and replaced.test is None
    assert first.num_clients == 3  # already opened in this process: keeps what it read
    with pytest.raises(DataError, match="onto its own store"):
        replaced.to_zarr(path, overwrite=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not a zarr store; flgraph will not delete it"):
        src.to_zarr(plain, overwrite=True)
    assert (plain / "keep.txt").read_text() == "precious"


def test_to_zarr_rejects_inconsistent_clients(tmp_path):
    ragged = FederatedDataset.from_function(lambda k: (np.zeros((2, 3 + k)), np.zeros(2, np.int64)), 3)
    with pytest.raises(DataError, match=r"client 1: x has row shape \(4,\)"):
        ragged.to_zarr(tmp_path / "r.zarr")
    lying = FederatedDataset.from_function(
        lambda k: (np.zeros((2, 3)), np.zeros(2, np.int64)), 2, num_samples=5
    )
    with pytest.raises(DataError, match="client 0: num_samples says 5 but load gave 2"):
        lying.to_zarr(tmp_path / "l.zarr")
