"""Oort on the DAG: the selector exact against an independent implementation, the fed-back statistics
exact, checkpoint + resume bit-exact, and a run on a cluster reached by address.

The reference selector below is written here from the paper's Algorithm 1 and FedScale's defaults, in
plain Python over per-client dicts; it shares only the seeded random generator with flgraph.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flgraph.stages.oort import STATS, oort_choice
from test_clusters import cli_cluster  # noqa: F401  (the fixture: dask scheduler + workers reached by address)

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st
from flgraph.rng import stage_tag, stream


class RefOort:
    """Oort's training selector, one dict per client: reward, duration, last round, count."""

    def __init__(self, sizes, step=20, delta=5.0, threshold=30.0, alpha=2.0, blacklist=-1, estimated=None):
        self.sizes = {i: float(s) for i, s in enumerate(sizes)}
        self.estimated = estimated  # every client's expected duration (FedScale registers it up front)
        self.arms = {i: {"reward": 0.0, "duration": 0.0 if estimated is None else float(estimated[i]), "last": 0,
                         "count": 0} for i in self.sizes}
        self.eps, self.step, self.delta, self.threshold = 0.9, step, delta, threshold
        self.alpha, self.blacklist = alpha, blacklist
        self.history, self.exploited = [], []

    def feedback(self, rnd, rows):
        for cid, util, dur in rows:
            a = self.arms[cid]
            a.update(reward=util, duration=dur, last=rnd)
            a["count"] += 1

    def select(self, k, rnd, rng):
        arms = self.arms
        ok = [c for c in self.exploited if arms[c]["last"] == rnd - 1]
        self.history.append(sum(arms[c]["reward"] for c in ok) / (1e-4 + len(ok)))
        if rnd >= 2 * self.step and rnd % self.step == 0:
            last, cur = sum(self.history[-2 * self.step:-self.step]), sum(self.history[-self.step:])
            if abs(cur - last) <= last * 0.1:
                self.threshold = min(100.0, self.threshold + self.delta)
            elif abs(cur - last) >= last * 5:
                self.threshold = max(self.delta, self.threshold - self.delta)
        banned = set()
        if self.blacklist >= 0:
            by_count = sorted(arms, key=lambda c: -arms[c]["count"])
            banned = {c for c in by_count if arms[c]["count"] > self.blacklist}
            banned = set([c for c in by_count if c in banned][: int(0.3 * len(arms))])
        keys = [c for c in arms if c not in banned]
        known = sorted(arms[c]["duration"] for c in arms if arms[c]["count"] > 0 or self.estimated is not None)
        prefer = math.inf
        if self.threshold < 100 and known:
            prefer = known[min(int(len(known) * self.threshold / 100.0), len(known) - 1)]

        def reward(c):
            return arms[c]["reward"] if arms[c]["count"] > 0 else self.sizes[c]

        def pen(c):
            d = arms[c]["duration"]
            return (prefer / max(1e-4, d)) ** self.alpha if d > prefer else 1.0

        moving = sorted(reward(c) for c in keys if reward(c) > 0)
        clip = moving[min(int(len(moving) * 0.9), len(moving) - 1)]
        lo = moving[0] * 0.999
        span = max(moving[-1] - lo, 1e-4)
        scores = {}
        for c in keys:
            if arms[c]["count"] > 0:
                sc = (min(arms[c]["reward"], clip) - lo) / span + math.sqrt(0.1 * math.log(rnd) / arms[c]["last"])
                scores[c] = abs(sc * pen(c))
        self.eps = max(self.eps * 0.98, 0.3)
        unexplored = [c for c in keys if arms[c]["count"] == 0]
        n_exploit = min(k - int(k * self.eps), len(scores))
        n_explore = min(len(unexplored), k - n_exploit)
        n_exploit = min(k - n_explore, len(scores))
        exploit = []
        if n_exploit:
            ranked = sorted(scores, key=lambda c: scores[c], reverse=True)
            cut = scores[ranked[min(n_exploit, len(ranked) - 1)]] * 0.05
            pool = []
            for c in ranked:
                if scores[c] < cut and len(pool) > 10 * n_exploit:
                    break
                pool.append(c)
            total = max(1e-4, sum(scores[c] for c in pool))
            exploit = list(rng.choice(pool, n_exploit, replace=False, p=[scores[c] / total for c in pool]))
        explore = []
        if n_explore:
            init = {c: self.sizes[c] * pen(c) for c in unexplored}
            pool = sorted(init, key=lambda c: init[c], reverse=True)[: min(int(5 * n_explore), len(init))]
            total = max(1e-4, sum(init[c] for c in pool))
            explore = list(rng.choice(pool, n_explore, replace=False, p=[init[c] / total for c in pool]))
        self.exploited = [int(c) for c in exploit]
        return [int(c) for c in explore + exploit]


