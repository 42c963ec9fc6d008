"""Secure aggregation (SecAgg+) as stages: the protocol's parts, and whole rounds on real Dask clusters.

The expected sums are computed here independently: each client's update is a known function of its id and
the round (:class:`KnownUpdate`), clipped and quantised in the test with the client's own rounding stream,
and summed as plain integers.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import flgraph as fg
from flgraph import stages as st
from flgraph.context import ClientWork, Update
from flgraph.graph import ClientStage
from flgraph.rng import stream
from flgraph.secure import DropoutError, Dropouts, SecAggConfig, client, keys, ring, shamir
from flgraph.secure.masks import expand
from flgraph.secure.neighbours import neighbour_graph

SIZE_HINT = 6 * 8 + 8 + 8 * 3 + 3  # mlp(6, [8], 3)


class KnownUpdate(ClientStage):
    """Writes a known update: uniform in [-1.5, 1.5] (so some coordinates get clipped), from (client, round)."""

    requires: ClassVar[frozenset[str]] = frozenset({"model"})
    provides: ClassVar[frozenset[str]] = frozenset({"update"})

    def run(self, work: ClientWork) -> None:
        size = work.global_params.spec.size
        delta = np.random.default_rng([work.client, work.round]).uniform(-1.5, 1.5, size).astype(np.float32)
        work.update = Update(work.client, 10, work.round - 1, delta)


def known_delta(cid: int, rnd: int, size: int) -> np.ndarray:
    return np.random.default_rng([cid, rnd]).uniform(-1.5, 1.5, size).astype(np.float32)


def plain_quantised(delta: np.ndarray, cfg: SecAggConfig, seed: int, tag: int, rnd: int, cid: int) -> np.ndarray:
    """Clip and quantise as the paper's clients do, written out here (unbiased stochastic rounding)."""
    c, levels = cfg.clip, cfg.levels
    x = (np.minimum(np.maximum(delta.astype(np.float64), -c), c) + c) / (2 * c) * (levels - 1)
    floor = np.floor(x)
    u = stream(seed, tag, rnd, cid).random(len(x))
    return np.minimum(floor + (u < x - floor), levels - 1).astype(object)  # Python ints: no wrap-around


def data(n: int = 24) -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=n, samples_per_client=10, num_features=6, num_classes=3,
                                            alpha=0.5, seed=2, test_samples=60)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return fg.models.mlp(6, [8], 3)


def known_pipeline(cfg: SecAggConfig, clients: int, dropouts: Dropouts | None = None) -> fg.Pipeline:
    return (st.Select(clients) >> st.Broadcast() >> st.SecureSetup(cfg, dropouts=dropouts) >> KnownUpdate()
            >> st.SecureMask(cfg) >> st.SecureAggregate(cfg))


def fit(pipeline: fg.Pipeline, cluster: Any, rounds: int, **kw: Any) -> fg.Run:
    run = fg.Run(pipeline, model=model(), data=data(), seed=5, cluster=cluster, progress=False, metrics_log=None,
                 dashboard=False, evaluate="never", **kw)
    if rounds:
        run.fit(rounds=rounds)
    return run


def expected_total(p: fg.Pipeline, survivors: np.ndarray, rnd: int, seed: int, size: int) -> np.ndarray:
    cfg = p.stages[-1].config
    mask = p.stages[4]
    total = sum(plain_quantised(known_delta(int(c), rnd, size), cfg, seed, mask.tag, rnd, int(c)) for c in survivors)
    return np.array([int(v) % cfg.modulus for v in total], dtype=np.uint64)


# -- the protocol's parts ---------------------------------------------------------------------------------

def test_shamir_reconstructs_with_threshold_shares_and_not_with_fewer():
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6], threshold=4)
    for subset in itertools.combinations(shares, 4):
        assert shamir.reconstruct(list(subset)) == secret
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct(list(subset)) != secret
    assert shamir.reconstruct(shares) == secret  # more than the threshold also works
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(secret, [1, 2], threshold=3)


@pytest.mark.parametrize(("n", "k"), [(10, 4), (11, 6), (30, 8), (7, 6), (7, 20), (2, 1)])
def test_neighbour_graph_is_k_regular_and_symmetric(n, k):
    g = neighbour_graph(n, k, np.random.default_rng(n))
    degree = min(k, n - 1)
    for i, nb in enumerate(g):
        assert len(nb) == len(set(nb.tolist())) == degree and i not in nb.tolist()
        for j in nb.tolist():
            assert i in g[j].tolist()
    with pytest.raises(ValueError, match="even"):
        neighbour_graph(10, 3, np.random.default_rng(0))


