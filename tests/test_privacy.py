"""Central and local DP: the accountant against dp-accounting, Poisson selection, adaptive clipping, the
privacy budget's stop, the secret noise keys, and DP-FedAvg end to end on real Dask clusters."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from flgraph.stages.dp_noise import InsecureNoiseWarning, gaussian, insecure_key, key_bytes

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st
from flgraph.context import ClientSet, ClientWork, RoundContext, Update
from flgraph.data import FederatedDataset
from flgraph.errors import ConfigError, PipelineError
from flgraph.params import Params, ParamSpec

SPEC = ParamSpec.from_arrays({"w": np.zeros(6, np.float32)})


def _dataset(n: int) -> FederatedDataset:
    return FederatedDataset.from_function(lambda k: (np.zeros((2, 1), np.float32), np.zeros(2, np.int64)), n)


def _ctx(rnd: int, ds: FederatedDataset, state: dict, **kw) -> RoundContext:
    ctx = RoundContext(rnd, 0, Params(SPEC, SPEC.empty()), ds, None, False)
    ctx.state = state
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def _accounted(pipeline: fg.Pipeline, population: int, rounds: int | tuple[int, ...]) -> list[float]:
    """The pipeline's PrivacyAccountant alone: epsilon after each of ``rounds`` (a count: 1..count), each
    from the state the rounds before it leave."""
    pipeline.check()
    for s in pipeline:
        if hasattr(s, "see_pipeline"):
            s.see_pipeline(pipeline.stages)
    ds = _dataset(population)
    for s in pipeline:
        if isinstance(s, (st.PrivacyAccountant, st.DPAggregate)):
            s.prepare(ds, None)
    acc = pipeline.stages[0]
    assert isinstance(acc, st.PrivacyAccountant)
    state = acc.init_state(Params(SPEC, SPEC.empty()))
    assert state["events"].shape == (0, 4)
    out = []
    for r in range(1, rounds + 1) if isinstance(rounds, int) else rounds:
        ctx = _ctx(r, ds, {"events": np.tile(np.asarray(acc.round_row()), (r - 1, 1))})
        acc.run(ctx)
        assert ctx.state["events"].shape == (r, 4)
        out.append(ctx.metrics["epsilon"])
    return out


def _reference(event, rounds: int, delta: float, *, method: str, replace_one: bool) -> float:
    """dp-accounting composed directly: ``rounds`` self-compositions of one round's event."""
    rel = dpa.NeighboringRelation.REPLACE_ONE if replace_one else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    acc = (dpa.rdp.RdpAccountant(neighboring_relation=rel) if method == "rdp"
           else dpa.pld.PLDAccountant(neighboring_relation=rel))
    return float(acc.compose(dpa.SelfComposedDpEvent(event, rounds)).get_epsilon(delta))


@pytest.mark.parametrize(("q", "z", "method"), [(0.01, 1.1, "rdp"), (0.05, 0.8, "rdp"), (0.2, 2.0, "rdp"),
                                                (0.01, 1.1, "pld"), (0.2, 2.0, "pld")])
def test_poisson_epsilon_equals_dp_accounting(q, z, method):
    rounds, delta = (1, 10, 200), 1e-6
    p = recipes.dp_fedavg(fraction=q, noise_multiplier=z, adaptive=False, clip=1.0, target_delta=delta,
                          accountant=method, evaluate_every=None)
    got = _accounted(p, 2000, rounds)
    for r, eps in zip(rounds, got):
        want = _reference(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), r, delta, method=method,
                          replace_one=False)
        assert eps == pytest.approx(want, rel=1e-9)
    assert got[0] < got[1] < got[2]


