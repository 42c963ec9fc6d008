"""The stage library's arithmetic against direct numpy / torch computations (no Dask cluster).

Codecs (bf16, int8, top-k), robust reducers (median, trimmed mean, Krum), clipping, Gaussian noise and the
RDP accountant, server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad), LocalTrain's proximal term,
freezing and held-out split, weighted selection, stragglers, Byzantine clients, federated and personalized
evaluation, and the pipeline-spec round trip of every new stage.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flgraph.stages.split import heldout
from torch import nn

from flgraph import stages as st
from flgraph import tree
from flgraph.context import ClientSet, ClientWork, RoundContext, Update
from flgraph.data import FederatedDataset, fedprox_synthetic
from flgraph.errors import ConfigError, PipelineError
from flgraph.graph import Pipeline, Reducer
from flgraph.models.adapter import ModelAdapter
from flgraph.params import Params, ParamSpec
from flgraph.rng import stage_tag, stream, torch_seed
from flgraph.spec import _build, describe, differences

SPEC = ParamSpec.from_shapes([("w", (30, 20), "float32"), ("b", (20,), "float32"), ("v", (7,), "float32")])


def _deltas(k: int, spec: ParamSpec = SPEC, seed: int = 0, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(spec.size) * scale).astype(spec.carrier) for _ in range(k)]


def _updates(deltas: list[np.ndarray], counts: list[int] | None = None) -> list[Update]:
    counts = counts or [1 + i for i in range(len(deltas))]
    return [Update(i, c, 0, d.copy()) for i, (d, c) in enumerate(zip(deltas, counts))]


def _reduce(reducer: Reducer, updates: list[Update], spec: ParamSpec = SPEC,
            chunking: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, float]:
    """Reduce like the engine: chunks evaluate their tree nodes, the driver assembles the root."""
    n = len(updates)
    nodes = {}
    for a, b in chunking or [(0, n)]:
        for lo, hi in tree.cover(n, a, b):
            nodes[(lo, hi)] = tree.evaluate(lo, hi, lambda i: reducer.leaf(updates[i], spec), reducer.combine)
    return reducer.finalize(tree.assemble(n, nodes, reducer.combine), spec)


def _work(update: Update | None = None, **kw: Any) -> ClientWork:
    spec = kw.pop("spec", SPEC)
    client = kw.pop("client", 3)
    return ClientWork(round=kw.pop("round", 4), client=client, position=kw.pop("position", 0),
                      seed=kw.pop("seed", 0), global_params=kw.pop("global_params", Params(spec, spec.empty())),
                      dataset=kw.pop("dataset", None), clients=kw.pop("clients", ClientSet(np.array([client]))),
                      model_source=kw.pop("model_source", None), update=update, **kw)


def _ctx(params: Params, **kw: Any) -> RoundContext:
    return RoundContext(round=kw.pop("round", 1), seed=kw.pop("seed", 0), params=params,
                        dataset=kw.pop("dataset", None), model_source=kw.pop("model_source", None),
                        last_round=kw.pop("last_round", False), **kw)


# ======================================================================================== codecs


def test_bf16_matches_torch_bfloat16_bit_for_bit():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-30, 30, 50_000)).astype(np.float32)
    x[:6] = [0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40]
    c = st.BFloat16()
    payload = c.encode(x)
    assert payload.dtype == np.uint16 and c.nbytes(payload) == x.nbytes // 2
    got = c.decode(payload, ParamSpec.from_shapes([("x", (x.size,), "float32")]))
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    assert np.isnan(c.decode(c.encode(np.array([np.nan], np.float32)), SPEC)[0])


def test_int8_round_to_nearest_per_tensor_equals_numpy():
    x = np.concatenate(_deltas(1)) * np.repeat([1.0, 100.0, 0.01], [600, 20, 7]).astype(np.float32)
    c = st.Int8(stochastic=False).for_client(SPEC, np.random.default_rng(0))
    q, scales, starts = c.encode(x)
    assert q.dtype == np.int8 and starts.tolist() == [0, 600, 620] and scales.dtype == np.float32
    want = np.empty_like(x)
    for e in SPEC.entries:
        part = x[e.offset : e.offset + e.size]
        s = np.float32(np.abs(part).max() / 127.0)
        want[e.offset : e.offset + e.size] = np.rint(part / s) * s
        assert np.abs(q[e.offset : e.offset + e.size]).max() == 127
    got = c.decode((q, scales, starts), SPEC)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert c.nbytes((q, scales, starts)) == SPEC.size + 4 * 3


def test_int8_per_block_scales_and_the_upload_ratio():
    x = _deltas(1)[0]
    c = st.Int8(block=64, stochastic=False)
    q, scales, starts = c.encode(x)
    assert len(scales) == math.ceil(SPEC.size / 64) and starts.tolist() == list(range(0, SPEC.size, 64))
    for i, a in enumerate(starts):
        blk = x[a : a + 64]
        assert scales[i] == np.float32(np.abs(blk).max() / 127.0)
        np.testing.assert_allclose(c.decode((q, scales, starts), SPEC)[a : a + 64],
                                   np.rint(blk / scales[i]) * scales[i], rtol=1e-6)
    # W1's 2NN (199,210 float32 values): per tensor, and per block of 256
    w1 = ParamSpec.from_shapes([("h1.w", (200, 784), "float32"), ("h1.b", (200,), "float32"),
                                ("h2.w", (200, 200), "float32"), ("h2.b", (200,), "float32"),
                                ("o.w", (10, 200), "float32"), ("o.b", (10,), "float32")])
    d = np.random.default_rng(2).standard_normal(w1.size).astype(np.float32)
    for codec in (st.Int8().for_client(w1, np.random.default_rng(0)), st.Int8(block=256)):
        assert d.nbytes / codec.nbytes(codec.encode(d)) >= 3.9


def test_int8_stochastic_rounding_is_unbiased_and_seeded():
    x = np.array([0.3, -0.71, 1.0, 0.0049, -1.0, 0.5], np.float32)
    spec = ParamSpec.from_shapes([("x", (6,), "float32")])
    s = np.float32(1.0 / 127)
    outs = []
    for seed in range(4000):
        c = st.Int8().for_client(spec, np.random.default_rng(seed))
        out = c.decode(c.encode(x), spec)
        assert np.all((out == np.floor(x / s) * s) | (out == np.ceil(x / s) * s) | np.isclose(out, x))
        outs.append(out)
    mean = np.mean(outs, axis=0)
    np.testing.assert_allclose(mean, x, atol=4 * float(s) / math.sqrt(4000) + 1e-7)
    a = st.Int8().for_client(spec, np.random.default_rng(7)).encode(x)
    b = st.Int8().for_client(spec, np.random.default_rng(7)).encode(x)
    assert a[0].tolist() == b[0].tolist()


def test_int8_refuses_non_finite_and_bad_block():
    with pytest.raises(ConfigError, match="non-finite"):
        st.Int8().encode(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ConfigError, match=r"Int8\(block=0\)") as ei:
        st.Int8(block=0)
    assert "block=256" in ei.value.fix


def test_topk_keeps_the_largest_magnitudes():
    x = _deltas(1)[0]
    c = st.TopK(fraction=0.05)
    payload = c.encode(x)
    k = math.ceil(0.05 * SPEC.size)
    want = np.zeros_like(x)
    top = np.argsort(-np.abs(x), kind="stable")[:k]
    want[top] = x[top]
    got = c.decode(payload, SPEC)
    assert np.array_equal(got, want)
    assert c.nbytes(payload) == k * 4 + k * 4
    ties = np.array([1.0, -1.0, 1.0, 0.5], np.float32)
    assert st.TopK(0.5).decode(st.TopK(0.5).encode(ties), SPEC).tolist() == [1.0, -1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="fraction in"):
        st.TopK(0.0)


def test_compress_binds_the_client_stream_and_reports_bytes():
    stage = st.Compress("int8")
    _ = st.Select(clients=1) >> st.Broadcast() >> st.LocalTrain() >> stage
    delta = _deltas(1)[0]
    runs = []
    for _ in range(2):
        upd = Update(3, 10, 3, delta.copy())
        stage.run(_work(upd, round=4, client=3, seed=5))
        runs.append(upd)
    a, b = runs
    assert a.payload[0].tolist() == b.payload[0].tolist()  # seeded by (seed, tag, round, client)
    assert a.payload[2].tolist() == [0, 600, 620]  # per tensor of the params' layout
    assert a.raw_nbytes == delta.nbytes and a.upload_nbytes == SPEC.size + 12
    c = Update(3, 10, 3, delta.copy())
    stage.run(_work(c, round=5, client=3, seed=5))
    assert c.payload[0].tolist() != a.payload[0].tolist()
    assert stage.codec._rng is None, "the stage's own codec stays unbound"


ALL_CODECS = [None, "lz4", "fp16", "bf16", "int8", st.Int8(block=32), st.TopK(0.5)]


@pytest.mark.parametrize("codec", ALL_CODECS, ids=lambda c: repr(c))
@pytest.mark.parametrize("make", [lambda: st.WeightedMean(), lambda: st.Median(), lambda: st.TrimmedMean(0.2),
                                  lambda: st.Krum(1, m=2), lambda: st.ClipNorm(st.Median(), max_norm=3.0)],
                         ids=["mean", "median", "trimmed", "krum", "clip-median"])
def test_any_codec_composes_with_any_aggregator(codec, make):
    deltas = _deltas(7, seed=3)
    encoded = _updates(deltas)
    decoded = []
    for i, u in enumerate(encoded):
        if codec is not None:
            stage = st.Compress(codec)
            _ = st.Select(clients=1) >> st.Broadcast() >> st.LocalTrain() >> stage
            stage.run(_work(u, client=i))
        decoded.append(u.decoded(SPEC).copy())
    got, w = _reduce(make(), encoded)
    want, w2 = _reduce(make(), _updates(decoded))
    assert w == w2 == sum(range(1, 8))
    assert np.array_equal(got, want)


# ======================================================================================== robust reducers


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_median_equals_numpy(n):
    deltas = _deltas(n, seed=n)
    got, w = _reduce(st.Median(), _updates(deltas))
    assert got.dtype == np.float32 and w == float(sum(range(1, n + 1)))
    np.testing.assert_allclose(got, np.median(np.stack(deltas), axis=0), rtol=1e-6)


def _trim_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    n = stack.shape[0]
    t = math.floor(beta * n)
    return np.sort(stack.astype(np.float64), axis=0)[t : n - t].mean(axis=0)


@pytest.mark.parametrize(("n", "beta"), [(10, 0.1), (10, 0.25), (7, 0.3), (3, 0.0), (20, 0.45)])
def test_trimmed_mean_equals_numpy(n, beta):
    deltas = _deltas(n, seed=11)
    got, _ = _reduce(st.TrimmedMean(beta), _updates(deltas))
    np.testing.assert_allclose(got, _trim_mean(np.stack(deltas), beta), rtol=1e-5, atol=1e-6)


def test_trimmed_mean_errors():
    with pytest.raises(ConfigError, match=r"TrimmedMean\(beta=0.5\)"):
        st.TrimmedMean(0.5)
    assert _reduce(st.TrimmedMean(0.34), _updates(_deltas(3)))[0].shape == (SPEC.size,)


def _krum_reference(stack: np.ndarray, f: int, m: int) -> np.ndarray:
    n = len(stack)
    x = stack.astype(np.float64)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    best = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return x[sorted(best)].mean(axis=0)


@pytest.mark.parametrize(("n", "f", "m"), [(7, 1, 1), (9, 2, 1), (9, 2, 4), (12, 3, 6)])
def test_krum_equals_a_direct_computation(n, f, m):
    deltas = _deltas(n, seed=n + f)
    deltas[0] = deltas[0] * 50  # an outlier Krum never picks
    got, _ = _reduce(st.Krum(f, m=m), _updates(deltas))
    np.testing.assert_allclose(got, _krum_reference(np.stack(deltas), f, m), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [40, 3000])  # 3000: three blocks of rows
def test_krum_scores_in_row_blocks_are_the_bits_of_the_whole_matrix_formula(n):
    """The scores made in place, a block of rows at a time, equal the whole-matrix expression bit for bit,
    with one n x n matrix at the peak."""
    import tracemalloc

    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 30))
    x[5] = x[3]  # a tie: two equal updates
    sq, gram = np.einsum("ij,ij->i", x, x), x @ x.T
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)  # the formula written whole
    np.fill_diagonal(d, np.inf)
    expected = np.sort(d, axis=1)[:, : n - 3 - 2].sum(axis=1)
    del d
    tracemalloc.start()
    got = st.Krum(3)._from_gram(sq, gram)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.array_equal(got, expected)
    assert peak < 1.2 * n * n * 8 + (1 << 20)  # the gram is reused: no second n x n matrix (the formula: 4)


def test_krum_needs_enough_updates():
    with pytest.raises(ConfigError, match=r"needs more than 2f\+2 = 6 updates, got 6") as ei:
        _reduce(st.Krum(2), _updates(_deltas(6)))
    assert "at least 7 clients" in ei.value.fix
    with pytest.raises(ConfigError, match=r"Krum\(m=9\) selects more"):
        _reduce(st.Krum(1, m=9), _updates(_deltas(8)))


@pytest.mark.parametrize("make", [st.Median, lambda: st.TrimmedMean(0.2), lambda: st.Krum(2, m=3)])
def test_needs_all_reducers_are_in_client_order_for_any_chunking(make):
    n = 13
    deltas = _deltas(n, seed=4)
    ref = make()
    assert ref.needs_all
    base, _ = _reduce(ref, _updates(deltas))
    for size in (1, 2, 5, 13):
        got, _ = _reduce(make(), _updates(deltas), chunking=tree.chunks(n, 1, size=size))
        assert got.tobytes() == base.tobytes()


@pytest.mark.parametrize("make", [st.Median, lambda: st.TrimmedMean(0.2), lambda: st.Krum(2, m=3)],
                         ids=["median", "trimmed", "krum"])
def test_robust_reducers_ignore_sample_counts_and_return_their_total(make):
    """Yin et al.'s and Blanchard et al.'s rules are unweighted: a client with many samples gets one vote."""
    deltas = _deltas(9, seed=8)
    counts = [1, 1000, 1, 1, 1, 1, 1, 1, 1]
    got, w = _reduce(make(), _updates(deltas, counts))
    same, _ = _reduce(make(), _updates(deltas, [1] * 9))
    assert w == float(sum(counts))
    assert got.tobytes() == same.tobytes()


def test_robust_reducers_on_a_sign_flipped_round_equal_numpy():
    """A round of 10 clients of which Byzantine(0.2) corrupts the seeded 20% of the population: the stage
    flips and scales exactly those deltas, and the median / 0.2-trimmed mean equal numpy's on the result."""
    ds = FederatedDataset.from_function(_client_data, num_clients=50)
    stage = st.Byzantine(0.2, attack="sign_flip", scale=10.0)
    order = stream(7, stage_tag("Byzantine")).permutation(50)
    assert stage.attackers(7, ds.client_ids) == frozenset(int(c) for c in order[:10])  # round(0.2 * 50) = 10
    ids = [int(c) for c in order[5:15]]  # 5 attackers, 5 honest clients
    honest = _deltas(10, seed=9)
    ups = []
    for c, d in zip(ids, honest):
        u = Update(c, 3, 0, d.copy())
        stage.run(_work(u, client=c, dataset=ds, seed=7))
        ups.append(u)
    sent = np.stack([d * np.float32(-10.0 if c in set(order[:10].tolist()) else 1.0) for c, d in zip(ids, honest)])
    assert [u.metrics["byzantine"] for u in ups] == [1.0] * 5 + [0.0] * 5
    med, w = _reduce(st.Median(), copy.deepcopy(ups))
    np.testing.assert_allclose(med, np.median(sent.astype(np.float64), axis=0), rtol=1e-6, atol=1e-7)
    trimmed, _ = _reduce(st.TrimmedMean(0.2), ups)
    low_to_high = np.sort(sent.astype(np.float64), axis=0)
    np.testing.assert_allclose(trimmed, low_to_high[2:8].mean(axis=0), rtol=1e-5, atol=1e-6)  # floor(0.2*10)=2
    assert w == 30.0