def test_pairwise_masks_cancel_and_masks_are_uniform():
    """Three clients agreeing keys pairwise: their +/- masks sum to zero mod M; a mask is uniform."""
    m, size = 2**32, 4000
    pairs = [keys.new_key_pair() for _ in range(3)]
    total = np.zeros(size, object)
    for u, v in itertools.permutations(range(3), 2):
        mask = expand(client.mask_key(pairs[u][0], pairs[v][1], "r"), size, m, b"pair").astype(object)
        total = total + (mask if u < v else -mask)
    assert all(int(x) % m == 0 for x in total)
    sample = expand(b"\x07" * 32, 200_000, m) / m
    counts = np.bincount((sample * 16).astype(int), minlength=16)
    chi2 = float(((counts - len(sample) / 16) ** 2 / (len(sample) / 16)).sum())
    assert chi2 < 50  # 15 degrees of freedom: p ~ 1e-5
    odd = expand(b"\x01" * 32, 50_000, 1_000_003)  # not a power of two: rejection sampling
    assert odd.max() < 1_000_003 and abs(float(odd.mean()) / 1_000_003 - 0.5) < 0.01


def test_ring_seals_secrets_that_only_ring_holders_open():
    offers = {"w0": ring.offer("t", "w0"), "w1": ring.offer("t", "w1")}
    wrapped = ring.make("t", offers, "w0")
    ring.join("t", wrapped, "w1")
    box = ring.seal("t", b"client secret", b"ctx")
    assert b"client secret" not in box and ring.open_sealed("t", box, b"ctx") == b"client secret"
    with pytest.raises(keys.BoxError):
        ring.open_sealed("t", box, b"another client")
    ring.drop("t")
    with pytest.raises(ring.RingError, match="holds no key"):
        ring.open_sealed("t", box, b"ctx")


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(fg.ConfigError, match="wrap around"):
        SecAggConfig(levels=2**20, modulus=2**24).check_round(100)
    with pytest.raises(fg.ConfigError, match="threshold=9 exceeds"):
        SecAggConfig(neighbours=6, threshold=9).check_round(20)
    with pytest.raises(fg.ConfigError, match="even degree"):
        SecAggConfig(neighbours=5).check_round(20)
    with pytest.raises(fg.ConfigError, match="clip"):
        SecAggConfig(clip=0.0)
    with pytest.raises(fg.ConfigError, match="SecAggConfig"):
        st.SecureMask({"clip": 1.0})  # type: ignore[arg-type]


def test_stages_with_different_settings_are_refused(client2):
    other = SecAggConfig(neighbours=100, threshold=5, clip=0.5, levels=2**12)
    p = (st.Select(10) >> st.Broadcast() >> st.SecureSetup(COMPLETE) >> KnownUpdate() >> st.SecureMask(other)
         >> st.SecureAggregate(COMPLETE))
    run = fit(p, client2, 0)
    with pytest.raises(fg.ClientError, match="disagree"):
        run.fit(rounds=1)
    run.close()


def test_the_recipe_round_trips_through_the_pipeline_spec():
    from flgraph.spec import describe, differences, rebuild

    p = fg.recipes.fedavg_secagg(clients=20, neighbours=6, threshold=4, clip=0.5, dropouts=Dropouts(after_keys=1))
    spec = describe(p)
    assert differences(spec, describe(rebuild(spec))) == []
    assert spec[2]["settings"]["config"]["settings"]["threshold"] == 4


# -- whole rounds on Dask --------------------------------------------------------------------------------

COMPLETE = SecAggConfig(neighbours=100, threshold=5, clip=1.0, levels=2**12, modulus=2**32)  # 10 clients: k = 9


