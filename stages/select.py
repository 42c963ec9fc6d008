"""Select: choose the round's clients (server stage).

Uniform without replacement by default, a count or a fraction of the population, seeded per round from
the run seed (stream ``(tag, round)``). ``weighting="samples"`` draws without replacement with
probability proportional to each client's sample count (the sample counts are read once per run, in the
driver). ``sampling="poisson"`` includes each client independently with probability ``fraction`` (or
``clients / population``): the round's size varies, as the privacy analysis of Poisson subsampling
assumes. Bring your own sampler with ``sampler=``. ``available=`` skips clients that are away: only
clients available at the round's start are drawn.

Example:
    >>> import numpy as np
    >>> from flgraph import stages as st
    >>> sel = st.Select(clients=3)
    >>> sel.count(10), st.Select(fraction=0.25).count(10)
    (3, 3)
    >>> st.Select(clients=3, weighting="samples")
    Select(clients=3, fraction=None, sampler=None, weighting='samples', over_select=1.0)
    >>> st.Select(fraction=0.1, sampling="poisson").count(1000)  # the expected count
    100
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from flgraph.context import ClientSet, RoundContext
from flgraph.errors import ClientError, ConfigError, DataError
from flgraph.graph import ServerStage
from flgraph.rng import stream

from .available_draw import draw_available

__all__ = ["Sampler", "Select", "is_pure_sampler", "pure_sampler"]

# Up to this many clients, availability is checked for every client each round (an exact
# ``clients_available``); above it the round draws candidates in seeded random order and keeps the first
# available ones (stages/available_draw.py), checking O(clients per round) clients.
EXACT_AVAILABILITY_UP_TO = 100_000

Sampler = Callable[[int, np.ndarray, int, np.random.Generator], "Sequence[int] | np.ndarray | ClientSet"]

_PURE = "__flgraph_pure_sampler__"
S = TypeVar("S")


def pure_sampler(sampler: S) -> S:
    """Declare that a sampler's choice depends on its arguments only: ``(round, population, count, rng)``.

    Decorate a function, or a class whose instances are called as samplers. flgraph may then call it for
    the next round while the current one trains (:meth:`Select.lookahead`), taking the choice off the
    critical path between rounds; the choice, and so the run, is the same as when it is called at its
    round. An undecorated sampler (one that keeps state, reads a clock or a file) is called once, at its
    round.

    Purity is marked on the sampler itself, not on the stage, so it travels with it: a decorated function
    is returned unchanged (the same object, still recorded in the pipeline spec by its import path), and a
    resumed run that imports it again finds it pure.

    Example:
        >>> import numpy as np
        >>> from flgraph import stages as st
        >>> @st.pure_sampler
        ... def every_other(round, population, count, rng):
        ...     return population[round % 2::2][:count]
        >>> st.is_pure_sampler(every_other), st.is_pure_sampler(lambda *a: [])
        (True, False)
        >>> every_other(1, np.arange(10), 3, None).tolist()
        [1, 3, 5]
    """
    if not callable(sampler):
        raise ConfigError(f"pure_sampler({sampler!r}): a sampler is a function or a class of callable objects",
                          fix="decorate a function (round, population, count, rng) -> client ids")
    try:
        setattr(sampler, _PURE, True)
    except (AttributeError, TypeError):
        raise ConfigError(f"pure_sampler cannot mark {sampler!r} (it takes no attributes, e.g. a bound method)",
                          fix="decorate the function or the class itself, or wrap it in a function") from None
    return sampler


def is_pure_sampler(sampler: Any) -> bool:
    """Whether ``sampler`` (or its class) was decorated with :func:`pure_sampler`."""
    return getattr(sampler, _PURE, False) is True


class Select(ServerStage):
    """Choose ``clients`` (a count) or ``fraction`` of the population each round.

    ``sampler(round, population, count, rng)`` replaces the uniform choice; it returns client ids (or a
    :class:`~flgraph.context.ClientSet` with per-client settings). ``rng`` is this round's seeded stream.
    ``over_select=1.3`` draws ceil(1.3 N) clients and aggregates the first N to finish (by simulated time
    with :class:`~flgraph.stages.Simulate`, else by real time); the others count as dropped.

    A sampler decorated with :func:`pure_sampler` (its choice depends on its arguments only, a seeded
    choice per round, as W1's is) may be called for the next round while the current one trains
    (:meth:`lookahead`). The built-in choice is always pure. An undecorated sampler is called once, at its
    round.

    ``available`` skips clients that are away. Either a :class:`~flgraph.sim.DevicePopulation` (a client is
    available when its device is online at the round's start on the virtual clock of the pipeline's
    :class:`~flgraph.stages.Simulate`), or a function ``available(ids, round=..., time=...)`` returning a
    bool mask over ``ids`` (``time``: the virtual clock in seconds, ``None`` without Simulate). The round
    draws from the available clients only (all of them when fewer are available than asked for) and
    reports ``clients_available``. Above 100,000 clients (uniform choice, no sampler) the round checks only
    candidates drawn in seeded random order until enough are available, so it costs O(clients per round),
    and reports ``clients_available_est`` instead: the population times the share of checked candidates
    that were available (when few clients are available it checks them all, as below 100,000, and reports
    the exact ``clients_available``). With asynchronous rounds each dispatch draws from the clients
    available at its virtual start time (above 100,000 clients checking candidates in the same way).

    Example:
        >>> import numpy as np
        >>> even = lambda ids, round, time: ids % 2 == 0   # odd clients are away
        >>> Select(clients=3, available=even).available_mask(np.arange(6), 1, None).tolist()
        [True, False, True, False, True, False]
    """

    provides: ClassVar[frozenset[str]] = frozenset({"clients"})

    def __init__(
        self,
        clients: int | None = None,
        *,
        fraction: float | None = None,
        sampler: Sampler | None = None,
        weighting: str = "uniform",
        over_select: float = 1.0,
        available: Any = None,
        sampling: str = "fixed",
        **removed: Any,
    ) -> None:
        if "sampler_is_pure" in removed:
            raise ConfigError("Select(sampler_is_pure=...) was removed: purity is a property of the sampler",
                              fix="decorate the sampler with @flgraph.stages.pure_sampler (a function or a "
                                  "class) and drop sampler_is_pure=")
        if removed:
            raise TypeError(f"Select() got unexpected keyword arguments: {', '.join(sorted(removed))}")
        if (clients is None) == (fraction is None):
            raise ConfigError("Select needs exactly one of clients= or fraction=",
                              fix="e.g. st.Select(clients=100) or st.Select(fraction=0.1)")
        if clients is not None and clients < 1:
            raise ConfigError(f"Select(clients={clients}): the count must be >= 1")
        if fraction is not None and not 0 < fraction <= 1:
            raise ConfigError(f"Select(fraction={fraction}): the fraction must be in (0, 1]")
        if weighting not in ("uniform", "samples"):
            raise ConfigError(f"Select(weighting={weighting!r})", fix="use 'uniform' or 'samples'")
        if weighting != "uniform" and sampler is not None:
            raise ConfigError("Select(weighting=..., sampler=...): a sampler makes its own choice",
                              fix="drop weighting= or sampler=")
        if over_select < 1.0:
            raise ConfigError(f"Select(over_select={over_select}): must be >= 1 (e.g. 1.3 selects 30% more)")
        if available is not None and not callable(available) and not hasattr(available, "online_mask"):
            raise ConfigError(f"Select(available={available!r}) is neither a DevicePopulation nor a function",
                              fix="pass a DevicePopulation or a function (ids, round=..., time=...) -> bool mask")
        if sampling not in ("fixed", "poisson"):
            raise ConfigError(f"Select(sampling={sampling!r})", fix="use 'fixed' (a fixed count) or 'poisson'")
        if sampling == "poisson":
            extra = [name for name, v in (("sampler", sampler), ("available", available)) if v is not None]
            extra += ["weighting='samples'"] if weighting != "uniform" else []
            extra += ["over_select"] if over_select != 1.0 else []
            if extra:
                raise ConfigError(f"Select(sampling='poisson', {', '.join(extra)}): Poisson sampling includes "
                                  "every client independently with the same probability",
                                  fix=f"drop {', '.join(extra)}, or use sampling='fixed'")
        self.clients = clients
        self.fraction = fraction
        self.sampler = sampler
        self.weighting = weighting
        self._weights: tuple[int, np.ndarray] | None = None
        self.over_select = over_select
        self.available = available
        self.sampling = sampling
        self._ahead: tuple[int, int, int, ClientSet] | None = None  # (round, seed, id(dataset), clients)

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        if out.get("available") is None:
            out.pop("available", None)  # the default: every client is always available
        if out.get("sampling") == "fixed":
            out.pop("sampling", None)  # the default, kept out of the specs of runs that predate it
        return out

    def see_pipeline(self, stages: tuple[Any, ...]) -> None:
        """Refuse, before the run starts, Poisson sampling with an asynchronous aggregate (it dispatches
        clients one at a time, so there is no round to sample)."""
        if self.sampling == "poisson" and any(getattr(s, "asynchronous", False) for s in stages):
            raise ConfigError("Select(sampling='poisson') with an asynchronous aggregate: clients are dispatched "
                              "one at a time, not sampled per round", fix="use sampling='fixed'")

    def rate(self, population: int) -> float:
        """The probability that a given client takes part in a round (Poisson: the inclusion probability;
        fixed: ``count / population``, each subset of that size equally likely)."""
        if self.fraction is not None:
            return float(self.fraction) if self.sampling == "poisson" else self.count(population) / population
        assert self.clients is not None
        return min(1.0, self.clients / population)

    def available_mask(self, ids: np.ndarray, rnd: int, time: float | None) -> np.ndarray:
        """Which of ``ids`` are available in round ``rnd`` at virtual time ``time`` (all without ``available``)."""
        if self.available is None:
            return np.ones(len(ids), bool)
        if hasattr(self.available, "online_mask"):
            if time is None:
                raise ConfigError("Select(available=DevicePopulation) reads the virtual clock, and the pipeline "
                                  "has no Simulate stage", fix="add st.Simulate(devices) after Select, or pass a "
                                                               "function available(ids, round=..., time=...)")
            mask = self.available.online_mask(ids, time)
        else:
            mask = self.available(ids, round=rnd, time=time)
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (len(ids),):
            raise ConfigError(f"Select(available=...) returned {mask.dtype}{list(mask.shape)}; expected a bool mask "
                              f"of shape [{len(ids)}]", fix="return one bool per client id, True when available")
        return mask

    def lookahead(self, rnd: int, seed: int, dataset: Any) -> ClientSet | None:
        """Choose round ``rnd``'s clients now, ahead of that round, and keep them for it; None when the choice
        may depend on more than the round (``available=``, a sampler not decorated with :func:`pure_sampler`)
        or fails (the error then surfaces at the round itself).

        The engine calls this while the previous round's clients train (see
        :meth:`flgraph.engine.SyncEngine.lookahead`), so that :meth:`run` finds the round's clients chosen
        and checked, off the critical path between two rounds. The choice is the one :meth:`run` would make.

        Example:
            >>> import numpy as np
            >>> from flgraph.data import FederatedDataset
            >>> ds = FederatedDataset.from_arrays(np.zeros((8, 1)), np.zeros(8, np.int64), [[i] for i in range(8)])
            >>> ahead = Select(clients=3).lookahead(4, 0, ds)
            >>> ahead.ids.tolist() == Select(clients=3).lookahead(4, 0, ds).ids.tolist()
            True
            >>> Select(clients=3, sampler=lambda r, pop, n, rng: pop[:n]).lookahead(4, 0, ds) is None
            True
        """
        self._ahead = None
        if self.available is not None or (self.sampler is not None and not is_pure_sampler(self.sampler)):
            return None
        try:
            clients = self._select(rnd, seed, dataset, None, {})
        except Exception:
            return None
        self._ahead = (rnd, seed, id(dataset), clients)
        return clients

    def draw(self, population: np.ndarray | int, count: int, *, seed: int, round: int | None = None,
             dispatch: int | None = None, p: np.ndarray | None = None) -> ClientSet:
        """The seeded draw itself: ``count`` clients of ``population``, unchecked.

        A synchronous round draws all its clients at once (``round=``, from this stage's stream for the
        round); an asynchronous run draws one client per dispatch (``dispatch=``, the dispatch's index, from
        a stream of its own, so the draw does not depend on which client arrived first). The choice is
        uniform without replacement, or proportional to ``p`` (probabilities over ``population``), or the
        ``sampler``'s. :meth:`run` narrows ``population`` to the available clients and checks the ids the
        draw returns; a caller of ``draw`` does both itself. An int ``population`` ``n`` stands for
        ``arange(n)`` (positions, without building them) and needs the built-in choice.

        Example:
            >>> import numpy as np
            >>> sel = Select(clients=3)
            >>> a = sel.draw(np.arange(10), 3, seed=0, round=1)
            >>> a.ids.tolist() == sel.draw(np.arange(10), 3, seed=0, round=1).ids.tolist(), len(a)
            (True, 3)
            >>> len(sel.draw(np.arange(10), 1, seed=0, dispatch=7))
            1
        """
        if (round is None) == (dispatch is None):
            raise ConfigError("Select.draw needs exactly one of round= (a synchronous round) or dispatch= "
                              "(an asynchronous dispatch)")
        # rounds count from 1, so a dispatch's stream (tag, 0, dispatch) never meets a round's (tag, round)
        if round is not None:
            rng = stream(seed, self.tag, round)
        else:
            assert dispatch is not None
            rng = stream(seed, self.tag, 0, dispatch)
        if self.sampling == "poisson":
            if round is None:
                raise ConfigError("Select(sampling='poisson') draws whole rounds; an asynchronous run dispatches "
                                  "clients one by one", fix="use sampling='fixed' with asynchronous rounds")
            ids = np.arange(population) if isinstance(population, int) else population
            q = self.rate(len(ids))
            chosen: Any = ids[rng.random(len(ids)) < q]
        elif self.sampler is None:
            # with count=1 this is the same draw as rng.choice(population): numpy draws one bounded integer
            chosen = rng.choice(population, size=count, replace=False, p=p)
        else:
            if not isinstance(population, np.ndarray):
                raise ConfigError("Select.draw(population=<int>) draws positions with the built-in choice; "
                                  "a sampler needs the population's ids", fix="pass the ids as an array")
            chosen = self.sampler(round if round is not None else 0, population, count, rng)
        return chosen if isinstance(chosen, ClientSet) else ClientSet(np.asarray(chosen, dtype=np.int64))

    def _drawn(self, count: int) -> int:
        """Clients drawn for a round that keeps ``count`` (over-selection draws ceil(f * count))."""
        return math.ceil(self.over_select * count) if self.over_select > 1.0 else count

    def count(self, population: int) -> int:
        """How many clients a round selects from a population of ``population``."""
        if self.sampling == "poisson":
            return max(1, round(self.rate(population) * population))  # the expected count
        if self.clients is not None:
            return self.clients
        assert self.fraction is not None
        return max(1, math.ceil(self.fraction * population))

    def probabilities(self, dataset: Any) -> np.ndarray:
        """Selection probabilities of ``dataset.client_ids`` under ``weighting="samples"`` (cached per dataset)."""
        if self._weights is None or self._weights[0] != id(dataset):
            counts = np.array([dataset.num_samples(int(c)) for c in dataset.client_ids], np.float64)
            if counts.sum() <= 0:
                raise ConfigError("Select(weighting='samples'): every client has 0 samples")
            self._weights = (id(dataset), counts / counts.sum())
        return self._weights[1]

    def prepare(self, dataset: Any, model_source: Any) -> None:
        if self.sampler is None and self._drawn(self.count(dataset.num_clients)) > dataset.num_clients:
            raise ConfigError(
                f"Select(clients={self.clients}) asks for more clients than the dataset holds "
                f"({dataset.num_clients})",
                fix=f"select at most {dataset.num_clients} clients",
            )
        if self.sampling == "poisson" and (1.0 - self.rate(dataset.num_clients)) ** dataset.num_clients > 1e-9:
            raise ConfigError(f"Select(sampling='poisson'): with inclusion probability "
                              f"{self.rate(dataset.num_clients):.3g} over {dataset.num_clients} clients a round "
                              "may well select nobody", fix="raise fraction= (expect at least ~20 clients a round)")
        if self.weighting == "samples":
            p = self.probabilities(dataset)
            if np.count_nonzero(p) < self.count(dataset.num_clients):
                raise ConfigError(f"Select(weighting='samples') needs {self.count(dataset.num_clients)} clients "
                                  f"with samples, the dataset has {np.count_nonzero(p)}",
                                  fix="select fewer clients, or use weighting='uniform'")

    def run(self, ctx: RoundContext) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:3] == (ctx.round, ctx.seed, id(ctx.dataset)):
            clients = ahead[3]  # chosen by lookahead(), exactly as below
        else:
            clients = self._select(ctx.round, ctx.seed, ctx.dataset, ctx.time, ctx.metrics)
        ctx.clients = clients
        ctx.metrics["clients_selected"] = len(clients)

    def _select(self, rnd: int, seed: int, dataset: Any, time: float | None,
                metrics: dict[str, Any]) -> ClientSet:
        """Round ``rnd``'s clients, checked against ``dataset`` (``metrics`` gets ``clients_available``)."""
        population = dataset.client_ids
        count = self.count(len(population))
        p = self.probabilities(dataset) if self.weighting == "samples" and self.sampler is None else None
        if (self.available is not None and self.sampler is None and p is None
                and len(population) > EXACT_AVAILABILITY_UP_TO):
            sparse = draw_available(population, self._drawn(count), stream(seed, self.tag, rnd),
                                    lambda ids: self.available_mask(ids, rnd, time))
            if sparse is not None:
                metrics["clients_available_est"] = sparse.available_estimate
                clients = ClientSet(sparse.ids)
                if self.over_select > 1.0 and len(clients) > count:
                    clients.keep_first = count
                return clients  # ids of the population, available: no check_ids needed
        if self.available is not None:
            mask = self.available_mask(population, rnd, time)
            population = population[mask]
            metrics["clients_available"] = len(population)
            if p is not None:
                p = p[mask]
                population = population[p > 0]
                p = p[p > 0] / p[p > 0].sum() if p[p > 0].sum() > 0 else None
            if len(population) == 0:
                when = f" at virtual time {time:.0f} s" if time is not None else ""
                raise ConfigError(f"round {rnd}: no client is available{when}",
                                  fix="check the availability function or trace (some client must be online)")
            count = min(count, len(population))
        drawn = min(self._drawn(count), len(population))
        clients = self.draw(population, drawn, seed=seed, round=rnd, p=p)
        if self.over_select > 1.0 and len(clients) > count:
            clients.keep_first = count  # the first `count` to finish are aggregated, the rest dropped
        if len(clients) == 0:
            raise ConfigError(f"round {rnd}: Select chose no client", fix="check the sampler")
        try:
            dataset.check_ids(clients.ids)
        except DataError as e:
            unknown = [int(c) for c in clients.ids if int(c) not in dataset]
            raise ClientError(e.message, client=unknown[0], stage="Select", round=rnd,
                              fix="the sampler must return ids of the dataset (dataset.client_ids)") from None
        return clients
