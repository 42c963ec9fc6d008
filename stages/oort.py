"""Oort's guided participant selection (Lai, Zhu, Madhyastha, Chowdhury, "Oort: Efficient Federated
Learning via Guided Participant Selection", OSDI 2021), with FedScale's defaults.

Three stages and a reducer, one per place the algorithm lives in a round:

* :class:`OortUtility` (client, after LocalTrain): the client's statistical utility
  ``U_i = |B_i| sqrt(mean_k loss_k^2)`` (the per-sample losses of its trained model on its samples) and its
  simulated duration ``t_i`` (download + train + upload on its device, as the round's clock counts it),
  written as one small per-client value ``utility = [client id, U_i, t_i]``.
* :class:`Collect` (reducer): the rows of every counted client, concatenated in tree order.
* :class:`OortFeedback` (server, after the fan-out): keeps the per-client statistics (utility, duration,
  last round, times counted) of the clients counted so far, sorted by id (``oort_ids``): the server values
  ``oort_*``, O(clients explored) (stages/oort_explored.py).
* :class:`OortSelect` (server, a Select): reads those values at the round's start and picks the clients:
  exploitation by score ``(U_i - min)/range + sqrt(0.1 ln R / L_i)`` times ``(T / t_i)^alpha`` where
  ``t_i > T``, sampled by score among the top; exploration of unseen clients by size; the pacer relaxes the
  preferred duration ``T`` when the exploited utility stalls. Its own state keeps the pacer and the
  exploration factor. Above 100,000 clients, without ``available=``, the same choice is made from the
  explored clients and orders of the population made once, without arrays over the population each round.

The statistics are kept by the stage after the reduction and read by the selection of the next round:
values flow forward through a round, and a kept server value is read as the last round left it.

Example:
    >>> from flgraph import stages as st
    >>> sorted(st.OortSelect(clients=10).reads_kept())
    ['oort_count', 'oort_duration', 'oort_ids', 'oort_round', 'oort_utility']
    >>> c = st.Collect()
    >>> import numpy as np
    >>> from flgraph.context import Update
    >>> acc = c.combine(c.leaf(Update(3, 1, 0, np.array([3.0, 2.0, 1.0])), None),
    ...                 c.leaf(Update(5, 1, 0, np.array([5.0, 4.0, 2.0])), None))
    >>> c.finalize(acc, None)[0].tolist()
    [[3.0, 2.0, 1.0], [5.0, 4.0, 2.0]]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from flgraph.context import ClientSet, ClientWork, RoundContext, Update
from flgraph.errors import ConfigError
from flgraph.graph import ClientStage, Reducer, ServerStage
from flgraph.params import Params, ParamSpec
from flgraph.rng import stream

from .oort_explored import IDS, SizeOrder, dense, duration_penalty, explored, merge_rows, pacer, sparse_choice
from .select import EXACT_AVAILABILITY_UP_TO, Select

__all__ = ["Collect", "OortFeedback", "OortSelect", "OortUtility", "oort_choice"]

STATS = ("oort_utility", "oort_duration", "oort_round", "oort_count")
KEPT = (*STATS, IDS)  # the server values: the statistics of the explored clients, sorted by id


def per_sample_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of each sample (no reduction)."""
    return F.cross_entropy(out, y, reduction="none")


class OortUtility(ClientStage):
    """Write ``utility = [client id, U_i, t_i]`` for the client that just trained (place it after LocalTrain).

    ``U_i = n sqrt(mean_k loss_k^2)`` over the client's ``n`` samples, the losses of its trained model
    (global + update), in eval mode, without gradients; ``loss(out, y)`` returns one loss per sample. This
    stands for the per-sample training losses FedScale collects in the client's last steps; it costs one
    forward pass over the client's samples (all of them, a ``holdout`` included).
    ``t_i`` is the client's simulated duration with :class:`~flgraph.stages.Simulate` (1.0 without it: every
    client then costs the same and only the statistical utility guides the choice).
    """

    requires: ClassVar[frozenset[str]] = frozenset({"update"})
    provides: ClassVar[frozenset[str]] = frozenset({"utility"})

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 batch_size: int = 1024) -> None:
        if batch_size < 1:
            raise ConfigError(f"OortUtility(batch_size={batch_size}): must be >= 1")
        self.loss = loss
        self.batch_size = batch_size

    def run(self, work: ClientWork) -> None:
        upd = work.update
        if upd is None or upd.delta is None:
            raise ConfigError("OortUtility needs the raw model update", fix="put it right after LocalTrain, "
                              "before any Compress stage")
        bm = work.model_source.bound("cpu")
        bm.load(work.global_params.flat + upd.delta)
        model, loss_fn = bm.module, self.loss or per_sample_cross_entropy
        x, y = torch.as_tensor(work.data.x), torch.as_tensor(work.data.y)
        sq = 0.0
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(y), self.batch_size):
                    sq += float((loss_fn(model(x[i : i + self.batch_size]), y[i : i + self.batch_size])
                                 .double() ** 2).sum())
        finally:
            model.train()
        n = len(y)
        utility = n * math.sqrt(sq / max(n, 1))
        dev = work.clients.devices
        duration = 1.0
        if dev is not None:
            samples = float(upd.metrics.get("samples_processed", n))
            duration = dev.finish(work.position, work.global_params.spec.nbytes, samples, upd.upload_nbytes)
        work.outputs["utility"] = Update(work.client, 1, work.round - 1,
                                         np.array([work.client, utility, duration], np.float64))