@pytest.mark.parametrize("dropouts", [
    None,
    Dropouts(after_keys=2),
    Dropouts(after_shares=2),
    Dropouts(after_masking=2),
    Dropouts(during_unmasking=2),
    Dropouts(after_keys=1, after_shares=1, after_masking=1, during_unmasking=1),  # 9 - 4 = 5: the threshold
], ids=["none", "after-keys", "after-shares", "after-masking", "during-unmasking", "all-at-threshold"])
def test_unmasked_sum_equals_the_plain_quantised_sum(client2, dropouts):
    p = known_pipeline(COMPLETE, 10, dropouts)
    run = fit(p, client2, 0)
    start = run.params.flat.copy()
    run.fit(rounds=1)
    rep = p.stages[-1].last_round
    gone = dropouts.counts() if dropouts else (0, 0, 0, 0)
    assert len(rep.survivors) == 10 - gone[0] - gone[1]
    assert len(rep.dropped["after_keys"]) == gone[0] and len(rep.dropped["after_shares"]) == gone[1]
    assert len(rep.dropped["after_masking"]) == gone[2] and len(rep.dropped["during_unmasking"]) == gone[3]
    expected = expected_total(p, rep.survivors, 1, 5, run.params.spec.size)
    assert rep.total.dtype == np.uint64 and np.array_equal(rep.total, expected)
    n = len(rep.survivors)
    mean = (expected.astype(np.float64) * (2 * COMPLETE.clip / (COMPLETE.levels - 1)) - n * COMPLETE.clip) / n
    assert np.array_equal(run.params.flat, start + mean.astype(np.float32))
    run.close()


def test_secagg_plus_neighbour_graph_with_dropouts(client2):
    """k = 6 of 16 clients (SecAgg+), threshold 3, dropouts at three phases (at most 3 of any client's 6
    neighbours gone, wherever they fall): exact over the sparse graph."""
    cfg = SecAggConfig(neighbours=6, threshold=3, clip=1.0, levels=2**12)
    p = known_pipeline(cfg, 16, Dropouts(after_keys=1, after_shares=1, during_unmasking=1))
    run = fit(p, client2, 2)
    rep = p.stages[-1].last_round
    assert rep.neighbours == 6 and rep.threshold == 3 and len(rep.survivors) == 14
    assert len(rep.dropped["during_unmasking"]) == 1
    assert np.array_equal(rep.total, expected_total(p, rep.survivors, 2, 5, run.params.spec.size))
    run.close()


def test_below_threshold_the_round_fails_cleanly_and_the_run_goes_on(client2):
    p = known_pipeline(COMPLETE, 10, Dropouts(after_keys=1, after_shares=1, after_masking=2, during_unmasking=1,
                                             rounds=(2,)))
    run = fit(p, client2, 1)
    before = run.params.flat.copy()
    with pytest.raises(DropoutError, match=r"round 2 cannot be unmasked: .*fewer than threshold=5") as err:
        run.fit(rounds=1)
    assert "run the round again" in (err.value.fix or "")
    assert run.state.round == 1 and np.array_equal(run.params.flat, before)
    p.stages[2].dropouts = None  # the clients are back: the retried round completes
    run.fit(rounds=1)
    assert run.state.round == 2 and len(p.stages[-1].last_round.survivors) == 10
    run.close()


def test_bit_identical_with_one_and_two_workers(client1, client2):
    def once(cluster):
        p = fg.recipes.fedavg_secagg(clients=10, neighbours=4, threshold=2, clip=0.5, levels=2**16, batch_size=5,
                                     lr=0.2, evaluate_every=None, dropouts=Dropouts(after_shares=1, after_masking=1))
        run = fit(p, cluster, 2)
        out = run.params.flat.copy(), p.stages[-1].last_round.total.copy()
        run.close()
        return out

    (a, ta), (b, tb) = once(client1), once(client2)
    assert np.array_equal(ta, tb) and a.tobytes() == b.tobytes()


