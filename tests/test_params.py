"""Unit tests for flgraph.params: the flat buffer layout, packing, dtypes, views and pickling."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from flgraph.errors import ConfigError
from flgraph.params import Entry, Params, ParamSpec, all_finite


def _mixed_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "count": np.array(123456, dtype=np.int64),  # 0-d, like BatchNorm's num_batches_tracked
        "half": rng.standard_normal((2, 2)).astype(np.float16),
        "ids": np.array([-5, 0, 2**24], dtype=np.int64),  # the largest float32-exact integer
        "mask": np.array([True, False, True]),
        "small": np.array([0, 255, 7], dtype=np.uint8),
    }


# --------------------------------------------------------------------------- layout


def test_layout_offsets_sizes_and_names():
    spec = ParamSpec.from_shapes([("a", (2, 3), "float32"), ("b", (), "int64"), ("c", (4,), "float16"),
                                  ("d", (0,), "float32"), ("e", (1, 1, 2), "float32")])
    assert spec.names == ["a", "b", "c", "d", "e"]
    assert [(e.offset, e.size) for e in spec.entries] == [(0, 6), (6, 1), (7, 4), (11, 0), (11, 2)]
    assert [e.shape for e in spec.entries] == [(2, 3), (), (4,), (0,), (1, 1, 2)]
    assert [e.dtype for e in spec.entries] == ["float32", "int64", "float16", "float32", "float32"]
    assert spec.size == 13
    assert spec.carrier == "float32"
    assert spec.nbytes == 13 * 4
    assert spec.entry("c") == Entry("c", (4,), "float16", 7, 4)
    assert spec.empty().shape == (13,) and spec.empty().dtype == np.float32


def test_from_arrays_keeps_mapping_order():
    arrays = {"z": np.zeros(2, np.float32), "a": np.zeros((1, 3), np.float32)}
    spec = ParamSpec.from_arrays(arrays)
    assert spec.names == ["z", "a"]
    assert spec.entry("a").offset == 2


def test_spec_of_nothing():
    spec = ParamSpec.from_shapes([])
    assert spec.size == 0 and spec.nbytes == 0 and spec.names == []
    p = Params.pack(spec, {})
    assert p.flat.shape == (0,) and p.to_arrays() == {}


@pytest.mark.parametrize(
    ("dtypes", "carrier"),
    [
        (["float32"], "float32"),
        (["float32", "int64"], "float32"),
        (["float16", "float32", "bool"], "float32"),
        (["int64"], "float32"),
        (["float16"], "float32"),
        (["float32", "float64"], "float64"),
        (["int64", "float64", "float16"], "float64"),
        (["float64"], "float64"),
    ],
)
def test_carrier_dtype(dtypes, carrier):
    spec = ParamSpec.from_shapes([(f"t{i}", (2,), d) for i, d in enumerate(dtypes)])
    assert spec.carrier == carrier
    assert spec.empty().dtype == np.dtype(carrier)
    assert spec.nbytes == spec.size * np.dtype(carrier).itemsize


def test_describe():
    spec = ParamSpec.from_shapes([("w", (1000, 199), "float32"), ("b", (210,), "float32")])
    assert spec.describe() == "2 tensors, 199,210 values, float32, 797 KB"
    assert repr(Params(spec, spec.empty())) == "Params(2 tensors, 199,210 values, float32, 797 KB)"


def test_entry_unknown_name_lists_known_names():
    spec = ParamSpec.from_arrays({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)})
    with pytest.raises(KeyError, match=r"no tensor named 'x'.*\['w', 'b'\]"):
        spec.entry("x")
    with pytest.raises(KeyError, match="'x'"):
        Params(spec, spec.empty())["x"]


def test_duplicate_name_refused():
    with pytest.raises(ConfigError, match="duplicate tensor name 'w'") as ei:
        ParamSpec.from_shapes([("w", (2,), "float32"), ("w", (3,), "float32")])
    assert ei.value.fix


@pytest.mark.parametrize("dtype", ["complex64", "U3", "object", "datetime64[s]"])
def test_uncarriable_dtype_refused(dtype):
    with pytest.raises(ConfigError, match="cannot carry") as ei:
        ParamSpec.from_shapes([("z", (2,), dtype)])
    assert "'z'" in ei.value.message and ei.value.fix


# --------------------------------------------------------------------------- pack / to_arrays


def test_pack_to_arrays_round_trip_preserves_values_and_dtypes():
    arrays = _mixed_arrays()
    spec = ParamSpec.from_arrays(arrays)
    assert spec.carrier == "float32"
    p = Params.pack(spec, arrays)
    assert p.flat.dtype == np.float32 and p.flat.shape == (spec.size,)
    back = p.to_arrays()
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype, name
        assert back[name].shape == a.shape, name
        assert np.array_equal(back[name], a), name
    assert int(back["ids"][2]) == 2**24


def test_round_trip_with_float64_carrier():
    arrays = _mixed_arrays()
    arrays["ids"] = np.array([-(2**53), 3, 2**53], dtype=np.int64)  # exact in a float64 carrier
    arrays["precise"] = np.array([np.pi, 1 / 3, 1e-300], dtype=np.float64)
    spec = ParamSpec.from_arrays(arrays)
    assert spec.carrier == "float64"
    p = Params.pack(spec, arrays)
    assert p.flat.dtype == np.float64
    back = p.to_arrays()
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and np.array_equal(back[name], a), name
    # float32 entries travel through float64 exactly (bit for bit)
    assert back["w"].tobytes() == arrays["w"].tobytes()


def test_pack_accepts_array_likes_and_casts_to_carrier():
    spec = ParamSpec.from_shapes([("w", (2, 2), "float32"), ("n", (), "int64")])
    p = Params.pack(spec, {"w": [[1, 2], [3, 4]], "n": 5})
    assert p.flat.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert p.to_arrays()["n"].dtype == np.int64


def test_items_are_carrier_dtype_views():
    arrays = _mixed_arrays()
    p = Params.pack(ParamSpec.from_arrays(arrays), arrays)
    items = list(p.items())
    assert [n for n, _ in items] == list(arrays)
    for name, v in items:
        assert v.dtype == np.float32
        assert v.shape == arrays[name].shape
        assert np.shares_memory(v, p.flat)


def test_to_arrays_returns_copies():
    arrays = _mixed_arrays()
    p = Params.pack(ParamSpec.from_arrays(arrays), arrays)
    before = p.flat.copy()
    out = p.to_arrays()
    out["w"][...] = 99.0
    out["count"][...] = 1
    assert np.array_equal(p.flat, before)
    assert not any(np.shares_memory(a, p.flat) for a in out.values())


def test_pack_copies_its_inputs():
    w = np.ones(3, np.float32)
    p = Params.pack(ParamSpec.from_arrays({"w": w}), {"w": w})
    w[0] = 5.0
    assert p.flat.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("value", [2**24 + 1, -(2**24) - 1, 2**31])
def test_float32_carrier_refuses_inexact_integers(value):
    spec = ParamSpec.from_shapes([("w", (2,), "float32"), ("count", (2,), "int64")])
    with pytest.raises(ConfigError, match=r"integer tensor 'count' holds .*more than float32 carries exactly") as ei:
        Params.pack(spec, {"w": np.zeros(2, np.float32), "count": np.array([0, value], np.int64)})
    assert str(abs(value)) in ei.value.message
    assert "persistent=False" in ei.value.fix


def test_float32_carrier_accepts_the_exact_limit():
    spec = ParamSpec.from_shapes([("count", (2,), "int64")])
    p = Params.pack(spec, {"count": np.array([2**24, -(2**24)], np.int64)})
    assert p.to_arrays()["count"].tolist() == [2**24, -(2**24)]


def test_float64_carrier_carries_large_integers_and_refuses_beyond_2_53():
    spec = ParamSpec.from_shapes([("w", (1,), "float64"), ("count", (), "int64")])
    p = Params.pack(spec, {"w": np.zeros(1), "count": np.int64(2**24 + 1)})
    assert int(p.to_arrays()["count"]) == 2**24 + 1
    with pytest.raises(ConfigError, match="more than float64 carries exactly"):
        Params.pack(spec, {"w": np.zeros(1), "count": np.int64(2**53 + 1)})


def test_unsigned_integers_checked_too():
    spec = ParamSpec.from_shapes([("u", (1,), "uint32")])
    assert Params.pack(spec, {"u": np.array([2**24], np.uint32)}).to_arrays()["u"].tolist() == [2**24]
    with pytest.raises(ConfigError, match="'u'"):
        Params.pack(spec, {"u": np.array([2**32 - 1], np.uint32)})


def test_empty_integer_tensor_is_fine():
    spec = ParamSpec.from_shapes([("e", (0,), "int64"), ("w", (1,), "float32")])
    p = Params.pack(spec, {"e": np.zeros(0, np.int64), "w": np.ones(1, np.float32)})
    assert p.to_arrays()["e"].shape == (0,)


def test_pack_shape_mismatch_names_tensor_and_shapes():
    spec = ParamSpec.from_shapes([("w", (2, 3), "float32")])
    with pytest.raises(ConfigError, match=r"tensor 'w' has shape \(3, 2\), the spec says \(2, 3\)"):
        Params.pack(spec, {"w": np.zeros((3, 2), np.float32)})
    with pytest.raises(ConfigError, match=r"shape \(6,\)"):
        Params.pack(spec, {"w": np.zeros(6, np.float32)})


def test_pack_missing_tensor():
    spec = ParamSpec.from_shapes([("w", (2,), "float32"), ("b", (1,), "float32"), ("c", (1,), "float32")])
    with pytest.raises(ConfigError, match=r"\['b', 'c'\] are missing") as ei:
        Params.pack(spec, {"w": np.zeros(2, np.float32)})
    assert ei.value.fix


def test_params_constructor_checks_the_buffer():
    spec = ParamSpec.from_shapes([("w", (2, 2), "float32")])
    with pytest.raises(ConfigError, match="3 values does not fit a spec of 4"):
        Params(spec, np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="does not fit a spec of 4"):
        Params(spec, np.zeros((2, 2), np.float32))  # right size, wrong rank
    with pytest.raises(ConfigError, match="dtype float64 does not fit a float32 spec"):
        Params(spec, np.zeros(4, np.float64))


# --------------------------------------------------------------------------- views


def test_getitem_is_a_zero_copy_view():
    spec = ParamSpec.from_shapes([("w", (2, 3), "float32"), ("b", (3,), "float32")])
    p = Params(spec, np.zeros(9, np.float32))
    w = p["w"]
    assert w.shape == (2, 3) and np.shares_memory(w, p.flat)
    w[1, 2] = 7.0
    p["b"][:] = [1.0, 2.0, 3.0]
    assert p.flat.tolist() == [0, 0, 0, 0, 0, 7, 1, 2, 3]
    p.flat[0] = -1.0
    assert p["w"][0, 0] == -1.0


def test_params_wraps_the_given_buffer_without_copy():
    spec = ParamSpec.from_shapes([("w", (4,), "float32")])
    flat = np.arange(4, dtype=np.float32)
    p = Params(spec, flat)
    assert p.flat is flat
    assert p.nbytes == 16


def test_copy_is_independent():
    spec = ParamSpec.from_shapes([("w", (4,), "float32")])
    p = Params(spec, np.arange(4, dtype=np.float32))
    q = p.copy()
    q["w"][0] = 100.0
    assert p.flat[0] == 0.0 and q.flat[0] == 100.0
    assert q.spec == p.spec


# --------------------------------------------------------------------------- pickling


def test_spec_is_hashable_and_comparable():
    a = ParamSpec.from_arrays(_mixed_arrays())
    b = ParamSpec.from_arrays(_mixed_arrays())
    assert a == b and hash(a) == hash(b)
    assert a != ParamSpec.from_shapes([("w", (3, 4), "float32")])


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_params_pickle_round_trip(protocol):
    arrays = _mixed_arrays()
    p = Params.pack(ParamSpec.from_arrays(arrays), arrays)
    q = pickle.loads(pickle.dumps(p, protocol=protocol))
    assert isinstance(q, Params)
    assert q.spec == p.spec
    assert q.flat.dtype == p.flat.dtype
    assert q.flat.tobytes() == p.flat.tobytes()
    for name, a in q.to_arrays().items():
        assert a.dtype == arrays[name].dtype and np.array_equal(a, arrays[name])
    # the unpickled buffer is its own, and views still write through
    q["w"][0, 0] = 42.0
    assert q.flat[0] == 42.0 and p.flat[0] != 42.0


def test_params_deepcopy_and_float64_pickle():
    spec = ParamSpec.from_shapes([("x", (3,), "float64")])
    p = Params(spec, np.array([1 / 3, np.pi, -0.0]))
    q = pickle.loads(pickle.dumps(p))
    assert q.flat.dtype == np.float64 and q.flat.tobytes() == p.flat.tobytes()
    r = copy.deepcopy(p)
    assert r.flat is not p.flat and r.flat.tobytes() == p.flat.tobytes()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_all_finite_agrees_with_isfinite(dtype):
    """The one-pass dot-product check gives isfinite().all()'s answer, including finite values whose squares
    overflow (they must pass) and a single NaN or inf anywhere (they must not)."""
    rng = np.random.default_rng(0)
    big = float(np.finfo(dtype).max) / 2
    cases = [np.zeros(0, dtype)]
    for n in (1000, 20_000):  # small arrays take the mask, large ones the dot product
        cases += [rng.standard_normal(n).astype(dtype), np.full(n, big, dtype)]
        for bad in (np.nan, np.inf, -np.inf):
            for pos in (0, 517, n - 1):
                a = rng.standard_normal(n).astype(dtype)
                a[pos] = bad
                cases.append(a)
    for a in cases:
        assert all_finite(a) == bool(np.isfinite(a).all()), (a.dtype, a[:3])
    assert all_finite(np.array([1, 2, 3])) and all_finite(np.zeros((4, 5), np.float32))
    assert not all_finite(np.array([[1.0, np.nan]], np.float32))  # any shape
