"""Oort's statistics for the explored clients only, and its selection over a large population without
population-sized work per round.

The statistics (``oort_*`` server values) are arrays over the clients counted at least once, sorted by id
(``oort_ids``): memory O(clients explored), not O(population). Checkpoints written before ``oort_ids``
hold arrays over the whole population; :func:`explored` reads both.

:func:`sparse_choice` makes the choice :func:`~flgraph.stages.oort.oort_choice` makes, with the same
random draws, when every client is feasible (no ``available=``): exploitation ranks the explored clients
(O(explored), inherent: each is scored); the score's normalisation (the clip quantile, minimum and maximum
of every client's reward, an unexplored client's reward being its size) and the preferred duration (a
percentile of every client's duration, estimates for unexplored ones with ``devices=``) are rank selections
in sorted arrays of the population with the explored clients' values taken out and their reports put in;
exploration walks the clients in decreasing weight (size, or size times the duration penalty), skipping
explored ones, until its pool is full. Those sorted arrays and orders are made once per population
(:class:`SizeOrder`).

Example:
    >>> import numpy as np
    >>> rows = np.array([[7.0, 2.5, 1.0], [3.0, 4.0, 2.0]])
    >>> t = merge_rows(explored({}, np.arange(10)), rows, 1)
    >>> t["oort_ids"].tolist(), t["oort_utility"].tolist(), t["oort_count"].tolist()
    ([3, 7], [4.0, 2.5], [1, 1])
    >>> kth_of_union(np.array([1.0, 2, 3, 4]), np.array([2.0]), np.array([2.5]), 1)  # 1, 2.5, 3, 4
    2.5
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

STATS = ("oort_utility", "oort_duration", "oort_round", "oort_count")
IDS = "oort_ids"
_INT = ("oort_round", "oort_count")




def duration_penalty(prefer: float, alpha: float, d: np.ndarray) -> np.ndarray:
    """Oort's system utility: ``(prefer / d) ** alpha`` for clients slower than the preferred duration, 1 for
    the others (all 1 while no duration is preferred)."""
    if not math.isfinite(prefer):
        return np.ones_like(d)
    return np.where(d > prefer, (prefer / np.maximum(d, 1e-4)) ** alpha, 1.0)

def pacer(hist: np.ndarray, thr: float, rnd: int, cfg: Any) -> float:
    """Oort's pacer: the preferred-duration threshold after round ``rnd``. Every ``pacer_step`` rounds the
    exploited utility of the last window (``hist``, one value a round) is compared with the window before:
    nearly flat raises the threshold by ``pacer_delta`` (toward 100), a jump lowers it."""
    step = cfg.pacer_step
    if rnd >= 2 * step and rnd % step == 0:
        before, now = float(hist[-2 * step : -step].sum()), float(hist[-step:].sum())
        if abs(now - before) <= before * 0.1:
            return min(100.0, thr + cfg.pacer_delta)
        if abs(now - before) >= before * 5:
            return max(cfg.pacer_delta, thr - cfg.pacer_delta)
    return thr

def explored(values: dict[str, Any], population: np.ndarray) -> dict[str, np.ndarray]:
    """The explored clients' statistics (copies), sorted by id, from the kept values; an older checkpoint's
    arrays over ``population`` keep their counted clients."""
    got = {k: np.asarray(values.get(k, np.zeros(0))) for k in (*STATS, IDS)}
    n_ids, n = len(got[IDS]), len(got["oort_count"])
    if n_ids != n and n == len(population):  # the format over the whole population
        keep = got["oort_count"] > 0
        return {IDS: np.asarray(population[keep], np.int64),
                **{k: np.array(got[k][keep], np.int64 if k in _INT else np.float64) for k in STATS}}
    if n_ids != n:
        return {IDS: np.zeros(0, np.int64), **{k: np.zeros(0, np.int64 if k in _INT else np.float64) for k in STATS}}
    return {IDS: np.array(got[IDS], np.int64), **{k: np.array(got[k], np.int64 if k in _INT else np.float64)
                                                  for k in STATS}}


def merge_rows(table: dict[str, np.ndarray], rows: np.ndarray, rnd: int) -> dict[str, np.ndarray]:
    """``table`` with the round's ``[client id, utility, duration]`` rows recorded (new clients inserted)."""
    ids = rows[:, 0].astype(np.int64)
    known = table[IDS]
    merged = np.union1d(known, ids)
    if len(merged) != len(known):
        at = np.searchsorted(merged, known)
        grown = {IDS: merged}
        for k in STATS:
            grown[k] = np.zeros(len(merged), table[k].dtype)
            grown[k][at] = table[k]
        table = grown
    pos = np.searchsorted(table[IDS], ids)
    table["oort_utility"][pos] = rows[:, 1]
    table["oort_duration"][pos] = rows[:, 2]
    table["oort_round"][pos] = rnd
    table["oort_count"][pos] += 1
    return table


