"""The privacy accountant: ``epsilon`` spent so far, from Google's ``dp-accounting`` library (RDP or PLD).

:class:`PrivacyAccountant` holds no copy of the noise or the sampling: it reads them from the pipeline's
stages (:class:`~flgraph.stages.privacy.DPSetup`), and describes each round as a ``dp-accounting`` event:

* central DP, ``Select(sampling="poisson")``: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under the
  add/remove-one relation (one client's data present or absent), ``q`` the inclusion probability;
* central DP, a fixed number ``n`` of ``N`` clients drawn without replacement:
  ``SampledWithoutReplacementDpEvent(N, n, GaussianDpEvent(z / 2))`` under the replace-one relation, the
  only one that analysis supports (the round's size is fixed, so one client's data is *replaced*, and the
  clipped sum moves by up to ``2 C``: hence ``z / 2``). The RDP accountant only; PLD does not support it;
* local DP (noise on each update): ``GaussianDpEvent(z / 2)`` per round under replace-one, with no
  amplification by sampling (the server sees who took part); the bound holds for a client chosen every
  round.

``z`` is the effective noise multiplier: with adaptive clipping, that of the update and the clipped count
together (Andrew et al.: ``(z_update^-2 + (2 sigma_b)^-2)^-1/2``). The events of past rounds are the
stage's checkpointed state, so a resumed run (even one resumed with another noise multiplier) accounts
every round as it ran. The unit of privacy is the client (user-level DP).

At each round's start the accountant computes the epsilon the run will have spent *after* the round; with
``max_epsilon`` set, a round that would exceed it is not run (:class:`~flgraph.errors.StopRun`).

Example:
    >>> round(epsilon([(poisson_event(0.01, 1.1), 1000)], 1e-5), 3)
    1.712
    >>> round(epsilon([(poisson_event(0.01, 1.1), 1000)], 1e-5, method="pld"), 2)
    1.52
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from flgraph.context import RoundContext
from flgraph.errors import ConfigError, PipelineError, StopRun
from flgraph.graph import ServerStage, Stage
from flgraph.params import Params

from .privacy import DPSetup, dp_setup

__all__ = ["PrivacyAccountant", "epsilon", "local_event", "poisson_event", "without_replacement_event"]

_POISSON, _FIXED, _LOCAL = 0, 1, 2
_KINDS = {_POISSON: "Poisson sampling", _FIXED: "fixed-size sampling", _LOCAL: "local noise"}


def _dpa() -> Any:
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError("the privacy accountant needs the dp-accounting package",
                          fix="pip install 'flgraph[dp]' (or pip install dp-accounting)") from None
    return dp_accounting


def poisson_event(q: float, noise_multiplier: float) -> Any:
    """One round of central DP with Poisson sampling at rate ``q`` (add/remove-one)."""
    dpa = _dpa()
    return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(noise_multiplier))


def without_replacement_event(population: int, sample: int, noise_multiplier: float) -> Any:
    """One round of central DP with ``sample`` of ``population`` drawn without replacement (replace-one)."""
    dpa = _dpa()
    return dpa.SampledWithoutReplacementDpEvent(population, sample, dpa.GaussianDpEvent(noise_multiplier / 2))


def local_event(noise_multiplier: float) -> Any:
    """One round of local DP for one client (replace-one: its clipped update moves by up to 2 C)."""
    return _dpa().GaussianDpEvent(noise_multiplier / 2)


def epsilon(events: list[tuple[Any, int]], delta: float, *, method: str = "rdp", replace_one: bool = False) -> float:
    """``epsilon`` at ``delta`` after composing each ``(event, count)`` with ``dp-accounting``."""
    dpa = _dpa()
    rel = dpa.NeighboringRelation.REPLACE_ONE if replace_one else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    if method == "rdp":
        acc: Any = dpa.rdp.RdpAccountant(neighboring_relation=rel)
    else:
        acc = dpa.pld.PLDAccountant(neighboring_relation=rel)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # RDP: "failed to converge ... excluding this order" for some fractional orders
    try:
        for event, count in events:
            acc.compose(event, int(count))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


class PrivacyAccountant(ServerStage):
    """Report ``epsilon`` (at ``delta``) after each round; stop the run before a round that would spend more
    than ``max_epsilon``. ``method``: ``"rdp"`` (Rényi DP, Mironov et al.) or ``"pld"`` (privacy loss
    distributions: tighter; Poisson sampling or local noise only).

    Put it first in the round (it decides whether the round runs). It reads ``Select``'s sampling and the
    noise multiplier of :class:`~flgraph.stages.DPAggregate` (or of ``ClipUpdate(noise_multiplier=...)``).
    """

    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, delta: float = 1e-5, *, max_epsilon: float | None = None, method: str = "rdp") -> None:
        if not 0 < delta < 1:
            raise ConfigError(f"PrivacyAccountant(delta={delta}): must be in (0, 1)",
                              fix="e.g. delta=1e-5 (well below 1 / population)")
        if max_epsilon is not None and (not max_epsilon > 0 or not math.isfinite(max_epsilon)):
            raise ConfigError(f"PrivacyAccountant(max_epsilon={max_epsilon}): must be positive and finite")
        if method not in ("rdp", "pld"):
            raise ConfigError(f"PrivacyAccountant(method={method!r})", fix="use 'rdp' or 'pld'")
        _dpa()  # refuse now, not in the first round, when the library is missing
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.method = method
        self._setup: DPSetup | None = None
        self._cache: dict[tuple[Any, ...], float] = {}

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"delta": self.delta, "method": self.method}
        if self.max_epsilon is not None:
            out["max_epsilon"] = self.max_epsilon
        return out

    def see_pipeline(self, stages: tuple[Stage, ...]) -> None:
        first_client = next((i for i, s in enumerate(stages) if s.kind == "client"), len(stages))
        if stages.index(self) > first_client:
            raise PipelineError("PrivacyAccountant runs after the clients: it decides whether a round runs",
                                fix="put st.PrivacyAccountant(...) first in the round")
        if any(getattr(s, "asynchronous", False) for s in stages):
            raise ConfigError("PrivacyAccountant accounts synchronous rounds; an asynchronous aggregate has no "
                              "rounds of sampled clients", fix="use a synchronous Aggregate with DP")
        self._setup = dp_setup(stages)

    def prepare(self, dataset: Any, model_source: Any) -> None:
        if self._setup is None:
            raise PipelineError("PrivacyAccountant was not shown its pipeline", fix="run it inside flgraph.Run")
        self._setup.size(dataset.num_clients)
        row = self.round_row()
        if self.method == "pld" and row[0] == _FIXED:
            raise ConfigError("PrivacyAccountant(method='pld') with fixed-size sampling: dp-accounting's PLD "
                              "accountant has no analysis of sampling without replacement",
                              fix="use method='rdp', or Select(fraction=q, sampling='poisson')")

    def init_state(self, params: Params) -> dict[str, Any]:
        return {"events": np.zeros((0, 4))}

    def round_row(self) -> tuple[float, float, float, float]:
        """This pipeline's round as ``(kind, population, q or sample size, noise multiplier)``."""
        s = self._setup
        assert s is not None and s.population > 0, "prepare() runs first"
        if s.mode == "local":
            return (_LOCAL, s.population, s.select.count(s.population), s.noise_multiplier)
        if s.select.sampling == "poisson":
            return (_POISSON, s.population, s.select.rate(s.population), s.noise_multiplier)
        return (_FIXED, s.population, s.select.count(s.population), s.noise_multiplier)

    def spent(self, rows: np.ndarray) -> float:
        """``epsilon`` at ``delta`` after the rounds ``rows`` (one :meth:`round_row` each)."""
        if len(rows) == 0:
            return 0.0
        kinds = {int(k) for k in rows[:, 0]}
        if len(kinds) > 1:
            raise ConfigError("the run's rounds mix " + " and ".join(_KINDS[k] for k in sorted(kinds)) + ", which "
                              "dp-accounting analyses under different neighbouring relations",
                              fix="keep the sampling and the place of the noise for the whole run")
        groups = Counter(tuple(float(x) for x in r) for r in rows)
        key = (self.method, self.delta, *sorted(groups.items()))
        if key not in self._cache:
            events = []
            for (kind, population, x, z), count in sorted(groups.items()):
                if kind == _POISSON:
                    events.append((poisson_event(x, z), count))
                elif kind == _FIXED:
                    events.append((without_replacement_event(int(population), int(x), z), count))
                else:
                    events.append((local_event(z), count))
            self._cache[key] = epsilon(events, self.delta, method=self.method, replace_one=kinds != {_POISSON})
        return self._cache[key]

    def run(self, ctx: RoundContext) -> None:
        if self._setup is None:
            raise PipelineError("PrivacyAccountant was not shown its pipeline", fix="run it inside flgraph.Run")
        before = np.asarray(ctx.state.get("events", np.zeros((0, 4))), np.float64).reshape(-1, 4)
        rows = np.vstack([before, np.asarray([self.round_row()], np.float64)])
        eps = self.spent(rows)
        if self.max_epsilon is not None and eps > self.max_epsilon:
            raise StopRun(f"privacy budget: round {ctx.round} would bring epsilon to {eps:.4g} at delta "
                          f"{self.delta:g}, over max_epsilon={self.max_epsilon:g} (spent so far: "
                          f"{self.spent(before):.4g} after {len(before)} rounds)")
        ctx.state["events"] = rows  # a new array: the round commits it
        ctx.metrics["epsilon"] = eps
        ctx.metrics["dp_delta"] = self.delta
        if self._setup.insecure:
            ctx.metrics["dp_insecure_noise"] = 1  # insecure_seed= somewhere: these figures protect nothing