class Collect(Reducer):
    """The per-client values themselves: an ``(n, k)`` array of the counted clients' rows, in tree order
    (small values only: every row reaches the driver)."""

    def leaf(self, update: Update, spec: ParamSpec | None) -> list[np.ndarray]:
        row = update.delta if update.delta is not None else update.decoded(spec)  # type: ignore[arg-type]
        return [np.asarray(row, np.float64).reshape(-1)]

    def combine(self, left: Any, right: Any) -> list[np.ndarray]:
        return [*left, *right]

    def finalize(self, acc: Any, spec: ParamSpec | None) -> tuple[np.ndarray, float]:
        return np.stack(acc), float(len(acc))

    def __repr__(self) -> str:
        return "Collect()"


class OortFeedback(ServerStage):
    """Keep each counted client's last utility, duration, round and count (arrays over the clients counted
    so far, sorted by id in ``oort_ids``), from the collected ``utility`` rows of the round."""

    keeps: ClassVar[frozenset[str]] = frozenset(KEPT)

    def reads(self) -> frozenset[str]:
        return frozenset({"aggregate:utility"})

    def writes(self) -> frozenset[str]:
        return frozenset(KEPT)

    def init_state(self, params: Params) -> dict[str, Any]:
        return {"oort_utility": np.zeros(0), "oort_duration": np.zeros(0), "oort_round": np.zeros(0, np.int64),
                "oort_count": np.zeros(0, np.int64), IDS: np.zeros(0, np.int64)}

    def run(self, ctx: RoundContext) -> None:
        table = explored(ctx.state, ctx.dataset.client_ids)  # copies (an older run's arrays: converted)
        got = ctx.aggregates.get("utility")
        if got is not None:
            rows = np.asarray(got[0], np.float64)
            table = merge_rows(table, rows, ctx.round)
            ctx.metrics["oort_utility_mean"] = float(rows[:, 1].mean())
        ctx.state.update(table)