# ======================================================================================== clipping and DP


def test_clip_norm_equals_numpy():
    deltas = _deltas(6, seed=5, scale=0.1)
    deltas[2] *= 100
    deltas[4] *= 100
    got, _ = _reduce(st.ClipNorm(st.WeightedMean("uniform"), max_norm=2.0), _updates(deltas))
    clipped = [d * min(1.0, 2.0 / np.linalg.norm(d.astype(np.float64))) for d in deltas]
    np.testing.assert_allclose(got, np.mean(clipped, axis=0), rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(clipped[2]) == pytest.approx(2.0)


def test_clip_norm_refuses_a_bad_norm():
    with pytest.raises(ConfigError, match="positive finite"):
        st.ClipNorm(max_norm=0.0)


# ======================================================================================== server optimizers


def _numpy_opt(method: str, deltas: list[np.ndarray], x0: np.ndarray, **hp: float) -> np.ndarray:
    lr, b1, b2, tau, mom = hp["lr"], hp.get("beta1", 0.9), hp.get("beta2", 0.99), hp.get("tau", 1e-3), hp.get(
        "momentum", 0.0)
    x = x0.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    buf = np.zeros_like(x)
    for d in deltas:
        d = d.astype(np.float64)
        if method == "sgd":
            buf = mom * buf + d
            x = x + lr * buf
            continue
        m = b1 * m + (1 - b1) * d
        if method == "adagrad":
            v = v + d**2
        elif method == "adam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(("method", "hp"), [
    ("sgd", {"lr": 1.0, "momentum": 0.9}), ("sgd", {"lr": 0.5}), ("adam", {"lr": 0.01}),
    ("yogi", {"lr": 0.02, "beta2": 0.9}), ("adagrad", {"lr": 0.1, "tau": 1e-2}),
])
def test_server_optimizers_equal_numpy(method, hp):
    stage = st.ServerOpt(st.WeightedMean(), method, **hp)
    x0 = _deltas(1, seed=8)[0]
    deltas = _deltas(4, seed=9, scale=0.01)
    params = Params(SPEC, x0.copy())
    state = stage.init_state(params)
    for d in deltas:
        ctx = _ctx(params, state=dict(state))
        old = {k: v.copy() for k, v in state.items()}
        stage.apply(ctx, d, 10.0)
        for k in old:  # the previous round's state is not modified in place
            assert np.array_equal(state[k], old[k])
        params, state = ctx.params, ctx.state
        assert ctx.metrics["update_norm"] == pytest.approx(float(np.linalg.norm(d)))
    np.testing.assert_allclose(params.flat, _numpy_opt(method, deltas, x0, **hp), rtol=1e-5, atol=1e-6)
    assert params.flat.dtype == np.float32
    if method in ("adam", "yogi", "adagrad"):
        assert set(state) == {"m", "v"} and state["v"].dtype == np.float32


