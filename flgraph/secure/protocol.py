"""The server's side of SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017 when every client is every
other's neighbour), run by the driver around one client pass:

1. :func:`start`, before the clients train: a fresh worker ring (:mod:`flgraph.secure.ring`), the public
   neighbour graph, AdvertiseKeys and ShareKeys on the clients (``ctx.mapper``), the encrypted shares routed;
   the clients still in get what they need to mask their input (the ClientSet's ``secagg`` setting);
2. the client pass: each client trains, quantises and masks its update (:class:`~flgraph.stages.SecureMask`);
   the reducer sums the masked inputs mod ``M`` (:class:`~flgraph.stages.SecureSum`);
3. :func:`finish`: Unmasking. The survivors return, for each neighbour, the share of its self-mask seed
   (it sent a masked input) or of its mask key (it dropped); the driver reconstructs them and removes the
   masks that do not cancel, leaving the plain sum of the quantised updates.

The driver sees public keys, encrypted shares it routes, sealed state it cannot open, masked inputs summed
by the workers' reduction tree, and the shares it asks for. Fewer than ``threshold`` answers for any client
fails the round with :class:`DropoutError`; the run's state stays that of the last completed round.

On edge agents (a transport with ``clients_keep_secrets``, :mod:`flgraph.transports.zmq.secagg`) there is
no worker ring: each device keeps its own secrets, the sealed state the driver holds is empty, and a client
whose device does not answer a phase (``None``) has left the round at that phase.

Example:
    >>> DropoutError("too few", fix="run the round again").fix
    'run the round again'
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, FlgraphError
from ..rng import stream
from . import ring as rings
from . import shamir
from .client import AdvertiseKeys, MaskRecord, ShareKeys, Unmask, mask_key
from .config import Dropouts, SecAggConfig
from .keys import public_of
from .masks import add_mod, expand, field_dtype, sub_mod
from .neighbours import neighbour_graph

__all__ = ["DropoutError", "SecureRound", "Session", "finish", "start"]

PUBLIC_KEY = 32


class DropoutError(FlgraphError):
    """Too few clients stayed in a secure-aggregation round to unmask its sum."""


@dataclass
class SecureRound:
    """What a secure round showed the server: its clients, who dropped at which phase, the unmasked sum of
    the quantised updates (``total``), and the bytes and seconds of each phase (client-side work included)."""

    round: int
    clients: np.ndarray
    neighbours: int
    threshold: int
    survivors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dropped: dict[str, list[int]] = field(default_factory=dict)
    total: np.ndarray | None = None
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Session:
    """The driver's record of one secure round between its phases (public material and sealed state only)."""

    config: SecAggConfig
    ring: str
    ids: np.ndarray
    graph: list[np.ndarray]
    c_pk: list[bytes]
    s_pk: list[bytes]
    shared: dict[int, bytes]  # position -> its secrets sealed under the ring (opaque to the driver)
    inbox: dict[int, dict[int, bytes]]  # recipient -> sender -> encrypted shares
    leave_after_masking: frozenset[int]
    leave_during_unmasking: frozenset[int]
    report: SecureRound


def _draw_dropouts(dropouts: Dropouts | None, n: int, seed: int, tag: int, rnd: int) -> list[frozenset[int]]:
    if dropouts is None or not dropouts.applies(rnd):
        return [frozenset()] * 4
    counts = dropouts.counts()
    if sum(counts) > n:
        raise ConfigError(f"{dropouts!r}: {sum(counts)} dropouts in a round of {n} clients")
    order = stream(seed, tag, rnd, 1).permutation(n).tolist()
    out, at = [], 0
    for c in counts:
        out.append(frozenset(order[at : at + c]))
        at += c
    return out