class OortSelect(Select):
    """Oort's training selector; FedScale's defaults (``exploration=0.9`` decaying by 0.98 a round to 0.3,
    pacer step 20 and delta 5 from a preferred duration at the 30th percentile, ``round_penalty`` alpha 2,
    over-commitment 1.3, scores clipped at the 0.9 quantile, exploitation sampled among the clients above
    5% of the cut-off score, exploration among the ``sample_window`` x largest unseen clients). Blacklisting
    is off by default as in FedScale (``blacklist_rounds=-1``); ``blacklist_rounds=k`` leaves out clients
    counted more than ``k`` times, at most ``blacklist_max_len`` of the population.

    ``devices=`` (the :class:`~flgraph.sim.DevicePopulation` of the round's Simulate) estimates, as FedScale
    does, every client's duration up front (download + ``epochs`` passes over its samples + upload), used
    until the client reports its own. Without it, a duration is known once the client was counted: the
    preferred duration ``T`` is the percentile of the known durations and unseen clients are ranked by
    sample count alone (then the clients that over-commitment drops stay unseen and keep being explored).

    Needs :class:`OortFeedback` in the round (it keeps the statistics this stage reads).
    """

    def __init__(self, clients: int | None = None, *, fraction: float | None = None, over_select: float = 1.3,
                 exploration: float = 0.9, exploration_decay: float = 0.98, exploration_min: float = 0.3,
                 pacer_step: int = 20, pacer_delta: float = 5.0, round_threshold: float = 30.0,
                 round_penalty: float = 2.0, clip_bound: float = 0.9, cut_off_util: float = 0.05,
                 sample_window: float = 5.0, blacklist_rounds: int = -1, blacklist_max_len: float = 0.3,
                 devices: Any = None, epochs: int = 1, available: Any = None) -> None:
        super().__init__(clients, fraction=fraction, over_select=over_select, available=available)
        if not 0 <= exploration_min <= exploration <= 1 or not 0 < exploration_decay <= 1:
            raise ConfigError(f"OortSelect(exploration={exploration}, exploration_decay={exploration_decay}, "
                              f"exploration_min={exploration_min})",
                              fix="0 <= exploration_min <= exploration <= 1 and 0 < exploration_decay <= 1")
        if pacer_step < 1 or not 0 < round_threshold <= 100:
            raise ConfigError(f"OortSelect(pacer_step={pacer_step}, round_threshold={round_threshold})",
                              fix="pacer_step >= 1 and round_threshold a percentile in (0, 100]")
        self.exploration, self.exploration_decay = exploration, exploration_decay
        self.exploration_min = exploration_min
        self.pacer_step, self.pacer_delta, self.round_threshold = pacer_step, pacer_delta, round_threshold
        self.round_penalty, self.clip_bound, self.cut_off_util = round_penalty, clip_bound, cut_off_util
        self.sample_window = sample_window
        self.blacklist_rounds, self.blacklist_max_len = blacklist_rounds, blacklist_max_len
        if devices is not None and not hasattr(devices, "profile"):
            raise ConfigError(f"OortSelect(devices={devices!r}) is not a DevicePopulation",
                              fix="pass the DevicePopulation given to st.Simulate, or leave devices out")
        self.devices, self.epochs = devices, epochs
        self._sizes: tuple[int, np.ndarray, np.ndarray | None] | None = None
        self._order: SizeOrder | None = None  # large populations: sizes sorted, positions by size

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out.pop("sampler", None)
        out.pop("weighting", None)
        return out

    def reads(self) -> frozenset[str]:
        return frozenset(KEPT)

    def reads_kept(self) -> frozenset[str]:
        return frozenset(KEPT)

    def init_state(self, params: Params) -> dict[str, Any]:
        return {"exploration": float(self.exploration), "threshold": float(self.round_threshold),
                "exploit_util": np.zeros(0),
                "exploited": np.zeros(0, np.int64)}

    def lookahead(self, rnd: int, seed: int, dataset: Any) -> ClientSet | None:
        return None  # the choice depends on the last round's feedback

    def run(self, ctx: RoundContext) -> None:
        if not ctx.state:
            ctx.state.update(self.init_state(ctx.params))
        ids = ctx.dataset.client_ids
        if self._sizes is None or self._sizes[0] != id(ctx.dataset):
            sizes = np.array([ctx.dataset.num_samples(int(c)) for c in ids], np.float64)
            est = None
            if self.devices is not None:  # as FedScale: every client's duration estimated from its device
                nb = float(ctx.params.nbytes)
                est = np.array([self.devices.profile(int(c)).duration(self.epochs * sizes[i], nb, nb)
                                for i, c in enumerate(ids)])
            self._sizes = (id(ctx.dataset), sizes, est)
            self._order = None
        sizes, est = self._sizes[1], self._sizes[2]
        n = len(ids)
        table = explored(ctx.values, ids)
        if self.available is None and n > EXACT_AVAILABILITY_UP_TO:
            # every client feasible: the same choice without arrays over the population each round
            if self._order is None:
                self._order = SizeOrder(sizes, est, self.round_penalty)
            count = min(self.count(n), n)
            seen = np.searchsorted(ids, table[IDS])
            picked = sparse_choice(self, ctx.state, table, seen, self._order, min(self._drawn(count), n),
                                   ctx.round, stream(ctx.seed, self.tag, ctx.round))
            self._chosen(ctx, ids[picked], count)
            return
        stats = dense(table, ids)
        feasible = np.ones(n, bool)
        if self.available is not None:
            feasible = self.available_mask(ids, ctx.round, ctx.time)
            ctx.metrics["clients_available"] = int(feasible.sum())
        count = min(self.count(n), int(feasible.sum()))
        drawn = min(self._drawn(count), int(feasible.sum()))
        if drawn == 0:
            raise ConfigError(f"round {ctx.round}: no client is available", fix="check the availability")
        picked = oort_choice(self, ctx.state, stats, sizes, feasible, drawn, ctx.round,
                             stream(ctx.seed, self.tag, ctx.round), est)
        self._chosen(ctx, ids[picked], count)

    def _chosen(self, ctx: RoundContext, chosen: np.ndarray, count: int) -> None:
        clients = ClientSet(chosen)
        if self.over_select > 1.0 and len(clients) > count:
            clients.keep_first = count
        ctx.clients = clients
        ctx.metrics["clients_selected"] = len(clients)
        ctx.metrics["oort_exploration"] = float(ctx.state["exploration"])
        ctx.metrics["oort_threshold"] = float(ctx.state["threshold"])