def test_server_opt_sgd_without_momentum_is_aggregate():
    x0, d = _deltas(2, seed=10)
    a, b = _ctx(Params(SPEC, x0.copy())), _ctx(Params(SPEC, x0.copy()))
    st.Aggregate().apply(a, d, 1.0)
    st.ServerOpt().apply(b, d, 1.0)
    assert np.array_equal(a.params.flat, b.params.flat)


def test_server_opt_validation():
    with pytest.raises(ConfigError, match="method='lamb'") as ei:
        st.ServerOpt(method="lamb")
    assert "adam" in ei.value.fix
    with pytest.raises(ConfigError, match="momentum is for 'sgd'"):
        st.ServerOpt(method="adam", momentum=0.9)
    with pytest.raises(ConfigError, match="tau"):
        st.ServerOpt(method="adam", tau=0)
    with pytest.raises(ConfigError, match="lr"):
        st.ServerOpt(lr=0)


# ======================================================================================== LocalTrain options


def _client_data(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(200 + k)
    n = 11 + k % 3
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)


class BodyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _train(stage: st.LocalTrain, *, rnd: int = 2, client: int = 1, seed: int = 7) -> tuple[ClientWork, ModelAdapter]:
    _ = st.Select(clients=1) >> st.Broadcast() >> stage
    module = BodyHead()
    ad = ModelAdapter.from_module(module)
    ds = FederatedDataset.from_function(_client_data, num_clients=4)
    stage.prepare(ds, ad)
    work = ClientWork(rnd, client, 0, seed, ad.initial_params(), ds, ClientSet(np.array([client])), ad)
    work.tag = stage.tag
    stage.run(work)
    return work, ad