@pytest.mark.parametrize(("blacklist", "estimate"), [(-1, False), (2, False), (-1, True), (3, True)])
def test_selector_equals_an_independent_implementation(blacklist, estimate):
    n, k, rounds = 60, 8, 12
    rs = np.random.default_rng(7)
    sizes = rs.integers(5, 200, n).astype(float)
    util_of = rs.gamma(2.0, 30.0, (rounds + 1, n))
    dur_of = rs.lognormal(3.0, 1.0, (rounds + 1, n))
    cfg = st.OortSelect(clients=k, pacer_step=3, blacklist_rounds=blacklist)
    state = cfg.init_state(None)  # type: ignore[arg-type]
    stats = {s: np.zeros(n, np.int64 if s in ("oort_round", "oort_count") else np.float64) for s in STATS}
    est = rs.lognormal(3.0, 1.0, n) if estimate else None
    ref = RefOort(sizes, step=3, blacklist=blacklist, estimated=est)
    for rnd in range(1, rounds + 1):
        got = oort_choice(cfg, state, stats, sizes, np.ones(n, bool), k, rnd, stream(5, 9, rnd), est)
        want = ref.select(k, rnd, stream(5, 9, rnd))
        assert got.tolist() == want, rnd
        assert state["threshold"] == ref.threshold and state["exploration"] == ref.eps
        counted = [int(c) for c in got[: k - 2]]  # two of the chosen give no feedback (dropped)
        rows = [(c, float(util_of[rnd, c]), float(dur_of[rnd, c])) for c in counted]
        ref.feedback(rnd, rows)
        for c, u, d in rows:
            stats["oort_utility"][c], stats["oort_duration"][c] = u, d
            stats["oort_round"][c] = rnd
            stats["oort_count"][c] += 1
    assert ref.threshold != 30.0  # the pacer moved the preferred duration


NUM_CLIENTS, K, BATCH, LR = 24, 4, 8, 0.1


def _data() -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=NUM_CLIENTS, samples_per_client=20, num_features=6,
                                            num_classes=3, alpha=0.3, seed=3)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return fg.models.mlp(6, [8], 3)


DEVICES = fg.sim.DevicePopulation.lognormal(NUM_CLIENTS, seed=1)


def _pipeline() -> fg.Pipeline:
    return recipes.oort(clients=K, simulate=st.Simulate(DEVICES), batch_size=BATCH, lr=LR, evaluate_every=None)


def _feedback(run: fg.Run) -> dict[str, np.ndarray]:
    """The kept statistics (over the explored clients, sorted by id) as arrays over the population."""
    key = next(k for k in run.state.stage_states if k.endswith("oort-feedback"))
    kept = run.state.stage_states[key]
    out = {s: np.zeros(NUM_CLIENTS, np.asarray(kept[s]).dtype) for s in STATS}
    for s in STATS:
        out[s][np.asarray(kept["oort_ids"])] = kept[s]  # the dataset's ids are 0..NUM_CLIENTS-1
    return out