@pytest.mark.parametrize(("n", "z"), [(20, 1.0), (100, 1.5)])
def test_fixed_size_epsilon_is_sampling_without_replacement_under_replace_one(n, z):
    """n of N clients without replacement: the replace-one relation, so the clipped sum moves by 2 C and the
    Gaussian's multiplier per unit of sensitivity is z / 2."""
    p = recipes.dp_fedavg(n, noise_multiplier=z, adaptive=False, clip=1.0, sampling="fixed", target_delta=1e-5,
                          evaluate_every=None)
    got = _accounted(p, 1000, (1, 25))
    for r, eps in zip((1, 25), got):
        want = _reference(dpa.SampledWithoutReplacementDpEvent(1000, n, dpa.GaussianDpEvent(z / 2)), r, 1e-5,
                          method="rdp", replace_one=True)
        assert eps == pytest.approx(want, rel=1e-9)


def test_adaptive_clipping_accounts_the_effective_multiplier_and_splits_the_noise():
    """Andrew et al.: z is the effective multiplier; the update gets (z^-2 - (2 sigma_b)^-2)^-1/2."""
    p = recipes.dp_fedavg(fraction=0.05, noise_multiplier=1.2, target_delta=1e-5, evaluate_every=None)
    got = _accounted(p, 2000, (30,))  # expected clients 100, sigma_b = 5
    want = _reference(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.2)), 30, 1e-5, method="rdp",
                      replace_one=False)
    assert got[-1] == pytest.approx(want, rel=1e-9)
    agg = next(s for s in p if isinstance(s, st.DPAggregate))
    assert agg._setup is not None and agg._setup.update_noise == pytest.approx((1.2**-2 - 10.0**-2) ** -0.5)
    # and the split is what makes the two releases together a Gaussian of multiplier z
    assert (agg._setup.update_noise**-2 + (2 * 5.0) ** -2) ** -0.5 == pytest.approx(1.2)


def test_local_dp_is_a_gaussian_per_round_without_amplification():
    p = recipes.dp_fedavg(10, noise_multiplier=4.0, adaptive=False, local=True, clip=1.0, evaluate_every=None)
    got = _accounted(p, 500, (12,))
    want = _reference(dpa.GaussianDpEvent(2.0), 12, 1e-5, method="rdp", replace_one=True)
    assert got[-1] == pytest.approx(want, rel=1e-9)


def test_pipelines_dp_cannot_account_are_refused():
    with pytest.raises(ConfigError, match="no analysis of sampling without replacement"):
        _accounted(recipes.dp_fedavg(10, sampling="fixed", accountant="pld", adaptive=False, clip=1.0), 100, 1)
    no_clip = (st.PrivacyAccountant() >> st.Select(fraction=0.1, sampling="poisson") >> st.Broadcast()
               >> st.LocalTrain() >> st.DPAggregate(1.0))
    with pytest.raises(PipelineError, match="one ClipUpdate"):
        _accounted(no_clip, 1000, 1)
    late = (st.Select(fraction=0.1, sampling="poisson") >> st.Broadcast() >> st.LocalTrain() >> st.ClipUpdate(1.0)
            >> st.DPAggregate(1.0) >> st.PrivacyAccountant())
    with pytest.raises(PipelineError, match="first in the round"):
        late.stages[-1].see_pipeline(late.stages)
    twice = (st.PrivacyAccountant() >> st.Select(10) >> st.Broadcast() >> st.LocalTrain()
             >> st.ClipUpdate(1.0, noise_multiplier=1.0) >> st.DPAggregate(1.0))
    with pytest.raises(PipelineError, match="add the noise once"):
        _accounted(twice, 100, 1)
    with pytest.raises(ConfigError, match="2 \\* count_noise > noise_multiplier"):
        _accounted(recipes.dp_fedavg(fraction=0.01, noise_multiplier=1.0, evaluate_every=None), 1000, 1)
    with pytest.raises(ConfigError, match="independently"):
        st.Select(fraction=0.1, sampling="poisson", sampler=lambda *a: [0])
    buffered = (st.Select(fraction=0.5, sampling="poisson") >> st.Broadcast() >> st.LocalTrain()
                >> st.BufferedAggregate(2))
    with pytest.raises(ConfigError, match="one at a time"):
        fg.Run(buffered, model=fg.models.mlp(1, [2], 2), data=_dataset(100), progress=False, dashboard=False)
    with pytest.raises(ConfigError, match="may well select nobody"):
        st.Select(fraction=0.01, sampling="poisson").prepare(_dataset(100), None)