def _hand(stage: st.LocalTrain, ad: ModelAdapter, *, rnd: int = 2, client: int = 1, seed: int = 7,
          mu: float = 0.0, train: str | None = None, holdout: float = 0.0) -> np.ndarray:
    """Plain torch: FedProx's objective F_k(w) + mu/2 ||w - w0||^2 by autograd, optional trainable subset."""
    model = copy.deepcopy(ad.template)
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = _client_data(client)
    if holdout:
        keep = ~heldout(seed, client, len(y), holdout)
        x, y = x[keep], y[keep]
    params = [p for n, p in model.named_parameters() if train is None or n.startswith(train)]
    opt = torch.optim.SGD(params, lr=stage.lr)
    rng = stream(seed, stage.tag, rnd, client)
    torch.manual_seed(torch_seed(seed, stage.tag, rnd, client))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(stage.epochs):
        perm = torch.from_numpy(rng.permutation(len(y)))
        for i in range(0, len(y), stage.batch_size):
            idx = perm[i : i + stage.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            if mu:
                loss = loss + mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), w0))
            loss.backward()
            opt.step()
    sd = model.state_dict()
    return Params.pack(ad.spec, {k: sd[k].numpy() for k in ad.spec.names}).flat - ad.initial_params().flat


@pytest.mark.parametrize("mu", [0.0, 0.5, 2.0])
def test_local_train_proximal_term_equals_autograd_of_the_fedprox_objective(mu):
    stage = st.LocalTrain(2, batch_size=4, lr=0.1, mu=mu)
    work, ad = _train(stage)
    want = _hand(stage, ad, mu=mu)
    np.testing.assert_allclose(work.update.delta, want, rtol=1e-4, atol=1e-6)