def dense(table: dict[str, np.ndarray], population: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics as arrays over ``population`` (zeros for clients never counted)."""
    pos = np.searchsorted(population, table[IDS])
    out = {k: np.zeros(len(population), table[k].dtype) for k in STATS}
    for k in STATS:
        out[k][pos] = table[k]
    return out


def kth_of_union(a: np.ndarray, removed: np.ndarray, added: np.ndarray, k: int) -> float:
    """The ``k``-th smallest (from 0) of the multiset ``a`` less ``removed`` plus ``added`` (all sorted;
    ``removed`` a sub-multiset of ``a``), by binary search: O(log(len(a)) log(...) + len(added))."""

    def count_le(v: Any) -> Any:
        return (np.searchsorted(a, v, "right") - np.searchsorted(removed, v, "right")
                + np.searchsorted(added, v, "right"))

    best = math.inf
    if len(added):
        ok = np.flatnonzero(count_le(added) >= k + 1)
        if len(ok):
            best = float(added[ok[0]])
    lo, hi = 0, len(a)  # the first index of a whose count reaches k + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if count_le(a[mid]) >= k + 1:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(a):
        best = min(best, float(a[lo]))
    return best


class SizeOrder:
    """Every client's sample count, the positive ones sorted, and the positions in decreasing size (ties by
    position); with ``estimated`` durations (``OortSelect(devices=...)``) also those sorted, and the positions
    in decreasing ``size / duration ** round_penalty`` (the order of a penalised client's exploration weight):
    made once per population, read each round."""

    def __init__(self, sizes: np.ndarray, estimated: np.ndarray | None = None, round_penalty: float = 2.0) -> None:
        index = np.int32 if len(sizes) < 2**31 else np.int64
        self.sizes, self.estimated = sizes, estimated
        self.sorted_positive = np.sort(sizes[sizes > 0])
        self.descending = np.argsort(-sizes, kind="stable").astype(index)
        self.sorted_estimated = np.sort(estimated) if estimated is not None else None
        self.key = sizes * np.maximum(estimated, 1e-4) ** -round_penalty if estimated is not None else None
        self.by_penalised = np.argsort(-self.key, kind="stable").astype(index) if self.key is not None else None

    def walk(self, order: np.ndarray, seen: np.ndarray, want: int, keep: Any = None,
             key: np.ndarray | None = None) -> np.ndarray:
        """The first ``want`` positions of ``order`` not in ``seen`` (sorted) for which ``keep`` holds, and,
        with ``key`` (descending along ``order``), the next ones whose key is within rounding of the last
        one's: a weight computed another way may rank those above it.

        It reads about ``want`` / (the share of the order that is kept) positions, in blocks of O(want +
        explored): with estimated durations the unpenalised clients are few among the largest when
        durations grow with size, so that walk reads further (in the worst case most of the order, though
        never an array over the population at once)."""
        out: list[np.ndarray] = []
        got, start, floor = 0, 0, None
        while start < len(order):
            block = order[start : start + 2 * max(want - got, 0) + len(seen) + 64].astype(np.int64)
            start += len(block)
            if len(seen):
                block = block[seen[np.minimum(np.searchsorted(seen, block), len(seen) - 1)] != block]
            if keep is not None:
                block = block[keep(block)]
            take = block[: max(want - got, 0)]
            out.append(take)
            got += len(take)
            if got < want:
                continue
            if key is None or (floor is None and not len(take)):
                break
            floor = float(key[take[-1]]) if len(take) else floor
            if not floor or floor <= 0:  # a zero weight is exact whichever way it is computed
                break
            rest = block[len(take):]
            near = rest[key[rest] >= floor * (1 - 1e-9)]
            out.append(near)
            if len(near) < len(rest):
                break
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def exploration_pool(self, seen: np.ndarray, want: int, prefer: float,
                         penalty: Any) -> tuple[np.ndarray, np.ndarray]:
        """The ``want`` unexplored clients of largest weight ``size x penalty(duration)`` (ties by position;
        an unexplored client's duration is its estimate, or unknown (0) without estimates), and the weights."""
        if self.estimated is None or not math.isfinite(prefer):
            pool = self.walk(self.descending, seen, want)
            dur = self.estimated[pool] if self.estimated is not None else np.zeros(len(pool))
            return pool, self.sizes[pool] * penalty(dur)
        est = self.estimated
        assert self.by_penalised is not None and self.key is not None
        fast = self.walk(self.descending, seen, want, lambda p: est[p] <= prefer)  # weight: the size
        slow = self.walk(self.by_penalised, seen, want, lambda p: est[p] > prefer, self.key)
        cand = np.concatenate([fast, slow])
        weight = self.sizes[cand] * penalty(est[cand])
        best = np.lexsort((cand, -weight))[:want]
        return cand[best], weight[best]


def sparse_choice(cfg: Any, state: dict[str, Any], table: dict[str, np.ndarray], seen: np.ndarray,
                  order: SizeOrder, k: int, rnd: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the ``k`` clients :func:`~flgraph.stages.oort.oort_choice` picks when every client is
    feasible (durations estimated where ``order`` has them), from the explored clients' ``table`` (their
    positions ``seen``, ascending) and the population's ``order``: the same choice with the same draws,
    without arrays over the population. Updates ``state`` as oort_choice does."""
    util, dur, last, cnt = (table[s] for s in STATS)
    n = len(order.sizes)
    ex = np.asarray(state["exploited"], np.int64)
    at = np.minimum(np.searchsorted(seen, ex), max(len(seen) - 1, 0))
    hit = (seen[at] == ex) if len(seen) else np.zeros(len(ex), bool)
    ex_last = np.where(hit, last[at] if len(seen) else 0, 0)
    ex_util = np.where(hit, util[at] if len(seen) else 0.0, 0.0)
    ok = ex_last == rnd - 1
    hist = np.append(np.asarray(state["exploit_util"], np.float64), float(ex_util[ok].sum()) / (1e-4 + int(ok.sum())))
    thr = pacer(hist, float(state["threshold"]), rnd, cfg)
    allowed = np.ones(len(seen), bool)
    if cfg.blacklist_rounds >= 0:
        over = np.flatnonzero(cnt > cfg.blacklist_rounds)
        allowed[over[np.argsort(-cnt[over], kind="stable")][: int(cfg.blacklist_max_len * n)]] = False
    if order.sorted_estimated is not None:  # every client's duration: the reported ones, else the estimates
        assert order.estimated is not None
        rank = min(int(n * thr / 100.0), n - 1)
        prefer = (kth_of_union(order.sorted_estimated, np.sort(order.estimated[seen]), np.sort(dur), rank)
                  if thr < 100.0 else math.inf)
    else:
        known = np.sort(dur)
        prefer = known[min(int(len(known) * thr / 100.0), len(known) - 1)] if thr < 100.0 and len(known) else math.inf
    # the rewards of every allowed client: unexplored ones' sizes, explored ones' utilities
    seen_sizes = order.sizes[seen]
    removed = np.sort(seen_sizes[seen_sizes > 0])
    added = np.sort(util[allowed & (util > 0)])
    m = len(order.sorted_positive) - len(removed) + len(added)
    if m:
        clip = kth_of_union(order.sorted_positive, removed, added, min(int(m * cfg.clip_bound), m - 1))
        lo = kth_of_union(order.sorted_positive, removed, added, 0) * 0.999
        span = max(kth_of_union(order.sorted_positive, removed, added, m - 1) - lo, 1e-4)
    else:
        clip, lo, span = math.inf, 0.0, 1.0

    idx = np.flatnonzero(allowed)
    cand = seen[idx]
    score = ((np.minimum(util[idx], clip) - lo) / span + np.sqrt(0.1 * math.log(rnd) / np.maximum(last[idx], 1)))
    score = np.abs(score * duration_penalty(prefer, cfg.round_penalty, dur[idx]))
    exploration = max(float(state["exploration"]) * cfg.exploration_decay, cfg.exploration_min)
    n_unseen = n - len(seen)
    n_exploit = min(k - int(k * exploration), len(cand))
    n_explore = min(n_unseen, k - n_exploit)
    n_exploit = min(k - n_explore, len(cand))
    exploit = np.zeros(0, np.int64)
    if n_exploit > 0:
        ranking = np.argsort(-score, kind="stable")
        ranked = score[ranking]
        cut = ranked[min(n_exploit, len(ranked) - 1)] * cfg.cut_off_util
        keep = max(int(np.searchsorted(-ranked, -cut, side="right")), min(len(ranked), int(10 * n_exploit) + 1))
        w = ranked[:keep]
        exploit = rng.choice(cand[ranking][:keep], n_exploit, replace=False, p=w / max(1e-4, float(w.sum())))
    explore = np.zeros(0, np.int64)
    if n_explore > 0:
        pool, w = order.exploration_pool(seen, min(int(cfg.sample_window * n_explore), n_unseen), prefer,
                                          functools.partial(duration_penalty, prefer, cfg.round_penalty))
        explore = rng.choice(pool, n_explore, replace=False, p=w / max(1e-4, float(w.sum())))
    state.update(exploration=exploration, threshold=thr, exploit_util=hist, exploited=np.asarray(exploit, np.int64))
    return np.concatenate([explore, exploit]).astype(np.int64)