# ---------------------------------------------------------------------------------------- Poisson Select


def test_poisson_select_includes_each_client_with_probability_q_and_is_reproducible():
    q, n, rounds = 0.1, 2000, 60
    sel = st.Select(fraction=q, sampling="poisson")
    ds = _dataset(n)
    counts = np.zeros(n)
    sizes = []
    for r in range(1, rounds + 1):
        ctx = _ctx(r, ds, {})
        sel.run(ctx)
        ids = ctx.clients.ids
        assert len(np.unique(ids)) == len(ids)
        counts[ids] += 1
        sizes.append(len(ids))
        again = _ctx(r, ds, {})
        st.Select(fraction=q, sampling="poisson").run(again)
        assert np.array_equal(again.clients.ids, ids)  # the same seed and round: the same clients
    total = counts.sum()
    # total inclusions ~ Binomial(n * rounds, q): within 4 standard deviations (fixed seed: deterministic)
    assert abs(total - n * rounds * q) < 4 * math.sqrt(n * rounds * q * (1 - q))
    # per client ~ Binomial(rounds, q); round sizes ~ Binomial(n, q): their spreads are the binomial ones
    assert np.var(counts) == pytest.approx(rounds * q * (1 - q), rel=0.1)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.5)
    assert len(set(sizes)) > 10  # the round's size varies, unlike a fixed-size draw
    ahead = sel.lookahead(7, 0, ds)
    ctx = _ctx(7, ds, {})
    st.Select(fraction=q, sampling="poisson").run(ctx)
    assert ahead is not None and np.array_equal(ahead.ids, ctx.clients.ids)


# ---------------------------------------------------------------------------------------- adaptive clipping


def _work(delta: np.ndarray, clip: float) -> ClientWork:
    ds = _dataset(4)
    work = ClientWork(3, 1, 0, 0, Params(SPEC, SPEC.empty()), ds, ClientSet(np.array([1])), None)
    work.update = Update(1, 2, 2, delta.astype(np.float32))
    work.values = {"clip_norm": np.array([clip], np.float32)}
    return work


def test_clip_update_clips_and_reports_the_bit():
    big = np.array([3.0, 4.0, 0, 0, 0, 0])
    work = _work(big, 2.0)
    st.ClipUpdate().run(work)
    assert np.allclose(work.update.delta, big * 2.0 / 5.0) and work.outputs["clip_bit"].delta.tolist() == [0.0]
    work = _work(big / 10, 2.0)
    st.ClipUpdate().run(work)
    assert np.allclose(work.update.delta, big / 10) and work.outputs["clip_bit"].delta.tolist() == [1.0]
    fixed = _work(big, 0.0)
    st.ClipUpdate(1.0).run(fixed)
    assert np.linalg.norm(fixed.update.delta) == pytest.approx(1.0) and "clip_bit" not in fixed.outputs


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clip_norm_tracks_the_target_quantile_of_the_update_norms(quantile):
    """Update norms ~ LogNormal(0, 0.5): the gamma-quantile is exp(0.5 Phi^-1(gamma)) (1.0 for the median,
    1.523 for 0.8). From C = 0.1, with the count noised (sigma_b = m / 20 = 5, m = 100), after 150 rounds the
    mean clip norm of the last 50 rounds is within 10% of the true quantile."""
    from statistics import NormalDist

    true = math.exp(0.5 * NormalDist().inv_cdf(quantile))
    with pytest.warns(InsecureNoiseWarning):
        ac = st.AdaptiveClip(0.1, target_quantile=quantile, lr=0.2, insecure_seed=3)
    p = (st.Select(fraction=0.1, sampling="poisson") >> st.Broadcast("params", "clip_norm") >> st.LocalTrain()
         >> st.ClipUpdate() >> {"update": st.Aggregate(st.Mean()), "clip_bit": st.Aggregate(st.Mean())} >> ac)
    ds = _dataset(1000)
    ac.see_pipeline(p.stages)
    ac.prepare(ds, None)
    state = ac.init_state(Params(SPEC, SPEC.empty()))
    rng = np.random.default_rng(0)
    clips = []
    for r in range(1, 151):
        clip = float(state["clip_norm"][0])
        norms = rng.lognormal(0.0, 0.5, 100)
        bits = (norms <= clip).astype(np.float64)
        ctx = _ctx(r, ds, dict(state), aggregates={"clip_bit": (np.array([bits.mean()]), 100.0)})
        ac.run(ctx)
        state = ctx.state
        clips.append(float(state["clip_norm"][0]))
    assert clips[0] < 0.2  # it starts far below and climbs geometrically
    assert np.mean(clips[-50:]) == pytest.approx(true, rel=0.1)