def test_proximal_term_keeps_the_update_closer_to_the_global_model():
    norms = [float(np.linalg.norm(_train(st.LocalTrain(5, batch_size=4, lr=0.1, mu=mu))[0].update.delta))
             for mu in (0.0, 0.5, 1.0, 4.0)]
    assert norms[0] > norms[1] > norms[2] > norms[3] > 0


def test_freeze_keeps_the_head_exactly_and_trains_the_body():
    stage = st.LocalTrain(2, batch_size=4, lr=0.1, freeze=["head"])
    work, ad = _train(stage)
    d = work.update.delta
    for e in ad.spec.entries:
        part = d[e.offset : e.offset + e.size]
        assert (np.all(part == 0) if e.name.startswith("head") else np.any(part != 0)), e.name
    np.testing.assert_allclose(d, _hand(stage, ad, train="body"), rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in ad.bound("cpu").module.parameters()), "requires_grad is restored"


def test_freeze_validation():
    with pytest.raises(ConfigError, match="'neck' matches no parameter") as ei:
        _train(st.LocalTrain(freeze=["neck"]))
    assert "head" in ei.value.fix
    with pytest.raises(ConfigError, match="freezes every parameter"):
        _train(st.LocalTrain(freeze=["*"]))
    with pytest.raises(ConfigError, match=r"mu=\.\.\., train_fn"):
        st.LocalTrain(mu=0.1, train_fn=lambda m, d, c: 0.0)
    with pytest.raises(ConfigError, match="mu=-1"):
        st.LocalTrain(mu=-1)
    assert st.LocalTrain(freeze="head").freeze == ("head",)