def test_the_driver_never_sees_an_individual_update(client2, monkeypatch):
    """Everything the driver receives from the clients in a round (phase answers, ring messages, partial
    sums: with chunk_size=1 each client's masked input arrives on its own) is recorded: no individual
    quantised update is among it, and the masked inputs look uniform over Z_M."""
    from flgraph.transports import dask as dask_transport

    from flgraph.local import rounds as local_rounds

    seen: list[Any] = []
    for module in (local_rounds, dask_transport):
        original = module.combine_partials

        def recording(reducer, a, b, original=original):
            for part in (a, b):
                if part.value is not None:
                    seen.append((part.value[0].copy(), list(part.value[1])))
            return original(reducer, a, b)

        monkeypatch.setattr(module, "combine_partials", recording)
    answers: list[Any] = []
    for name in ("map_clients", "on_every_worker", "on_one_worker"):
        original = getattr(dask_transport.DaskTransport, name)

        def keep(self, *args, original=original):
            out = original(self, *args)
            answers.append(out)
            return out

        monkeypatch.setattr(dask_transport.DaskTransport, name, keep)
    cfg = SecAggConfig(neighbours=4, threshold=3, clip=1.0, levels=2**12)
    p = known_pipeline(cfg, 8)
    run = fit(p, client2, 1, chunk_size=1)
    rep = p.stages[-1].last_round
    size = run.params.spec.size
    quantised = {int(c): np.array(plain_quantised(known_delta(int(c), 1, size), cfg, 5, p.stages[4].tag, 1, int(c)),
                                  dtype=np.uint64) for c in rep.survivors}
    singles = [v for v, ids in seen if len(ids) == 1]
    assert sorted(ids[0] for _, ids in [s for s in seen if len(s[1]) == 1]) == sorted(quantised)  # each on its own
    for value, _ in seen:
        for x in quantised.values():
            assert not np.array_equal(value, x)
    masked = np.concatenate(singles).astype(np.float64) / cfg.modulus
    assert abs(masked.mean() - 0.5) < 0.03 and masked.std() > 0.25  # quantised values would sit near 2**-21
    counts = np.bincount((masked * 8).astype(int), minlength=8)
    assert counts.min() > 0.6 * len(masked) / 8
    blobs = [b for b in _bytes_in(answers)]
    assert blobs and all(x.astype("<u8").tobytes()[:64] not in blob for blob in blobs for x in quantised.values())
    run.close()


def _bytes_in(obj: Any) -> list[bytes]:
    if isinstance(obj, bytes):
        return [obj]
    if isinstance(obj, dict):
        return [b for v in obj.values() for b in _bytes_in(v)]
    if isinstance(obj, list | tuple):
        return [b for v in obj for b in _bytes_in(v)]
    return []


def test_fedavg_with_secagg_matches_fedavg_within_quantisation(client2):
    """A scaled-down W1: FedAvg and FedAvg + SecAgg+ from the same start reach the same accuracy (within
    0.03) and parameters within a few quantisation steps (nothing is clipped at clip=1 here)."""
    population = fg.data.synthetic_classification(num_clients=40, samples_per_client=32, num_features=10,
                                                  num_classes=4, alpha=0.5, seed=7, test_samples=400)

    def final(p):
        torch.manual_seed(0)
        run = fg.Run(p, model=fg.models.mlp(10, [16], 4), data=population, seed=1, cluster=client2,
                     progress=False, metrics_log=None, dashboard=False)
        history = run.fit(rounds=5)
        out = run.params.flat.copy(), history.last("accuracy")
        run.close()
        return out

    train = {"clients": 10, "epochs": 2, "batch_size": 8, "lr": 0.3, "evaluate_every": None}
    plain, acc_plain = final(fg.recipes.fedavg(**train))
    secure, acc_secure = final(fg.recipes.fedavg_secagg(clip=1.0, levels=2**20, neighbours=6, **train))
    step = 2 * 1.0 / (2**20 - 1)
    assert abs(acc_plain - acc_secure) <= 0.03 and acc_secure > 0.35  # chance: 0.25
    assert np.abs(plain - secure).max() < 10 * step  # stochastic rounding: a mean error well under a step


def test_the_mixed_transport_refuses_a_secure_round_the_edge_one_takes_it(tmp_path, client1):
    """Dask and edge clients in one secure round are not supported (each side would run its own protocol):
    MixedTransport refuses it before the run starts; ZmqTransport alone declares secure aggregation (its
    rounds are tested in test_secagg_edge.py)."""
    from flgraph.transports.dask import DaskTransport
    from flgraph.transports.zmq import MixedTransport, ZmqTransport, make_keypair

    allow = tmp_path / "allow"
    allow.mkdir()
    make_keypair(tmp_path, "gateway")
    t = ZmqTransport("tcp://127.0.0.1:0", secret_key=tmp_path / "gateway.key_secret", allow=allow)
    try:
        assert "secure aggregation" in t.supports
        with pytest.raises(fg.ConfigError, match=r"cannot run this round: it has secure aggregation \(SecureSetup"):
            fg.Run(fg.recipes.fedavg_secagg(clients=4), model=model(), data=data(), seed=0,
                   transport=MixedTransport(DaskTransport(client1, "secagg-test", "local-train"), t), progress=False)
    finally:
        t.close()