# ---------------------------------------------------------------------------------------- runs on Dask


def _data(n: int = 300):
    return fg.data.synthetic_classification(num_clients=n, samples_per_client=10, num_features=6, num_classes=3,
                                            seed=0, test_samples=0, signal=1.0)


def _model():
    import torch

    torch.manual_seed(0)
    return fg.models.mlp(6, [8], 3)


def _run(pipeline, cluster, path=None, **kw) -> fg.Run:
    return fg.Run(pipeline, model=_model(), data=kw.pop("data", None) or _data(), seed=0, cluster=cluster,
                  progress=False, dashboard=False, metrics_log="auto" if path else None, checkpoint=path, **kw)


def _dp(**kw) -> fg.Pipeline:
    base = dict(fraction=0.1, noise_multiplier=1.0, clip=0.5, lr=0.2, batch_size=5, evaluate_every=None)
    return recipes.dp_fedavg(**{**base, **kw})


def test_max_epsilon_stops_before_the_round_that_would_exceed_it_and_resume_stays_stopped(client1, tmp_path):
    eps = _accounted(_dp(adaptive=False), 300, 4)
    budget = (eps[2] + eps[3]) / 2  # room for 3 rounds, not 4
    path = tmp_path / "run.zarr"
    with _run(_dp(adaptive=False, max_epsilon=budget), client1, fg.Checkpoints(path, every=2)) as run:
        history = run.fit(10)
        assert run.round == 3 and len(history) == 3 and run.stopped is not None
        assert "round 4 would bring epsilon" in run.stopped and f"{eps[3]:.4g}" in run.stopped
        assert [r["epsilon"] for r in history] == pytest.approx(eps[:3])
        assert max(r["epsilon"] for r in history) <= budget
        assert run.fit(5) is history and run.round == 3  # asked again: no round runs
    again = fg.resume(path, cluster=client1, progress=False, dashboard=False)
    with again:
        assert again.round == 3 and again.remaining == 0  # round 3 committed although every=2 skipped it
        again.fit(2)
        assert again.round == 3 and again.stopped is not None and len(again.history) == 3