def test_holdout_trains_on_the_rest_only():
    stage = st.LocalTrain(1, batch_size=4, lr=0.1, holdout=0.25)
    work, ad = _train(stage, client=2)
    n = len(_client_data(2)[1])
    assert work.update.num_samples == n - math.ceil(0.25 * n)
    np.testing.assert_allclose(work.update.delta, _hand(stage, ad, client=2, holdout=0.25), rtol=1e-4, atol=1e-6)
    mask = heldout(7, 2, n, 0.25)
    assert mask.sum() == math.ceil(0.25 * n) and np.array_equal(mask, heldout(7, 2, n, 0.25))
    assert not heldout(7, 2, 1, 0.5).any() and heldout(7, 2, 3, 0.99).sum() == 2


# ======================================================================================== server / client stages


def test_weighted_select_equals_the_seeded_weighted_choice():
    sizes = {k: 1 + 5 * (k % 4) for k in range(40)}
    ds = FederatedDataset.from_function(lambda k: (np.zeros((sizes[k], 1), np.float32),
                                                   np.zeros(sizes[k], np.int64)), 40)
    sel = st.Select(clients=6, weighting="samples")
    _ = sel >> st.Broadcast()
    sel.prepare(ds, None)
    ctx = _ctx(Params(SPEC, SPEC.empty()), round=3, seed=2, dataset=ds)
    sel.run(ctx)
    p = np.array([sizes[k] for k in range(40)], float)
    want = stream(2, sel.tag, 3).choice(np.arange(40), size=6, replace=False, p=p / p.sum())
    assert ctx.clients.ids.tolist() == want.tolist()
    counts = np.zeros(40)
    for r in range(300):
        c = _ctx(Params(SPEC, SPEC.empty()), round=r, seed=2, dataset=ds)
        sel.run(c)
        counts[c.clients.ids] += 1
    assert counts[3::4].sum() > 2.5 * counts[0::4].sum()  # 16 samples vs 1
    with pytest.raises(ConfigError, match="weighting='size'"):
        st.Select(clients=2, weighting="size")


def test_stragglers_partial_and_drop():
    ids = np.arange(100, 110)
    for policy in ("partial", "drop"):
        stage = st.Stragglers(0.9, epochs=20, policy=policy)
        _ = st.Select(clients=10) >> stage
        ctx = _ctx(Params(SPEC, SPEC.empty()), round=4, seed=1, clients=ClientSet(ids))
        stage.run(ctx)
        rng = stream(1, stage.tag, 4)
        active = np.zeros(10, bool)
        active[rng.choice(10, size=1, replace=False)] = True
        assert ctx.metrics["stragglers"] == 9
        if policy == "drop":
            assert ctx.clients.ids.tolist() == ids[active].tolist()
        else:
            ep = ctx.clients.settings["epochs"]
            assert ctx.clients.ids.tolist() == ids.tolist()
            assert ep[active].tolist() == [20]
            assert ep[~active].tolist() == rng.integers(1, 20, size=9).tolist()
            assert ep.min() >= 1 and ep[~active].max() <= 19
    with pytest.raises(ConfigError, match="dropped all"):
        s = st.Stragglers(1.0, policy="drop")
        s.run(_ctx(Params(SPEC, SPEC.empty()), clients=ClientSet(ids)))