def start(ctx: Any, config: SecAggConfig, dropouts: Dropouts | None) -> Session:
    """AdvertiseKeys and ShareKeys for ``ctx.clients``; sets ``ctx.clients`` to those who go on to mask
    their input (each with its ``secagg`` setting) and returns the round's session."""
    from ..engine.contracts import ReachesWorkers

    reach = getattr(ctx, "transport", None)
    edge = _on_devices(reach)
    if not edge and not isinstance(reach, ReachesWorkers):
        raise ConfigError(f"secure aggregation needs a transport that runs each client's phases on workers; "
                          f"this round runs on {type(reach).__name__}",
                          fix="run it on Dask (the default) or on edge agents (ZmqTransport)")
    ids = np.asarray(ctx.clients.ids, np.int64)
    n = len(ids)
    k, t = config.check_round(n)
    graph = neighbour_graph(n, k, stream(ctx.seed, ctx.tag, ctx.round, 0))
    gone_keys, gone_shares, gone_masking, gone_unmasking = _draw_dropouts(dropouts, n, ctx.seed, ctx.tag, ctx.round)
    report = SecureRound(ctx.round, ids.copy(), k, t)
    flat = ctx.params.flat
    t0 = time.perf_counter()
    # devices keep their own secrets (each under a key of its own): the round only needs a fresh name
    ring = os.urandom(12).hex() if edge else rings.establish(reach)
    report.seconds["ring"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    advertised = ctx.mapper(AdvertiseKeys(ring, list(range(n))), ids, flat)
    # None: the client's device did not answer (it left before advertising keys)
    c_pk = [b"" if a is None else a[0] for a in advertised]
    s_pk = [b"" if a is None else a[1] for a in advertised]
    report.seconds["advertise_keys"] = time.perf_counter() - t0
    report.bytes_up["advertise_keys"] = 2 * PUBLIC_KEY * n

    t0 = time.perf_counter()
    active = [u for u in range(n) if u not in gone_keys and advertised[u] is not None]
    inputs = [(advertised[u][2], u, [(int(v), c_pk[v]) for v in graph[u] if advertised[v] is not None])
              for u in active]
    report.bytes_down["share_keys"] = sum(2 * PUBLIC_KEY * len(x[2]) for x in inputs)
    answers = ctx.mapper(ShareKeys(ring, t, inputs), ids[active], flat) if active else []
    shared: dict[int, bytes] = {}
    inbox: dict[int, dict[int, bytes]] = {u: {} for u in range(n)}
    for u, answer in zip(active, answers):
        if answer is None:  # too few neighbours advertised keys: the client aborts (SecAgg's rule)
            continue
        boxes, sealed = answer
        shared[u] = sealed
        for v, box in boxes.items():
            inbox[v][u] = box
    report.seconds["share_keys"] = time.perf_counter() - t0
    report.bytes_up["share_keys"] = sum(len(b) for box in inbox.values() for b in box.values())
    report.dropped["after_keys"] = sorted(int(ids[u]) for u in range(n) if u not in shared)

    masking = [u for u in sorted(shared) if u not in gone_shares]
    report.dropped["after_shares"] = sorted(int(ids[u]) for u in shared if u in gone_shares)
    records = np.empty(len(masking), dtype=object)
    down = 0
    for i, u in enumerate(masking):
        neighbours = tuple((int(v), s_pk[v]) for v in graph[u] if int(v) in shared)
        records[i] = MaskRecord(ring, u, shared[u], neighbours, config)
        down += PUBLIC_KEY * len(neighbours) + sum(len(b) for b in inbox[u].values())
    report.bytes_down["masked_input"] = down
    ctx.clients = ctx.clients.take(np.asarray(masking, np.int64)).with_settings(secagg=records)
    return Session(config, ring, ids, graph, c_pk, s_pk, shared, inbox, gone_masking, gone_unmasking, report)


def finish(ctx: Any, session: Session, masked: np.ndarray, contributors: list[int]) -> np.ndarray:
    """Unmasking: the plain modular sum of the quantised updates of ``contributors`` (client ids whose
    masked inputs are summed in ``masked``). Raises :class:`DropoutError` below the threshold."""
    try:
        return _unmask(ctx, session, masked, contributors)
    finally:
        if not _on_devices(ctx.transport):
            rings.forget(ctx.transport, session.ring)


def _on_devices(transport: Any) -> bool:
    """Whether the clients' own devices run their phases and keep their secrets (edge agents), so that no
    worker ring is needed and a client that does not answer a phase (None) has left the round."""
    return bool(getattr(transport, "clients_keep_secrets", False))


def _unmask(ctx: Any, s: Session, masked: np.ndarray, contributors: list[int]) -> np.ndarray:
    cfg, report, ids = s.config, s.report, s.ids
    t = report.threshold
    where = {int(c): p for p, c in enumerate(ids.tolist())}
    u3 = sorted(where[int(c)] for c in contributors)
    in3 = set(u3)
    dropped = sorted(set(s.shared) - in3)
    report.survivors = ids[u3].copy()
    report.dropped["before_masked_input"] = sorted(int(ids[u]) for u in dropped)
    asked = [w for w in u3 if w not in s.leave_after_masking]
    report.dropped["after_masking"] = sorted(int(ids[u]) for u in u3 if u in s.leave_after_masking)
    inputs = []
    for w in asked:
        requests = [(u, s.c_pk[u], box, "b" if u in in3 else "s") for u, box in sorted(s.inbox[w].items())]
        inputs.append((s.shared[w], w, requests))
    report.bytes_down["unmasking"] = sum(len(r[2]) + PUBLIC_KEY + 1 for x in inputs for r in x[2])
    t0 = time.perf_counter()
    answers = ctx.mapper(Unmask(s.ring, inputs), ids[asked], ctx.params.flat) if asked else []
    report.seconds["unmasking_clients"] = time.perf_counter() - t0
    shares: dict[tuple[str, int], list[tuple[int, int]]] = {}
    up = 0
    for w, answer in zip(asked, answers):
        if answer is None:  # its device left before answering
            s.leave_during_unmasking = s.leave_during_unmasking | {w}
            continue
        up += sum(len(y) + 5 for _, _, y in answer)
        if w in s.leave_during_unmasking:
            continue  # the answer never arrives
        for sender, kind, y in answer:
            shares.setdefault((kind, sender), []).append((w + 1, shamir.from_bytes(y)))
    report.bytes_up["unmasking"] = up
    report.dropped["during_unmasking"] = sorted(int(ids[u]) for u in asked if u in s.leave_during_unmasking)
    needed = [("b", u) for u in u3] + [("s", v) for v in dropped]
    short = [(kind, u, len(shares.get((kind, u), []))) for kind, u in needed if len(shares.get((kind, u), [])) < t]
    if short:
        kind, u, have = short[0]
        what = "self-mask seed" if kind == "b" else "mask key"
        raise DropoutError(
            f"secure aggregation of round {ctx.round} cannot be unmasked: for {len(short)} client(s) fewer than "
            f"threshold={t} neighbours answered (client {int(ids[u])}'s {what}: {have} share(s)); "
            f"{len(u3)} masked inputs arrived, {len(asked) - len(s.leave_during_unmasking & set(asked))} "
            "clients answered the unmasking request",
            fix="the run's state is that of the last completed round: run the round again (fit() continues); "
                "if this many clients drop, use more neighbours or a lower threshold")

    t0 = time.perf_counter()
    total = masked.astype(field_dtype(cfg.modulus), copy=True)
    size, m = len(total), cfg.modulus
    for u in u3:
        b = _secret(shares[("b", u)], ctx.round, int(ids[u]))
        sub_mod(total, expand(b, size, m, b"self"), m)
    for v in dropped:
        s_sk = _secret(shares[("s", v)], ctx.round, int(ids[v]))
        if public_of(s_sk) != s.s_pk[v]:
            raise DropoutError(f"round {ctx.round}: the mask key of client {int(ids[v])} reconstructed from its "
                               "neighbours' shares does not match the key it advertised",
                               fix="a client sent a wrong share; run the round again")
        for w in s.graph[v]:
            w = int(w)
            if w in in3:
                mask = expand(mask_key(s_sk, s.s_pk[w], s.ring), size, m, b"pair")
                (sub_mod if w < v else add_mod)(total, mask, m)
    report.seconds["unmasking_server"] = time.perf_counter() - t0
    report.total = total.astype(np.uint64)
    return report.total


def _secret(shares: list[tuple[int, int]], rnd: int, client: int) -> bytes:
    value = shamir.reconstruct(shares)
    if value >= 2**256:
        raise DropoutError(f"round {rnd}: the shares of client {client}'s secret do not agree",
                           fix="a client sent a wrong share; run the round again")
    return value.to_bytes(32, "big")