def _utility_row(data, model, flat_before: np.ndarray, cid: int, rnd: int, seed: int) -> tuple[float, float]:
    """Train client ``cid`` from ``flat_before`` (plain torch, one epoch of SGD), then U_i and t_i."""
    net = fg.models.mlp(6, [8], 3)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(flat_before.copy()), net.parameters())
    xs, ys = (torch.as_tensor(a) for a in data.load(cid))
    perm = torch.from_numpy(stream(seed, stage_tag("LocalTrain", 0), rnd, cid).permutation(len(ys)))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for i in range(0, len(ys), BATCH):
        opt.zero_grad()
        F.cross_entropy(net(xs[perm[i:i + BATCH]]), ys[perm[i:i + BATCH]]).backward()
        opt.step()
    with torch.no_grad():
        losses = F.cross_entropy(net(xs), ys, reduction="none").double()
    util = len(ys) * math.sqrt(float((losses ** 2).mean()))
    p = DEVICES.profile(cid)
    nbytes = flat_before.nbytes
    return util, nbytes / p.down_bps + len(ys) / p.speed + nbytes / p.up_bps


def test_fed_back_statistics_equal_an_independent_computation(client2):
    data = _data()
    with fg.Run(_pipeline(), model=_model(), data=data, seed=0, cluster=client2, progress=False,
                dashboard=False, metrics_log=None) as run:
        for rnd in range(1, 4):
            before = run.state.params.flat.copy()
            run.fit(1)
            fb = _feedback(run)
            counted = np.flatnonzero(fb["oort_round"] == rnd)
            assert len(counted) == K  # the first K of ceil(1.3 K) to finish
            for c in counted:
                util, dur = _utility_row(data, _model(), before, int(c), rnd, 0)
                assert abs(fb["oort_utility"][c] - util) <= 1e-6 * util, (rnd, c)
                assert abs(fb["oort_duration"][c] - dur) <= 1e-9 * dur, (rnd, c)
            assert run.history[-1]["clients_dropped"] == math.ceil(1.3 * K) - K


def test_oort_resumes_bit_exactly_with_its_state(client2, tmp_path):
    with fg.Run(_pipeline(), model=_model(), data=_data(), seed=0, cluster=client2, progress=False,
                dashboard=False, metrics_log=None) as run:
        run.fit(4)
        whole, stats = run.state.params.flat.copy(), _feedback(run)
        states = {k: dict(v) for k, v in run.state.stage_states.items()}
    path = tmp_path / "run.zarr"
    with fg.Run(_pipeline(), model=_model(), data=_data(), seed=0, cluster=client2, progress=False,
                dashboard=False, checkpoint=str(path)) as run:
        run.fit(2)
    with fg.resume(str(path), cluster=client2, pipeline=_pipeline(), progress=False, dashboard=False) as run:
        assert run.state.round == 2
        run.fit(2)
        assert np.array_equal(run.state.params.flat, whole)
        for s, v in _feedback(run).items():
            assert np.array_equal(v, stats[s]), s
        sel = next(k for k in states if k.endswith("oort-select"))
        for name, v in states[sel].items():
            assert np.array_equal(np.asarray(run.state.stage_states[sel][name]), np.asarray(v)), name


def test_oort_on_a_cluster_reached_by_address_gives_the_same_bits(cli_cluster, client1):  # noqa: F811
    out = []
    for cluster, workers in ((cli_cluster, 2), (client1, None)):
        with fg.Run(_pipeline(), model=_model(), data=_data(), seed=2, cluster=cluster, workers=workers,
                    progress=False, dashboard=False, metrics_log=None) as run:
            run.fit(3)
            out.append((run.state.params.flat.copy(), _feedback(run)))
    assert np.array_equal(out[0][0], out[1][0])
    for s in STATS:
        assert np.array_equal(out[0][1][s], out[1][1][s]), s


def test_oort_select_refuses_settings_it_cannot_honour():
    with pytest.raises(fg.ConfigError, match="exploration"):
        st.OortSelect(clients=4, exploration=0.2, exploration_min=0.3)
    with pytest.raises(fg.ConfigError, match="pacer_step"):
        st.OortSelect(clients=4, pacer_step=0)
    with pytest.raises(fg.PipelineError, match="oort_"):
        (st.OortSelect(clients=4) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate()).check()