def test_stragglers_partial_work_reaches_local_train():
    stage = st.LocalTrain(5, batch_size=4, lr=0.1)
    _ = st.Select(clients=1) >> st.Broadcast() >> stage
    ad = ModelAdapter.from_module(BodyHead())
    ds = FederatedDataset.from_function(_client_data, num_clients=4)
    cs = ClientSet(np.array([0, 1]), {"epochs": np.array([5, 2])})
    steps = []
    for pos in (0, 1):
        work = ClientWork(1, int(cs.ids[pos]), pos, 0, ad.initial_params(), ds, cs, ad)
        work.tag = stage.tag
        stage.run(work)
        steps.append(work.update.metrics["steps"])
    assert steps == [5 * math.ceil(11 / 4), 2 * math.ceil(12 / 4)]


def test_byzantine_corrupts_a_fixed_fifth_of_the_population():
    ds = FederatedDataset.from_function(_client_data, num_clients=50)
    for attack, factor in (("sign_flip", -10.0), ("scale", 10.0)):
        stage = st.Byzantine(0.2, attack=attack)
        bad = stage.attackers(0, ds.client_ids)
        assert len(bad) == 10 and bad == st.Byzantine(0.2).attackers(0, ds.client_ids)
        assert bad != st.Byzantine(0.2).attackers(1, ds.client_ids)
        for c in (min(bad), min(set(range(50)) - bad)):
            d = _deltas(1, seed=c)[0]
            u = Update(c, 5, 0, d.copy())
            stage.run(_work(u, client=c, dataset=ds))
            hit = c in bad
            np.testing.assert_array_equal(u.delta, (d * np.float32(factor)) if hit else d)
            assert u.metrics["byzantine"] == float(hit)
    u = Update(0, 1, 0, np.ones(SPEC.size, np.float32))
    u.encoded_with(st.LZ4())
    with pytest.raises(ConfigError, match="already encoded") as ei:
        st.Byzantine().run(_work(u, client=0, dataset=ds))
    assert "before Compress" in ei.value.fix


def _local_mapper(ad: ModelAdapter, ds: FederatedDataset, seed: int, rnd: int):
    def mapper(fn, ids, flat):
        gp = Params(ad.spec, flat)
        cs = ClientSet(np.asarray(ids))
        return [fn(ClientWork(rnd, int(c), i, seed, gp, ds, cs, ad)) for i, c in enumerate(ids)]
    return mapper


def test_federated_evaluate_equals_a_direct_weighted_computation():
    ad = ModelAdapter.from_module(BodyHead())
    ds = FederatedDataset.from_function(_client_data, num_clients=4)
    stage = st.FederatedEvaluate(holdout=0.3)
    _ = st.Select(clients=1) >> stage
    ctx = _ctx(ad.initial_params(), round=1, seed=5, dataset=ds, model_source=ad, last_round=True)
    ctx.mapper = _local_mapper(ad, ds, 5, 1)
    stage.run(ctx)
    model = ad.to_module(ad.initial_params()).eval()
    loss, correct, n = 0.0, 0, 0
    for k in range(4):
        x, y = _client_data(k)
        ho = heldout(5, k, len(y), 0.3)
        with torch.no_grad():
            out = model(torch.from_numpy(x[ho]))
        loss += float(F.cross_entropy(out, torch.from_numpy(y[ho]), reduction="sum"))
        correct += int((out.argmax(1).numpy() == y[ho]).sum())
        n += int(ho.sum())
    assert ctx.metrics["fed_accuracy"] == pytest.approx(correct / n)
    assert ctx.metrics["fed_loss"] == pytest.approx(loss / n, rel=1e-5)
    assert ctx.metrics["fed_eval_clients"] == 4
    with pytest.raises(ConfigError, match="holdout=0"):
        st.FederatedEvaluate(holdout=0.0)


