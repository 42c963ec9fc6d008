"""Unit tests of the stage library against direct numpy / torch computations (no Dask cluster)."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flgraph import stages as st
from flgraph import tree
from flgraph.context import ClientSet, ClientWork, RoundContext, Update
from flgraph.data import FederatedDataset
from flgraph.errors import ClientError, ConfigError
from flgraph.models.adapter import ModelAdapter
from flgraph.params import Params, ParamSpec
from flgraph.rng import stage_tag, stream, torch_seed

SPEC32 = ParamSpec.from_shapes([("w", (5, 4), "float32"), ("b", (4,), "float32"), ("n", (), "int64")])
SPEC64 = ParamSpec.from_shapes([("w", (5, 4), "float64"), ("b", (4,), "float32")])


def _deltas(k: int, spec: ParamSpec, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(spec.size).astype(spec.carrier) for _ in range(k)]


def _tree_reduce(reducer: st.WeightedMean, updates: list[Update], spec: ParamSpec, chunking: list[tuple[int, int]]):
    """Reduce like the engine: chunks evaluate their cover nodes, the driver assembles the root."""
    n = len(updates)
    nodes = {}
    for a, b in chunking:
        for lo, hi in tree.cover(n, a, b):
            nodes[(lo, hi)] = tree.evaluate(lo, hi, lambda i: reducer.leaf(updates[i], spec), reducer.combine)
    return reducer.finalize(tree.assemble(n, nodes, reducer.combine), spec)


def _updates(deltas: list[np.ndarray], counts: list[int]) -> list[Update]:
    # copies: a reducer may consume (and scale in place) the delta it is given
    return [Update(i, c, 0, d.copy()) for i, (d, c) in enumerate(zip(deltas, counts))]


# --------------------------------------------------------------------------- WeightedMean / Aggregate


@pytest.mark.parametrize("spec", [SPEC32, SPEC64], ids=["float32", "float64"])
def test_weighted_mean_equals_numpy_average(spec):
    deltas = _deltas(9, spec)
    counts = [1, 50, 3, 17, 100, 2, 64, 8, 33]
    wm = st.WeightedMean()
    got, weight = _tree_reduce(wm, _updates(deltas, counts), spec, [(0, 9)])
    expected = np.average(np.stack(deltas).astype(np.float64), axis=0, weights=counts)
    assert got.dtype == np.dtype(spec.carrier) and got.shape == (spec.size,)
    assert weight == float(sum(counts))
    tol = 1e-5 if spec.carrier == "float32" else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


def test_weighted_mean_uniform_equals_numpy_mean():
    deltas = _deltas(6, SPEC32, seed=1)
    wm = st.WeightedMean("uniform")
    got, weight = _tree_reduce(wm, _updates(deltas, [1, 1000, 5, 7, 2, 9]), SPEC32, [(0, 6)])
    assert weight == 6.0
    np.testing.assert_allclose(got, np.mean(np.stack(deltas).astype(np.float64), axis=0), rtol=1e-5, atol=1e-6)


def test_weighted_mean_of_one_update_is_that_update():
    d = _deltas(1, SPEC32, seed=2)[0]
    got, weight = _tree_reduce(st.WeightedMean(), _updates([d], [7]), SPEC32, [(0, 1)])
    assert weight == 7.0
    np.testing.assert_allclose(got, d, rtol=1e-6)


def test_weighted_mean_is_bit_identical_for_any_chunking():
    n = 23
    deltas = _deltas(n, SPEC32, seed=3)
    counts = list(np.random.default_rng(3).integers(1, 200, n))
    wm = st.WeightedMean()
    ref, _ = _tree_reduce(wm, _updates(deltas, counts), SPEC32, [(0, n)])
    for size in range(1, n + 1):
        got, _ = _tree_reduce(wm, _updates(deltas, counts), SPEC32, tree.chunks(n, 1, size=size))
        assert got.tobytes() == ref.tobytes(), size


def test_weighted_mean_scales_no_leaf_and_adds_equal_weights_in_one_pass():
    """A leaf is the delta itself (scale = its weight); parts of equal scale add without rescaling, so an
    equal-weight round sums the plain deltas and divides once."""
    deltas = _deltas(5, SPEC32, seed=6)
    wm = st.WeightedMean()
    leaf = wm.leaf(Update(0, 64, 0, deltas[0].copy()), SPEC32)
    assert leaf[1] == leaf[2] == 64.0 and leaf[0].tobytes() == deltas[0].tobytes()
    got, weight = _tree_reduce(wm, _updates(deltas, [64] * 5), SPEC32, [(0, 5)])
    summed = tree.evaluate(0, 5, lambda i: deltas[i].copy(), lambda a, b: a + b)  # the tree's own order
    assert weight == 320.0
    assert got.tobytes() == (summed * np.float32(64 / 320)).astype(np.float32).tobytes()


def test_weighted_mean_parts_with_no_weight():
    """Clients with 0 samples weigh nothing wherever they sit in the tree (left or right part)."""
    deltas = _deltas(6, SPEC32, seed=7)
    counts = [0, 5, 0, 0, 3, 0]
    got, weight = _tree_reduce(st.WeightedMean(), _updates(deltas, counts), SPEC32, [(0, 6)])
    assert weight == 8.0
    expected = np.average(np.stack(deltas).astype(np.float64), axis=0, weights=counts)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for size in range(1, 7):  # and the same bits for any chunking
        again, _ = _tree_reduce(st.WeightedMean(), _updates(deltas, counts), SPEC32, tree.chunks(6, 1, size=size))
        assert again.tobytes() == got.tobytes(), size


def test_weighted_mean_combines_read_only_parts_to_the_same_bits():
    """A part that arrives read-only (e.g. deserialized from a message) is combined exactly like a
    writable one, so where a node is combined (worker or driver) cannot change the result."""
    wm = st.WeightedMean()
    deltas = _deltas(2, SPEC32, seed=8)

    def parts(read_only: bool):
        left = wm.leaf(Update(0, 3, 0, deltas[0].copy()), SPEC32)
        right = wm.leaf(Update(1, 11, 0, deltas[1].copy()), SPEC32)
        if read_only:
            right[0].flags.writeable = False
        return left, right

    a = wm.finalize(wm.combine(*parts(False)), SPEC32)[0]
    b = wm.finalize(wm.combine(*parts(True)), SPEC32)[0]
    assert a.tobytes() == b.tobytes()
    zero_left = wm.leaf(Update(0, 0, 0, deltas[0].copy()), SPEC32)
    ro_right = parts(True)[1]
    acc, w, scale = wm.combine(zero_left, ro_right)  # the sum is the right part's: kept writable
    assert acc.flags.writeable and w == 11.0 and scale == 11.0
    np.testing.assert_array_equal(acc, deltas[1])


def test_weighted_mean_decodes_encoded_updates():
    deltas = _deltas(4, SPEC32, seed=4)
    counts = [3, 1, 4, 1]
    plain, _ = _tree_reduce(st.WeightedMean(), _updates(deltas, counts), SPEC32, [(0, 4)])
    encoded = _updates(deltas, counts)
    for u in encoded:
        u.encoded_with(st.LZ4())
        assert u.delta is None
    got, _ = _tree_reduce(st.WeightedMean(), encoded, SPEC32, [(0, 4)])
    assert got.tobytes() == plain.tobytes()


def test_weighted_mean_errors():
    with pytest.raises(ConfigError, match="weight='median'") as ei:
        st.WeightedMean("median")
    assert "'samples' or 'uniform'" in ei.value.fix
    wm = st.WeightedMean()
    acc = wm.leaf(Update(0, 0, 0, np.ones(SPEC32.size, np.float32)), SPEC32)
    with pytest.raises(ConfigError, match="carry no weight"):
        wm.finalize(acc, SPEC32)


def _ctx(params: Params, **kw: Any) -> RoundContext:
    return RoundContext(round=kw.pop("round", 1), seed=kw.pop("seed", 0), params=params,
                        dataset=kw.pop("dataset", None), model_source=kw.pop("model_source", None),
                        last_round=kw.pop("last_round", False), **kw)


@pytest.mark.parametrize("spec", [SPEC32, SPEC64], ids=["float32", "float64"])
@pytest.mark.parametrize("server_lr", [1.0, 0.5, 2.5])
def test_aggregate_apply_steps_by_server_lr(spec, server_lr):
    old_flat, delta = _deltas(2, spec, seed=5)
    ctx = _ctx(Params(spec, old_flat.copy()))
    st.Aggregate(st.WeightedMean(), server_lr=server_lr).apply(ctx, delta, 10.0)
    expected = old_flat + (delta * server_lr).astype(spec.carrier)
    assert ctx.params.flat.dtype == np.dtype(spec.carrier)
    assert ctx.params.flat.tobytes() == expected.tobytes()
    assert ctx.params.spec == spec
    assert ctx.metrics["update_norm"] == pytest.approx(float(np.linalg.norm(delta)))


def test_aggregate_defaults_and_errors():
    agg = st.Aggregate()
    assert isinstance(agg.reducer, st.WeightedMean) and agg.server_lr == 1.0
    assert agg.kind == "reduce" and agg.name == "aggregate"
    for lr in (0.0, -1.0):
        with pytest.raises(ConfigError, match=rf"server_lr={lr}\): must be > 0"):
            st.Aggregate(server_lr=lr)


# --------------------------------------------------------------------------- codecs / Compress


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lz4_is_lossless(dtype):
    spec = ParamSpec.from_shapes([("w", (1000,), np.dtype(dtype).name), ("z", (24,), np.dtype(dtype).name)])
    rng = np.random.default_rng(6)
    delta = rng.standard_normal(spec.size).astype(dtype) * 1e-3
    delta[:5] = [np.inf, -np.inf, -0.0, np.finfo(dtype).tiny / 2, np.finfo(dtype).max]
    delta[1000:] = 0.0
    c = st.LZ4()
    payload = c.encode(delta)
    assert isinstance(payload, bytes) and c.nbytes(payload) == len(payload)
    out = c.decode(payload, spec)
    assert out.dtype == dtype and out.shape == delta.shape
    assert out.tobytes() == delta.tobytes()  # bit for bit, -0.0 and subnormals included
    assert out.flags.writeable and out.flags.c_contiguous  # a reducer may accumulate into it


def test_lz4_nan_payload_bits_survive():
    spec = ParamSpec.from_shapes([("w", (3,), "float32")])
    delta = np.array([0x7FC00001, 0xFFC12345, 0x7F800001], np.uint32).view(np.float32)
    assert st.LZ4().decode(st.LZ4().encode(delta), spec).view(np.uint32).tolist() == delta.view(np.uint32).tolist()


def test_lz4_compresses_redundant_updates_and_levels_agree():
    spec = ParamSpec.from_shapes([("w", (10_000,), "float32")])
    delta = np.round(np.random.default_rng(7).standard_normal(spec.size), 1).astype(np.float32)
    for level in (0, 9):
        c = st.LZ4(level=level)
        payload = c.encode(delta)
        assert c.nbytes(payload) < delta.nbytes
        assert c.decode(payload, spec).tobytes() == delta.tobytes()
    assert repr(st.LZ4(level=3)) == "LZ4(level=3)"


def test_float16_error_is_within_fp16_precision():
    spec = ParamSpec.from_shapes([("w", (20_000,), "float32")])
    rng = np.random.default_rng(8)
    delta = (rng.standard_normal(spec.size) * 10.0 ** rng.integers(-3, 4, spec.size)).astype(np.float32)
    delta[:3] = [65504.0, -65504.0, 65519.0]  # the largest finite halves (65519 rounds down to 65504)
    c = st.Float16()
    payload = c.encode(delta)
    assert payload.dtype == np.float16 and c.nbytes(payload) == 2 * spec.size
    out = c.decode(payload, spec)
    assert out.dtype == np.float32
    err = np.abs(out.astype(np.float64) - delta.astype(np.float64))
    # round to nearest: half an ulp, i.e. 2**-11 relative for normals, 2**-25 absolute in the subnormal range
    bound = np.maximum(np.abs(delta.astype(np.float64)) * 2.0**-11, 2.0**-25)
    assert np.all(err <= bound)
    assert np.any(err > 0), "fp16 is lossy for these values"
    assert out[2] == 65504.0


@pytest.mark.parametrize("big", [65520.0, 1e6, -7e4, np.inf])
def test_float16_overflow_is_refused_on_the_client(big):
    delta = np.array([0.5, big, 1.0], np.float32)
    with pytest.raises(ConfigError, match=r"beyond float16's range") as ei:
        st.Float16().encode(delta)
    assert "lz4" in ei.value.fix


def test_float16_decode_refuses_an_overflowed_payload():
    spec = ParamSpec.from_shapes([("w", (3,), "float32")])
    payload = np.array([0.5, np.inf, 1.0], np.float16)  # e.g. from another implementation
    with pytest.raises(ConfigError, match=r"overflowed float16's range"):
        st.Float16().decode(payload, spec)


def _work(update: Update | None = None, **kw: Any) -> ClientWork:
    spec = kw.pop("spec", SPEC32)
    ds = kw.pop("dataset", None)
    clients = kw.pop("clients", ClientSet(np.array([kw.get("client", 3)])))
    return ClientWork(round=kw.pop("round", 4), client=kw.pop("client", 3), position=kw.pop("position", 0),
                      seed=kw.pop("seed", 0), global_params=kw.pop("global_params", Params(spec, spec.empty())),
                      dataset=ds, clients=clients, model_source=kw.pop("model_source", None), update=update, **kw)


@pytest.mark.parametrize(("codec", "ratio"), [("lz4", None), ("fp16", 0.5)])
def test_compress_stage_records_raw_and_encoded_bytes(codec, ratio):
    delta = np.zeros(SPEC32.size, np.float32)
    delta[::3] = np.arange(len(delta[::3]), dtype=np.float32) / 8
    upd = Update(3, 12, 3, delta.copy(), {"loss": 0.5})
    work = _work(upd)
    stage = st.Compress(codec)
    stage.run(work)
    assert upd.delta is None
    assert upd.codec is stage.codec and upd.codec.name == codec
    assert upd.raw_nbytes == delta.nbytes
    assert upd.upload_nbytes == stage.codec.nbytes(upd.payload)
    if ratio is not None:
        assert upd.upload_nbytes == int(delta.nbytes * ratio)
    else:
        assert upd.upload_nbytes < upd.raw_nbytes
    assert upd.decoded(SPEC32).tobytes() == delta.tobytes()  # exact for both here (multiples of 1/8)
    assert upd.num_samples == 12 and upd.metrics == {"loss": 0.5}
    with pytest.raises(ConfigError, match="already encoded"):
        stage.run(work)


def test_compress_accepts_a_codec_object_and_validates():
    class Negate:
        name = "neg"

        def encode(self, delta):
            return -delta

        def decode(self, payload, spec):
            return -payload

        def nbytes(self, payload):
            return 1

    upd = Update(0, 1, 0, np.arange(SPEC32.size, dtype=np.float32))
    st.Compress(Negate()).run(_work(upd))
    assert upd.upload_nbytes == 1 and upd.raw_nbytes == SPEC32.size * 4
    assert upd.decoded(SPEC32).tolist() == list(range(SPEC32.size))
    with pytest.raises(ConfigError, match="unknown codec 'zip'") as ei:
        st.Compress("zip")
    assert "['bf16', 'fp16', 'int8', 'lz4', 'topk']" in ei.value.fix
    with pytest.raises(ConfigError, match="has no encode"):
        st.Compress(object())  # type: ignore[arg-type]


def test_update_without_codec_counts_its_delta():
    u = Update(1, 2, 0, np.zeros(10, np.float32))
    assert u.upload_nbytes == 40 and u.raw_nbytes == 0
    assert u.decoded(SPEC32) is u.delta


# --------------------------------------------------------------------------- Select / Broadcast


def _dataset50() -> FederatedDataset:
    return FederatedDataset.from_function(lambda k: (np.zeros((4, 3), np.float32), np.zeros(4, np.int64)),
                                          num_clients=50)


def _select_ctx(rnd: int = 3, seed: int = 11) -> RoundContext:
    return _ctx(Params(SPEC32, SPEC32.empty()), round=rnd, seed=seed, dataset=_dataset50())


def test_select_count_and_fraction():
    assert st.Select(clients=3).count(10) == 3
    assert st.Select(clients=7).count(7) == 7
    assert st.Select(fraction=0.25).count(10) == 3  # ceil(2.5)
    assert st.Select(fraction=0.1).count(50) == 5
    assert st.Select(fraction=0.001).count(50) == 1  # at least one
    assert st.Select(fraction=1.0).count(50) == 50



def _set_bias(value: float):
    def train_fn(model, data, ctx):
        with torch.no_grad():
            model[0].bias.fill_(value)
        return 0.0
    return train_fn


def test_local_train_refuses_a_non_finite_update_and_keeps_a_huge_finite_one():
    ds = FederatedDataset.from_function(_client_data, num_clients=2)
    module = _net()
    gp = ModelAdapter.from_module(module).initial_params()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ClientError) as ei:
            _run_local_train(st.LocalTrain(train_fn=_set_bias(bad)), module, ds, gp, rnd=1, client=1, seed=0)
        e = _assert_client_error(ei, client=1, rnd=1)
        assert f"the update holds {module[0].bias.numel()} non-finite values" in e.message
    # 1e30 is finite in float32 but its square is not: the fast check must not refuse it
    work = _run_local_train(st.LocalTrain(train_fn=_set_bias(1e30)), module, ds, gp, rnd=1, client=1, seed=0)
    e0 = ModelAdapter.from_module(module).spec.entry("0.bias")
    assert np.all(work.update.delta[e0.offset : e0.offset + e0.size] > 9e29)


def test_local_train_puts_the_model_back_in_training_mode():
    ds = FederatedDataset.from_function(_client_data, num_clients=3)
    module = _net()
    gp = ModelAdapter.from_module(module).initial_params()
    modes: list[bool] = []

    def train_fn(model, data, ctx):
        modes.append(all(m.training for m in model.modules()))
        model.eval()  # e.g. a train_fn that evaluates at its end
        return 0.0

    stage = st.LocalTrain(train_fn=train_fn)
    for client in (0, 1, 2):
        _run_local_train(stage, module, ds, gp, rnd=1, client=client, seed=0)
    assert modes == [True, True, True]

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of clients= or fraction="),
        ({"clients": 3, "fraction": 0.5}, "exactly one of clients= or fraction="),
        ({"clients": 0}, r"Select\(clients=0\): the count must be >= 1"),
        ({"clients": -2}, "the count must be >= 1"),
        ({"fraction": 0.0}, r"Select\(fraction=0.0\): the fraction must be in \(0, 1\]"),
        ({"fraction": 1.5}, "the fraction must be in"),
        ({"fraction": -0.1}, "the fraction must be in"),
    ],
)
def test_select_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        st.Select(**kwargs)


def test_select_prepare_refuses_more_clients_than_the_dataset_holds():
    ds = _dataset50()
    st.Select(clients=50).prepare(ds, None)
    with pytest.raises(ConfigError, match=r"asks for more clients than the dataset holds \(50\)") as ei:
        st.Select(clients=51).prepare(ds, None)
    assert ei.value.fix == "select at most 50 clients"
    st.Select(clients=51, sampler=lambda r, pop, c, rng: pop[:3]).prepare(ds, None)  # a sampler decides itself


def test_select_run_is_the_seeded_uniform_choice():
    sel = st.Select(clients=7)
    _ = sel >> st.Broadcast()  # composing assigns the stage tag
    assert sel.tag == stage_tag("Select", 0)
    ctx = _select_ctx(rnd=3, seed=11)
    sel.run(ctx)
    ids = ctx.clients.ids
    assert ids.dtype == np.int64 and len(ids) == 7 and len(set(ids.tolist())) == 7
    assert set(ids.tolist()) <= set(range(50))
    expected = stream(11, sel.tag, 3).choice(np.arange(50), size=7, replace=False)
    assert ids.tolist() == expected.tolist()
    assert ctx.metrics["clients_selected"] == 7
    # the same round again: the same clients; other rounds / seeds: other clients
    again = _select_ctx(rnd=3, seed=11)
    sel.run(again)
    assert again.clients.ids.tolist() == ids.tolist()
    others = []
    for rnd, seed in [(4, 11), (3, 12), (5, 11)]:
        c = _select_ctx(rnd=rnd, seed=seed)
        sel.run(c)
        others.append(c.clients.ids.tolist())
    assert all(o != ids.tolist() for o in others)


def test_select_fraction_run():
    sel = st.Select(fraction=0.1)
    ctx = _select_ctx()
    sel.run(ctx)
    assert len(ctx.clients) == 5


def test_select_custom_sampler_gets_round_population_count_and_the_seeded_rng():
    seen: dict[str, Any] = {}

    def sampler(rnd, population, count, rng):
        seen.update(rnd=rnd, population=population.tolist(), count=count, draw=rng.integers(1 << 30))
        return [int(population[-1]), 0, 17]

    sel = st.Select(clients=3, sampler=sampler)
    sel.tag = stage_tag("Select", 0)
    ctx = _select_ctx(rnd=9, seed=5)
    sel.run(ctx)
    assert ctx.clients.ids.tolist() == [49, 0, 17]
    assert seen["rnd"] == 9 and seen["count"] == 3 and seen["population"] == list(range(50))
    assert seen["draw"] == stream(5, sel.tag, 9).integers(1 << 30)


def test_select_sampler_returning_a_client_set_keeps_settings():
    def sampler(rnd, population, count, rng):
        return ClientSet(np.array([2, 4]), {"epochs": np.array([1, 5])})

    ctx = _select_ctx()
    st.Select(clients=2, sampler=sampler).run(ctx)
    assert ctx.clients.ids.tolist() == [2, 4]
    assert ctx.clients.setting("epochs", 1) == 5


def test_select_sampler_returning_an_unknown_id():
    sel = st.Select(clients=3, sampler=lambda rnd, pop, count, rng: [1, 77, 2])
    ctx = _select_ctx(rnd=6)
    with pytest.raises(ClientError) as ei:
        sel.run(ctx)
    e = ei.value
    assert e.client == 77 and e.stage == "Select" and e.round == 6
    assert "77" in e.message and "not in this dataset" in e.message
    assert "dataset.client_ids" in e.fix
    assert str(e).startswith("round 6, client 77, stage Select: ")
    assert ctx.clients is None


def test_select_sampler_returning_nothing_or_duplicates():
    with pytest.raises(ConfigError, match="chose no client"):
        st.Select(clients=1, sampler=lambda *a: []).run(_select_ctx())
    with pytest.raises(ConfigError, match="lists a client twice"):
        st.Select(clients=2, sampler=lambda *a: [3, 3]).run(_select_ctx())


@pytest.mark.parametrize("kw", [{"clients": 7}, {"fraction": 0.2}, {"clients": 5, "weighting": "samples"},
                                {"clients": 6, "over_select": 1.5}])
def test_select_lookahead_chooses_what_the_round_would_and_the_round_uses_it(kw):
    sel = st.Select(**kw)
    sel.tag = stage_tag("Select", 0)
    fresh = _select_ctx(rnd=4, seed=3)
    st_fresh = st.Select(**kw)
    st_fresh.tag = sel.tag
    st_fresh.run(fresh)  # the choice made at the round itself
    ahead = sel.lookahead(4, 3, fresh.dataset)
    assert ahead is not None and ahead.ids.tolist() == fresh.clients.ids.tolist()
    assert ahead.keep_first == fresh.clients.keep_first
    ctx = _select_ctx(rnd=4, seed=3)
    ctx.dataset = fresh.dataset
    sel.run(ctx)
    assert ctx.clients is ahead  # taken, not chosen again
    assert ctx.metrics["clients_selected"] == len(ahead)
    sel.run(ctx)  # used once: the next run chooses again (the same, since the choice is pure)
    assert ctx.clients is not ahead and ctx.clients.ids.tolist() == ahead.ids.tolist()


def test_select_lookahead_is_kept_for_its_round_seed_and_dataset_only():
    sel = st.Select(clients=3)
    sel.tag = stage_tag("Select", 0)
    ctx = _select_ctx(rnd=5, seed=1)
    ahead = sel.lookahead(4, 1, ctx.dataset)  # for round 4: round 5 chooses afresh
    sel.run(ctx)
    assert ctx.clients is not ahead
    other_seed = sel.lookahead(5, 2, ctx.dataset)
    sel.run(ctx)  # the round's seed is 1
    assert ctx.clients is not other_seed
    same = st.Select(clients=3)
    same.tag = sel.tag
    assert ctx.clients.ids.tolist() == same.lookahead(5, 1, ctx.dataset).ids.tolist()
    sel.lookahead(5, 1, _dataset50())  # an equal dataset, but another object: chosen afresh at the round
    sel.run(ctx)
    assert ctx.clients is not None and sel._ahead is None


def test_select_does_not_call_a_sampler_ahead_unless_it_is_declared_pure():
    calls: list[int] = []

    def sampler(rnd, population, count, rng):
        calls.append(rnd)
        return population[rnd : rnd + count]

    ds = _select_ctx().dataset
    assert st.Select(clients=3, sampler=sampler).lookahead(2, 0, ds) is None and calls == []
    assert st.Select(clients=3, available=lambda ids, round, time: ids < 20).lookahead(2, 0, ds) is None
    assert st.pure_sampler(sampler) is sampler  # marked, not wrapped: the same function (and import path)
    pure = st.Select(clients=3, sampler=sampler)
    assert pure.lookahead(2, 0, ds).ids.tolist() == [2, 3, 4] and calls == [2]
    assert "sampler_is_pure" not in repr(pure) and "sampler" in pure.settings()

    class Stateless:  # a class-based sampler: decorating the class marks its instances
        def __call__(self, rnd, population, count, rng):
            return population[:count]

    assert st.Select(clients=3, sampler=Stateless()).lookahead(2, 0, ds) is None
    assert st.Select(clients=3, sampler=st.pure_sampler(Stateless)()).lookahead(2, 0, ds).ids.tolist() == [0, 1, 2]
    # a choice that fails ahead is not kept: the round makes it again and reports the error there
    bad = st.Select(clients=3, sampler=st.pure_sampler(lambda rnd, pop, count, rng: [1, 77, 2]))
    assert bad.lookahead(6, 0, ds) is None
    with pytest.raises(ClientError, match="77"):
        bad.run(_select_ctx(rnd=6))


def test_select_refuses_the_removed_purity_flag_and_says_to_decorate_the_sampler():
    with pytest.raises(ConfigError, match="sampler_is_pure") as info:
        st.Select(clients=3, sampler=lambda *a: [1], sampler_is_pure=True)
    assert "@flgraph.stages.pure_sampler" in info.value.fix
    with pytest.raises(TypeError, match="clientz"):
        st.Select(clients=3, clientz=4)
    with pytest.raises(ConfigError, match="bound method"):
        st.pure_sampler(_dataset50().load)


@st.pure_sampler
def _first_of_round(rnd, population, count, rng):
    return population[rnd : rnd + count]


def test_a_decorated_sampler_is_saved_by_import_path_and_stays_pure_when_rebuilt():
    from flgraph.spec import describe, differences, rebuild

    p = st.Select(clients=3, sampler=_first_of_round) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate()
    spec = describe(p)
    assert spec[0]["settings"]["sampler"] == {"callable": f"{__name__}:_first_of_round"}
    again = rebuild(spec)
    assert again.stages[0].sampler is _first_of_round and st.is_pure_sampler(again.stages[0].sampler)
    assert again.stages[0].lookahead(2, 0, _dataset50()).ids.tolist() == [2, 3, 4]
    # a spec saved with the retired flag still rebuilds, and compares equal to the decorated pipeline
    old = [dict(spec[0], settings={**spec[0]["settings"], "sampler_is_pure": True}), *spec[1:]]
    assert differences(old, spec) == [] and st.is_pure_sampler(rebuild(old).stages[0].sampler)


def test_select_draw_is_the_rounds_choice_and_one_client_per_dispatch():
    ds = _select_ctx().dataset
    sel = st.Select(clients=5)
    sel.tag = stage_tag("Select", 0)
    ctx = _select_ctx(rnd=3, seed=2)
    sel.run(ctx)
    assert sel.draw(ds.client_ids, 5, seed=2, round=3).ids.tolist() == ctx.clients.ids.tolist()
    # a dispatch draws one client from its own stream, as rng.choice(population) would
    one = sel.draw(ds.client_ids, 1, seed=2, dispatch=9).ids.tolist()
    assert one == [int(stream(2, sel.tag, 0, 9).choice(ds.client_ids))]
    with pytest.raises(ConfigError, match=r"exactly one of round= .* or dispatch="):
        sel.draw(ds.client_ids, 1, seed=2)


def test_broadcast_marks_the_round_and_counts_downlink_bytes():
    ctx = _select_ctx()
    st.Select(clients=4).run(ctx)
    st.Broadcast().run(ctx)
    assert ctx.broadcast is True
    assert ctx.metrics["bytes_down"] == SPEC32.nbytes * 4


# --------------------------------------------------------------------------- LocalTrain


def _client_data(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + k)
    n = 9 + k % 4
    return rng.standard_normal((n, 3)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)


def _net(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, 3)]  # dropout: the torch seed matters
    return nn.Sequential(*layers)


def _perturbed_global(ad: ModelAdapter, seed: int) -> Params:
    p = ad.initial_params()
    rng = np.random.default_rng(seed)
    for e in ad.spec.entries:
        if e.dtype == "float32" and "running_var" not in e.name:
            p.flat[e.offset : e.offset + e.size] += rng.standard_normal(e.size).astype(np.float32) * 0.1
    return p


def _run_local_train(stage: st.LocalTrain, module: nn.Module, ds: FederatedDataset, gp: Params, *, rnd: int,
                     client: int, seed: int, clients: ClientSet | None = None, position: int = 0) -> ClientWork:
    _ = st.Select(clients=1) >> st.Broadcast() >> stage  # composing assigns the stage tag
    ad = ModelAdapter.from_module(module)
    work = ClientWork(rnd, client, position, seed, gp, ds, clients or ClientSet(np.array([client])), ad)
    work.tag = stage.tag
    stage.run(work)
    return work


def _hand_train(module: nn.Module, gp: Params, x: np.ndarray, y: np.ndarray, *, seed: int, tag: int, rnd: int,
                client: int, lr: float, batch_size: int, epochs: int | None = None,
                steps: int | None = None) -> tuple[np.ndarray, list[float]]:
    """Plain torch: the same seeded permutations and torch seed, SGD, cross-entropy."""
    model = copy.deepcopy(module)
    arrays = gp.to_arrays()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            t.copy_(torch.from_numpy(arrays[name]))
    model.train()
    rng = stream(seed, tag, rnd, client)
    torch.manual_seed(torch_seed(seed, tag, rnd, client))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(y)
    losses: list[float] = []

    def epoch(limit: int | None) -> None:
        perm = torch.from_numpy(rng.permutation(n))
        for i in range(0, n, batch_size):
            if limit is not None and len(losses) >= limit:
                return
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())

    if steps is None:
        assert epochs is not None
        for _ in range(epochs):
            epoch(None)
    else:
        while len(losses) < steps:
            epoch(steps)
    sd = model.state_dict()
    trained = Params.pack(gp.spec, {k: sd[k].numpy() for k in gp.spec.names})
    return trained.flat - gp.flat, losses


@pytest.mark.parametrize(
    ("kw", "bn"),
    [
        ({"epochs": 2, "batch_size": 4, "lr": 0.1}, False),
        ({"epochs": 1, "batch_size": 32, "lr": 0.3}, False),  # one full batch
        ({"steps": 7, "batch_size": 3, "lr": 0.05}, False),  # steps span epochs, stop mid-epoch
        ({"epochs": 3, "batch_size": 4, "lr": 0.1}, True),  # BatchNorm: running stats and int64 counter
    ],
)
def test_local_train_matches_a_hand_written_torch_loop(kw, bn):
    ds = FederatedDataset.from_function(_client_data, num_clients=8)
    module = _net(seed=1, bn=bn)
    ad = ModelAdapter.from_module(module)
    gp = _perturbed_global(ad, seed=2)
    gp_before = gp.flat.copy()
    stage = st.LocalTrain(**kw)
    rnd, client, seed = 5, 6, 1234
    work = _run_local_train(stage, module, ds, gp, rnd=rnd, client=client, seed=seed)
    assert np.array_equal(gp.flat, gp_before), "the global params are not modified"
    x, y = _client_data(client)
    delta, losses = _hand_train(module, gp, x, y, seed=seed, tag=stage.tag, rnd=rnd, client=client,
                                lr=kw["lr"], batch_size=kw["batch_size"], epochs=kw.get("epochs"),
                                steps=kw.get("steps"))
    upd = work.update
    assert upd is not None
    assert upd.client == client and upd.num_samples == len(y) and upd.base_round == rnd - 1
    assert upd.delta.dtype == np.float32 and upd.delta.shape == (ad.spec.size,)
    assert np.array_equal(upd.delta, delta), "the delta must match the hand-written loop exactly"
    assert np.any(delta != 0)
    assert upd.metrics["steps"] == float(len(losses))
    assert upd.metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    if "steps" in kw:
        assert len(losses) == kw["steps"]
    if bn:
        nbt = ad.spec.entry("1.num_batches_tracked")
        assert upd.delta[nbt.offset] == len(losses)


@pytest.mark.parametrize("kw", [{"epochs": 3, "batch_size": 4}, {"steps": 5, "batch_size": 2, "mu": 0.1},
                                {"epochs": 2, "batch_size": 4, "freeze": ("0",)}])
def test_default_step_is_torch_sgd_bit_for_bit(kw):
    """LocalTrain's default step on cpu skips torch.optim.SGD's machinery: same bits as that optimizer."""
    ds = FederatedDataset.from_function(_client_data, num_clients=8)
    module = _net(seed=3, bn=True)
    gp = _perturbed_global(ModelAdapter.from_module(module), seed=4)
    lean = _run_local_train(st.LocalTrain(lr=0.2, **kw), module, ds, gp, rnd=2, client=5, seed=9)
    torch_opt = st.LocalTrain(lr=0.2, optimizer=st.SGD(0.2), **kw)  # a factory: torch.optim.SGD itself
    full = _run_local_train(torch_opt, module, ds, gp, rnd=2, client=5, seed=9)
    assert lean.update is not None and full.update is not None
    assert np.any(lean.update.delta != 0)
    assert np.array_equal(lean.update.delta, full.update.delta)
    assert lean.update.metrics == full.update.metrics


def test_local_train_seed_changes_the_update():
    ds = FederatedDataset.from_function(_client_data, num_clients=8)
    module = _net(seed=1)
    gp = ModelAdapter.from_module(module).initial_params()
    a = _run_local_train(st.LocalTrain(batch_size=4), module, ds, gp, rnd=1, client=2, seed=0).update
    b = _run_local_train(st.LocalTrain(batch_size=4), module, ds, gp, rnd=1, client=2, seed=0).update
    c = _run_local_train(st.LocalTrain(batch_size=4), module, ds, gp, rnd=2, client=2, seed=0).update
    assert np.array_equal(a.delta, b.delta)
    assert not np.array_equal(a.delta, c.delta)


def test_local_train_reads_per_client_epochs_from_the_client_set():
    ds = FederatedDataset.from_function(_client_data, num_clients=8)
    module = _net()
    gp = ModelAdapter.from_module(module).initial_params()
    clients = ClientSet(np.array([1, 3]), {"epochs": np.array([1, 3])})
    work = _run_local_train(st.LocalTrain(epochs=1, batch_size=4), module, ds, gp, rnd=1, client=3, seed=0,
                            clients=clients, position=1)
    n = len(_client_data(3)[1])
    assert work.update.metrics["steps"] == 3 * -(-n // 4)


def test_local_train_custom_train_fn():
    ds = FederatedDataset.from_function(_client_data, num_clients=4)
    module = _net()
    gp = ModelAdapter.from_module(module).initial_params()
    seen: dict[str, Any] = {}

    def train_fn(model, data, ctx):
        seen.update(round=ctx.round, client=ctx.client, n=data.num_samples, perm=ctx.rng.permutation(3).tolist())
        with torch.no_grad():
            model[0].bias.add_(1.0)
        return {"loss": 0.25, "custom": 2.0}

    stage = st.LocalTrain(train_fn=train_fn)
    work = _run_local_train(stage, module, ds, gp, rnd=2, client=1, seed=9)
    assert seen["round"] == 2 and seen["client"] == 1 and seen["n"] == len(_client_data(1)[1])
    assert seen["perm"] == stream(9, stage.tag, 2, 1).permutation(3).tolist()
    # the step's own metrics, plus the samples it is taken to have trained on (epochs x samples), which the
    # device simulation uses unless the step reports its own samples_processed
    assert work.update.metrics == {"loss": 0.25, "custom": 2.0,
                                   "samples_processed": float(len(_client_data(1)[1]))}
    e = ModelAdapter.from_module(module).spec.entry("0.bias")
    assert np.allclose(work.update.delta[e.offset : e.offset + e.size], 1.0)
    assert np.count_nonzero(work.update.delta) == e.size


def _assert_client_error(ei: pytest.ExceptionInfo, client: int, rnd: int) -> ClientError:
    e = ei.value
    assert isinstance(e, ClientError)
    assert (e.client, e.stage, e.round) == (client, "LocalTrain", rnd)
    assert str(e).startswith(f"round {rnd}, client {client}, stage LocalTrain: ")
    assert e.fix
    # it travels from a worker to the driver by pickle, keeping its fields
    back = pickle.loads(pickle.dumps(e))
    assert (back.client, back.stage, back.round, back.fix, str(back)) == (client, "LocalTrain", rnd, e.fix, str(e))
    return e


def test_local_train_empty_client():
    ds = FederatedDataset.from_function(lambda k: (np.zeros((0, 3), np.float32), np.zeros(0, np.int64)), 3)
    module = _net()
    with pytest.raises(ClientError) as ei:
        _run_local_train(st.LocalTrain(), module, ds, ModelAdapter.from_module(module).initial_params(),
                         rnd=7, client=2, seed=0)
    e = _assert_client_error(ei, client=2, rnd=7)
    assert e.message.endswith(": the client has no samples")


def test_local_train_labels_that_do_not_fit_the_model():
    ds = FederatedDataset.from_function(
        lambda k: (np.random.default_rng(k).standard_normal((10, 3)).astype(np.float32), np.arange(10)), 3)
    module = _net()  # 3 outputs, labels 0..9
    with pytest.raises(ClientError) as ei:
        _run_local_train(st.LocalTrain(batch_size=32), module, ds, ModelAdapter.from_module(module).initial_params(),
                         rnd=2, client=1, seed=0)
    e = _assert_client_error(ei, client=1, rnd=2)
    assert "model's output of shape (10, 3)" in e.message
    assert "labels of shape (10,) with values 0..9" in e.message
    assert "one output per class" in e.fix


def test_local_train_nan_data_gives_a_nan_loss_error():
    def fn(k):
        x = np.ones((6, 3), np.float32)
        x[2, 1] = np.nan
        return x, np.zeros(6, np.int64)

    ds = FederatedDataset.from_function(fn, 2)
    module = _net()
    with pytest.raises(ClientError) as ei:
        _run_local_train(st.LocalTrain(batch_size=6), module, ds, ModelAdapter.from_module(module).initial_params(),
                         rnd=3, client=0, seed=0)
    e = _assert_client_error(ei, client=0, rnd=3)
    assert e.message.endswith(": step 1 gave a non-finite loss (nan)")
    assert "learning rate" in e.fix


def test_local_train_huge_lr_is_stopped():
    ds = FederatedDataset.from_function(_client_data, num_clients=4)
    module = _net()
    with pytest.raises(ClientError) as ei:
        _run_local_train(st.LocalTrain(epochs=5, batch_size=2, lr=1e30), module, ds,
                         ModelAdapter.from_module(module).initial_params(), rnd=8, client=3, seed=0)
    e = _assert_client_error(ei, client=3, rnd=8)
    assert "non-finite" in e.message


def test_local_train_train_fn_nan_loss():
    ds = FederatedDataset.from_function(_client_data, num_clients=2)
    module = _net()
    with pytest.raises(ClientError) as ei:
        _run_local_train(st.LocalTrain(train_fn=lambda m, d, c: float("nan")), module, ds,
                         ModelAdapter.from_module(module).initial_params(), rnd=1, client=1, seed=0)
    e = _assert_client_error(ei, client=1, rnd=1)
    assert e.message.endswith(": the training step gave a non-finite loss (nan)")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, r"LocalTrain\(epochs=0\)"),
        ({"steps": 0}, r"LocalTrain\(steps=0\)"),
        ({"batch_size": 0}, r"LocalTrain\(batch_size=0\)"),
        ({"device": "tpu"}, r"LocalTrain\(device='tpu'\)"),
    ],
)
def test_local_train_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        st.LocalTrain(**kwargs)


def test_local_train_steps_without_epochs_is_fine():
    assert st.LocalTrain(epochs=0, steps=3).steps == 3


# --------------------------------------------------------------------------- Evaluate


def _bn_eval_net() -> nn.Module:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        m.train()
        m(torch.randn(32, 3) * 2 + 1)  # non-trivial running statistics: eval mode must use them
    return m


@pytest.mark.parametrize("batch_size", [1024, 7])
def test_evaluate_equals_a_direct_torch_computation(batch_size):
    m = _bn_eval_net()
    ad = ModelAdapter.from_module(m)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((30, 3)).astype(np.float32)
    y = rng.integers(0, 4, 30).astype(np.int64)
    ctx = _ctx(ad.initial_params(), round=4, model_source=ad)
    st.Evaluate(every=2, data=(x, y), batch_size=batch_size).run(ctx)
    m.eval()
    with torch.no_grad():
        out = m(torch.from_numpy(x))
        loss = F.cross_entropy(out, torch.from_numpy(y)).item()
        correct = int((out.argmax(1) == torch.from_numpy(y)).sum())
    assert ctx.metrics["accuracy"] == correct / 30
    assert 0.0 < ctx.metrics["accuracy"] < 1.0
    assert ctx.metrics["test_loss"] == pytest.approx(loss, rel=1e-6)


def test_evaluate_uses_the_dataset_test_split_and_its_schedule():
    m = _bn_eval_net()
    ad = ModelAdapter.from_module(m)
    x = np.random.default_rng(10).standard_normal((12, 3)).astype(np.float32)
    y = np.arange(12) % 4
    ds = FederatedDataset.from_function(_client_data, num_clients=2, test=(x, y))
    ev = st.Evaluate(every=3)
    ev.prepare(ds, ad)
    assert [ev.due(r, last=False) for r in range(1, 7)] == [False, False, True, False, False, True]
    assert ev.due(4, last=True)
    skipped = _ctx(ad.initial_params(), round=4, model_source=ad, dataset=ds)
    ev.run(skipped)
    assert skipped.metrics == {}
    for rnd, last in [(6, False), (4, True)]:
        ctx = _ctx(ad.initial_params(), round=rnd, model_source=ad, dataset=ds, last_round=last)
        ev.run(ctx)
        m.eval()
        with torch.no_grad():
            out = m(torch.from_numpy(x))
        assert ctx.metrics["accuracy"] == (out.argmax(1).numpy() == y).mean()
        assert ctx.metrics["test_loss"] == pytest.approx(F.cross_entropy(out, torch.from_numpy(y)).item(), rel=1e-6)


def test_evaluate_errors():
    with pytest.raises(ConfigError, match=r"Evaluate\(every=0\): must be >= 1"):
        st.Evaluate(every=0)
    ds = FederatedDataset.from_function(_client_data, num_clients=2)
    with pytest.raises(ConfigError, match="no held-out data") as ei:
        st.Evaluate().prepare(ds, None)
    assert "Evaluate(data=(x, y))" in ei.value.fix