def oort_choice(cfg: OortSelect, state: dict[str, Any], stats: dict[str, np.ndarray], sizes: np.ndarray,
                feasible: np.ndarray, k: int, rnd: int, rng: np.random.Generator,
                estimated: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``k`` clients Oort picks in round ``rnd`` (updates ``state``: pacer, exploration).

    ``estimated``: every client's expected duration, used where none was reported yet."""
    util, dur, last, cnt = (stats[s] for s in STATS)
    seen = cnt > 0
    if estimated is not None:
        dur = np.where(seen, dur, estimated)
    # the pacer: the utility the last round's exploited clients brought back, compared over windows
    ex = np.asarray(state["exploited"], np.int64)
    ok = ex[last[ex] == rnd - 1] if len(ex) else ex
    hist = np.append(np.asarray(state["exploit_util"], np.float64), float(util[ok].sum()) / (1e-4 + len(ok)))
    thr = pacer(hist, float(state["threshold"]), rnd, cfg)
    ok_mask = feasible.copy()
    if cfg.blacklist_rounds >= 0:
        over = np.flatnonzero(cnt > cfg.blacklist_rounds)
        over = over[np.argsort(-cnt[over], kind="stable")][: int(cfg.blacklist_max_len * len(cnt))]
        ok_mask[over] = False
    known = np.sort(dur if estimated is not None else dur[seen])
    prefer = known[min(int(len(known) * thr / 100.0), len(known) - 1)] if thr < 100.0 and len(known) else math.inf
    reward = np.where(seen, util, sizes)  # an unseen client's utility is its size, as FedScale registers it
    moving = np.sort(reward[ok_mask & (reward > 0)])
    if len(moving):
        clip = float(moving[min(int(len(moving) * cfg.clip_bound), len(moving) - 1)])
        lo = float(moving[0]) * 0.999
        span = max(float(moving[-1]) - lo, 1e-4)
    else:
        clip, lo, span = math.inf, 0.0, 1.0

    cand = np.flatnonzero(ok_mask & seen)
    # the staleness bonus sqrt(0.1 ln R / L_i), L_i the client's last counted round (the paper's and FedScale's)
    score = ((np.minimum(util[cand], clip) - lo) / span
             + np.sqrt(0.1 * math.log(rnd) / np.maximum(last[cand], 1)))
    score = np.abs(score * duration_penalty(prefer, cfg.round_penalty, dur[cand]))
    exploration = max(float(state["exploration"]) * cfg.exploration_decay, cfg.exploration_min)
    unseen = np.flatnonzero(ok_mask & ~seen)
    n_exploit = min(k - int(k * exploration), len(cand))
    n_explore = min(len(unseen), k - n_exploit)
    n_exploit = min(k - n_explore, len(cand))  # too few unseen clients: exploit more
    exploit = np.zeros(0, np.int64)
    if n_exploit > 0:
        order = cand[np.argsort(-score, kind="stable")]
        ranked = score[np.argsort(-score, kind="stable")]
        # the pool: every client above 5% of the k-th score, and at least 10 k + 1 of them (FedScale's rule)
        cut = ranked[min(n_exploit, len(ranked) - 1)] * cfg.cut_off_util
        keep = max(int(np.searchsorted(-ranked, -cut, side="right")), min(len(ranked), int(10 * n_exploit) + 1))
        pool, w = order[:keep], ranked[:keep]
        exploit = rng.choice(pool, n_exploit, replace=False, p=w / max(1e-4, float(w.sum())))
    explore = np.zeros(0, np.int64)
    if n_explore > 0:
        init = sizes[unseen] * duration_penalty(prefer, cfg.round_penalty, dur[unseen])
        order = np.argsort(-init, kind="stable")[: min(int(cfg.sample_window * n_explore), len(unseen))]
        pool, w = unseen[order], init[order]
        explore = rng.choice(pool, n_explore, replace=False, p=w / max(1e-4, float(w.sum())))
    state.update(exploration=exploration, threshold=thr, exploit_util=hist, exploited=np.asarray(exploit, np.int64))
    return np.concatenate([explore, exploit]).astype(np.int64)