def test_personalized_evaluate_fine_tunes_then_evaluates_each_client():
    ad = ModelAdapter.from_module(BodyHead())
    ds = FederatedDataset.from_function(_client_data, num_clients=4)
    stage = st.PersonalizedEvaluate(holdout=0.3, epochs=3, lr=0.2, finetune_batch_size=4, finetune=["head"],
                                    clients=2)
    _ = st.Select(clients=1) >> stage
    stage.prepare(ds, ad)
    ctx = _ctx(ad.initial_params(), round=2, seed=5, dataset=ds, model_source=ad, last_round=True)
    ctx.mapper = _local_mapper(ad, ds, 5, 2)
    stage.run(ctx)
    ids = np.sort(stream(5, stage.tag, 2).choice(np.arange(4), size=2, replace=False))
    tot = {"after": [0.0, 0], "before": [0.0, 0]}
    n = 0
    for k in ids.tolist():
        x, y = _client_data(k)
        ho = heldout(5, k, len(y), 0.3)
        model = ad.to_module(ad.initial_params())
        for key in ("before", "after"):
            if key == "after":
                opt = torch.optim.SGD(model.head.parameters(), lr=0.2)
                rng = stream(5, stage.tag, 2, k)
                xt, yt = torch.from_numpy(x[~ho]), torch.from_numpy(y[~ho])
                model.train()
                for _ in range(3):
                    perm = torch.from_numpy(rng.permutation(len(yt)))
                    for i in range(0, len(yt), 4):
                        opt.zero_grad()
                        F.cross_entropy(model(xt[perm[i : i + 4]]), yt[perm[i : i + 4]]).backward()
                        opt.step()
            model.eval()
            with torch.no_grad():
                out = model(torch.from_numpy(x[ho]))
            tot[key][0] += float(F.cross_entropy(out, torch.from_numpy(y[ho]), reduction="sum"))
            tot[key][1] += int((out.argmax(1).numpy() == y[ho]).sum())
        n += int(ho.sum())
    assert ctx.metrics["personal_accuracy"] == pytest.approx(tot["after"][1] / n)
    assert ctx.metrics["personal_loss"] == pytest.approx(tot["after"][0] / n, rel=1e-4)
    assert ctx.metrics["personal_accuracy_before"] == pytest.approx(tot["before"][1] / n)
    assert ctx.metrics["personal_loss"] != ctx.metrics["personal_loss_before"]
    with pytest.raises(ConfigError, match="matches no parameter"):
        st.PersonalizedEvaluate(finetune=["tail"]).prepare(ds, ad)


# ======================================================================================== data, specs


def test_fedprox_synthetic_follows_the_papers_generator():
    train, test = fedprox_synthetic(1.0, 1.0, seed=0)
    assert train.num_clients == test.num_clients == 30
    sizes = np.array([train.num_samples(k) + test.num_samples(k) for k in range(30)])
    want = np.random.default_rng(0).lognormal(4, 2, 30).astype(int) + 50
    assert sizes.tolist() == want.tolist()
    for k in range(30):
        assert train.num_samples(k) == int(0.9 * sizes[k])
        d = train.load(k)
        assert d.x.shape[1] == 60 and d.x.dtype == np.float32 and set(np.unique(d.y)) <= set(range(10))
    again, _ = fedprox_synthetic(1.0, 1.0, seed=0)
    assert np.array_equal(again.load(5).x, train.load(5).x)
    assert len(train.test.y) == sum(test.num_samples(k) for k in range(30))
    # label skew: Synthetic(1,1) devices see few classes; Synthetic(0,0) iid-like ones more
    assert np.mean([len(np.unique(train.load(k).y)) for k in range(30)]) < 6


NEW_STAGES = [
    st.Select(clients=3, weighting="samples"),
    st.Stragglers(0.5, epochs=3, policy="drop"),
    st.LocalTrain(2, mu=0.1, freeze=["head"], holdout=0.2),
    st.Byzantine(0.1, attack="scale", scale=3.0),
    st.Compress(st.Int8(block=64, stochastic=False)),
    st.Compress("bf16"), st.Compress(st.TopK(0.02)),
    st.ServerOpt(st.ClipNorm(st.WeightedMean("uniform"), max_norm=2.0), "yogi", lr=0.03, beta2=0.9),
    st.Aggregate(st.Krum(2, m=3)), st.Aggregate(st.TrimmedMean(0.2)), st.Aggregate(st.Median()),
    st.PrivacyAccountant(1e-6, max_epsilon=4.0, method="pld"),
    st.Select(fraction=0.1, sampling="poisson"),
    st.ClipUpdate(), st.ClipUpdate(0.5, noise_multiplier=2.0),
    st.DPAggregate(1.1, server_lr=0.5),
    st.AdaptiveClip(0.2, target_quantile=0.7, lr=0.1, count_noise=2.0),
    st.FederatedEvaluate(3, clients=5, holdout=0.1),
    st.PersonalizedEvaluate(2, epochs=1, finetune=["head"]),
]


@pytest.mark.parametrize("stage", NEW_STAGES, ids=lambda s: type(s).__name__)
def test_every_new_stage_rebuilds_from_its_spec(stage):
    """settings() are the constructor's keywords: the spec rebuilds an equal stage (checkpoint resume)."""
    spec = describe([stage])
    again = _build(spec[0])  # one stage alone is not a complete pipeline, so not flgraph.spec.rebuild
    assert type(again) is type(stage)
    assert differences(spec, describe([again])) == []


def test_pipeline_checks_still_apply_to_new_stages():
    with pytest.raises(PipelineError, match="needs the round's clients"):
        Pipeline([st.Stragglers(0.5), st.Broadcast(), st.LocalTrain(), st.Aggregate()]).check()
    with pytest.raises(PipelineError, match="needs a client update"):
        _ = st.Select(clients=2) >> st.Broadcast() >> st.Byzantine()