def test_secret_noise_same_seed_differs_resume_is_bit_exact_and_public_parts_hold_no_key(client1, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    with _run(_dp(), client1, fg.Checkpoints(a, every=1, keep_last=10)) as run:
        run.fit(2)
        shutil.copytree(a, b)  # the run as it stood after round 2
        run.fit(2)
        uninterrupted = run.state.params.flat.copy()
        states = run.state.stage_states
        keys = [key_bytes(v["noise_key"]) for v in states.values() if "noise_key" in v]
        rows = list(run.history)
    with fg.resume(b, cluster=client1, progress=False, dashboard=False) as resumed:
        resumed.fit(2)
        assert np.array_equal(resumed.state.params.flat, uninterrupted)  # bit-exact: the keys were restored
    with _run(_dp(), client1) as other:  # the same seed, a fresh key
        other.fit(4)
        assert not np.array_equal(other.state.params.flat, uninterrupted)
    # the keys: two (the update's and the clipped count's), drawn from the OS, not derivable from the seed
    assert len(keys) == 2 and len(set(keys)) == 2 and insecure_key(0) not in keys
    assert all(r["dp_clip_norm"] > 0 and "dp_insecure_noise" not in r for r in rows)
    # the public parts (config and spec, metrics, params, logs) do not hold a key, in any encoding; only the
    # stage-state arrays of the snapshots (the secret part) do
    public = [f for f in Path(a).rglob("*") if f.is_file() and "/state/" not in f.as_posix()]
    assert public and any(f.name == "metrics.jsonl" for f in public)
    for f in public:
        blob = f.read_bytes()
        for key in keys:
            assert key not in blob and key.hex().encode() not in blob and str(list(key)).encode() not in blob
    secret = [f for f in Path(a).rglob("*") if f.is_file() and "/state/" in f.as_posix() and "noise_key" in
              f.as_posix()]
    assert secret and any(keys[0] in f.read_bytes() for f in secret)
    # the noise of round 1 under the key the public seed would give is not the run's
    assert not np.array_equal(gaussian(insecure_key(0), "update", 1, 8), gaussian(keys[0], "update", 1, 8))


def test_insecure_seed_warns_is_in_the_spec_and_reproduces(client1):
    with pytest.warns(InsecureNoiseWarning, match="NOT differentially private"):
        p = _dp(insecure_seed=5)
    got = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureNoiseWarning)
            pipeline = _dp(insecure_seed=5)
        with _run(pipeline, client1) as run:
            run.fit(2)
            got.append(run.state.params.flat.copy())
            assert run.history.last("dp_insecure_noise") == 1
            assert "insecure_seed=5" in repr(run.pipeline)
    assert np.array_equal(got[0], got[1])
    assert "insecure_seed" in str(fg.spec.describe(p))


def test_local_dp_run_keeps_each_clients_key_on_the_client(client1):
    with _run(_dp(adaptive=False, local=True, noise_multiplier=8.0, fraction=None, clients=20), client1) as run:
        run.fit(2)
        assert run.history.last("epsilon") == pytest.approx(
            _reference(dpa.GaussianDpEvent(4.0), 2, 1e-5, method="rdp", replace_one=True), rel=1e-9)
        assert np.isfinite(run.state.params.flat).all()


def test_dp_fedavg_reaches_its_stated_accuracy_at_its_stated_epsilon(client2):
    """1,000 clients (20 samples each, 3 Gaussian classes, Dirichlet label skew), 5% per round by Poisson
    sampling, z = 1, adaptive clipping from C = 0.1: 20 rounds spend epsilon 2.48 at delta 1e-5 and reach
    accuracy >= 0.80 (0.89 here; FedAvg without noise: 0.88)."""
    data = fg.data.synthetic_classification(num_clients=1000, samples_per_client=20, num_features=8, num_classes=3,
                                            seed=0, test_samples=600, signal=1.0)
    import torch

    torch.manual_seed(0)
    p = recipes.dp_fedavg(fraction=0.05, noise_multiplier=1.0, clip=0.1, target_delta=1e-5, max_epsilon=2.5,
                          lr=0.3, batch_size=10, evaluate_every=5)
    with fg.Run(p, model=fg.models.mlp(8, [16], 3), data=data, seed=0, cluster=client2, progress=False,
                dashboard=False, metrics_log=None) as run:
        history = run.fit(20)
    assert run.stopped is None and len(history) == 20
    assert history.last("epsilon") == pytest.approx(2.48, abs=0.01) and history.last("dp_delta") == 1e-5
    assert history.last("accuracy") >= 0.80
    assert history.last("dp_clip_norm") > 0.1  # the clip norm grew from its small start


def test_dashboard_shows_epsilon():
    from flgraph.observe.dashboard import RunBoard
    from flgraph.observe.dashboard_page import FLPage

    board = RunBoard()
    for r in (1, 2):
        board.feed({"kind": "round", "token": "t1", "target_round": 3,
                    "row": {"round": r, "loss": 1.0, "accuracy": 0.5, "epsilon": 0.5 * r}})
    page = FLPage(board)
    assert page.refresh()
    assert page.source.data["epsilon"] == [0.5, 1.0]
    names = {m.name for m in page.root.references() if getattr(m, "name", None)}
    assert "fl-epsilon" in names and "epsilon <b>1.0000</b>" in page.status.text
