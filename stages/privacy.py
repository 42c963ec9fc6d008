"""Update clipping and central differential privacy: reducer wrappers and an RDP accountant.

* :class:`ClipNorm` wraps any reducer and scales each client delta down to L2 norm at most ``max_norm``
  before the inner reducer sees it (``leaf``): update norm clipping, on its own or for DP.
* :class:`GaussianNoise` wraps a ``ClipNorm`` over a uniform :class:`~flgraph.stages.WeightedMean` and adds
  Gaussian noise of standard deviation ``noise_multiplier * max_norm`` to the *sum* of the clipped deltas,
  i.e. ``noise_multiplier * max_norm / n`` to their mean (DP-FedAvg, McMahan et al., ICLR 2018, with the
  round's actual client count as the denominator). The noise is seeded from the flgraph stream
  ``(seed, tag, round)``.

The order is the order of the operations, outermost last: ``GaussianNoise(ClipNorm(WeightedMean("uniform")))``
clips each update, then noises the sum, then takes the mean; wrong stacks are refused when they are built
(noise over unclipped or sample-weighted updates, clipping after the noise, noise over a robust reducer).
:func:`dp_mean` builds the right stack.

:class:`PrivacyAccountant` is a server stage that reports the ``epsilon`` spent so far at a given ``delta``,
from the Rényi-DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism", Sec. 3.3: exact for integer orders) converted to
``(epsilon, delta)`` with Balle et al. 2020 (Thm. 21). The sampling rate is the round's clients over the
population; the analysis assumes Poisson sampling, a standard approximation for a fixed-size uniform choice.
It is written here (about 30 lines of numpy, tested against closed forms and a numerical integral) rather
than taken from ``dp-accounting`` / ``opacus`` to keep torch-free, dependency-free server code.

Example:
    >>> from flgraph import stages as st
    >>> st.dp_mean(max_norm=1.0, noise_multiplier=1.1)
    GaussianNoise(ClipNorm(WeightedMean(weight='uniform', dtype=None), max_norm=1.0), noise_multiplier=1.1, seed=0)
    >>> st.ClipNorm(st.dp_mean(max_norm=1.0, noise_multiplier=1.1), max_norm=1.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    flgraph.errors.ConfigError: ClipNorm wraps GaussianNoise: clipping after the noise breaks the noise's calibration
      fix: clip first, then noise, then mean: GaussianNoise(ClipNorm(WeightedMean('uniform'), max_norm=C), ...
    >>> round(epsilon(sampling_rate=0.01, noise_multiplier=1.1, steps=1000, delta=1e-5), 2)
    1.73
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from flgraph.context import RoundContext, Update
from flgraph.errors import ConfigError
from flgraph.graph import Reducer, ServerStage
from flgraph.params import Params, ParamSpec
from flgraph.rng import stage_tag, stream

from .aggregate import WeightedMean

__all__ = ["ClipNorm", "GaussianNoise", "PrivacyAccountant", "dp_mean", "epsilon", "rdp_sampled_gaussian"]

#: Rényi orders the accountant tracks (integers: the sampled Gaussian's RDP is exact there).
ORDERS: tuple[int, ...] = (*tuple(range(2, 65)), 80, 96, 128, 160, 192, 256, 384, 512)

_FIX_ORDER = ("clip first, then noise, then mean: "
              "GaussianNoise(ClipNorm(WeightedMean('uniform'), max_norm=C), noise_multiplier=z)")


class ClipNorm(Reducer):
    """Scale each client delta to L2 norm at most ``max_norm``, then hand it to ``inner``."""

    def __init__(self, inner: Reducer | None = None, *, max_norm: float = 1.0) -> None:
        if not max_norm > 0 or not math.isfinite(max_norm):
            raise ConfigError(f"ClipNorm(max_norm={max_norm}): must be a positive finite norm")
        inner = inner if inner is not None else WeightedMean()
        if isinstance(inner, GaussianNoise):
            raise ConfigError("ClipNorm wraps GaussianNoise: clipping after the noise breaks the noise's "
                              "calibration", fix=_FIX_ORDER)
        if not isinstance(inner, Reducer):
            raise ConfigError(f"ClipNorm(inner={inner!r}): inner must be a reducer, e.g. WeightedMean()")
        self.inner = inner
        self.max_norm = max_norm
        self.needs_all = inner.needs_all  # type: ignore[misc]

    def leaf(self, update: Update, spec: ParamSpec) -> Any:
        delta = update.decoded(spec)
        if update.delta is not delta:
            delta = np.array(delta, copy=True)
        norm = float(np.linalg.norm(delta.astype(np.float64, copy=False)))
        if norm > self.max_norm:
            delta *= delta.dtype.type(self.max_norm / norm)
        update.delta, update.payload, update.codec = delta, None, None
        return self.inner.leaf(update, spec)

    def combine(self, left: Any, right: Any) -> Any:
        return self.inner.combine(left, right)

    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[Any, float]:
        return self.inner.finalize(acc, spec)

    def settings(self) -> dict[str, Any]:
        return {"inner": self.inner, "max_norm": self.max_norm}

    def __repr__(self) -> str:
        return f"ClipNorm({self.inner!r}, max_norm={self.max_norm!r})"


class GaussianNoise(Reducer):
    """Central DP: add ``N(0, (noise_multiplier * max_norm)^2)`` to the sum of the clipped deltas.

    ``inner`` must be ``ClipNorm(WeightedMean("uniform"), max_norm=C)``: the sum of clipped deltas has L2
    sensitivity ``C`` to one client. The noise of round ``r`` comes from ``flgraph.rng.stream(seed, tag, r)``
    (the round is read from the updates), so a run is reproducible; pass a fresh ``seed`` per run.
    """

    def __init__(self, inner: Reducer | None = None, *, noise_multiplier: float = 1.0, seed: int = 0) -> None:
        if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
            raise ConfigError(f"GaussianNoise(noise_multiplier={noise_multiplier}): must be finite and >= 0")
        if not isinstance(inner, ClipNorm):
            what = type(inner).__name__ if inner is not None else "nothing"
            raise ConfigError(f"GaussianNoise wraps {what}, not ClipNorm: without clipping, one client can "
                              "move the sum arbitrarily and no noise scale protects it", fix=_FIX_ORDER)
        mean = inner.inner
        if not isinstance(mean, WeightedMean) or mean.weight != "uniform":
            raise ConfigError(f"GaussianNoise(ClipNorm({mean!r})): the noise is calibrated for the uniform mean "
                              "of clipped deltas (a sample-weighted or robust aggregate has another sensitivity)",
                              fix=_FIX_ORDER)
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.seed = seed

    def leaf(self, update: Update, spec: ParamSpec) -> tuple[Any, int]:
        return self.inner.leaf(update, spec), update.base_round + 1

    def combine(self, left: Any, right: Any) -> tuple[Any, int]:
        return self.inner.combine(left[0], right[0]), max(left[1], right[1])

    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[np.ndarray, float]:
        inner_acc, rnd = acc
        count = float(inner_acc[1])  # the uniform mean's weight: the number of updates
        mean, weight = self.inner.finalize(inner_acc, spec)
        std = self.noise_multiplier * self.inner.max_norm / count
        rng = stream(self.seed, stage_tag("GaussianNoise"), rnd)
        noisy = mean.astype(np.float64) + rng.normal(0.0, std, mean.shape)
        return noisy.astype(spec.carrier), weight

    def settings(self) -> dict[str, Any]:
        return {"inner": self.inner, "noise_multiplier": self.noise_multiplier, "seed": self.seed}

    def __repr__(self) -> str:
        return f"GaussianNoise({self.inner!r}, noise_multiplier={self.noise_multiplier!r}, seed={self.seed!r})"


def dp_mean(max_norm: float, noise_multiplier: float, *, seed: int = 0) -> GaussianNoise:
    """The DP-FedAvg aggregate: clip each delta to ``max_norm``, noise the sum, take the mean."""
    return GaussianNoise(ClipNorm(WeightedMean("uniform"), max_norm=max_norm),
                         noise_multiplier=noise_multiplier, seed=seed)


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    lg = np.vectorize(math.lgamma, otypes=[float])
    out: np.ndarray = lg(n + 1.0) - lg(k + 1.0) - lg(n - k + 1.0)
    return out


def rdp_sampled_gaussian(sampling_rate: float, noise_multiplier: float,
                         orders: tuple[int, ...] = ORDERS) -> np.ndarray:
    """Rényi DP of one step of the sampled Gaussian mechanism at each integer order (Mironov et al. 2019).

    ``log(sum_k C(a, k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))) / (a - 1)``; ``q = 1`` gives the
    Gaussian mechanism's ``a / (2 sigma^2)``.
    """
    q, sigma = float(sampling_rate), float(noise_multiplier)
    if not 0 <= q <= 1:
        raise ConfigError(f"sampling rate {q} is not in [0, 1]")
    out = np.empty(len(orders))
    for i, a in enumerate(orders):
        if int(a) != a or a < 2:
            raise ConfigError(f"order {a}: the accountant uses integer orders >= 2")
        if q == 0:
            out[i] = 0.0
        elif sigma == 0:
            out[i] = math.inf
        elif q == 1:
            out[i] = a / (2 * sigma**2)
        else:
            k = np.arange(a + 1, dtype=np.float64)
            terms = _log_comb(a, k) + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
            top = terms.max()
            out[i] = (top + math.log(np.exp(terms - top).sum())) / (a - 1)
    return out


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: tuple[int, ...] = ORDERS) -> float:
    """The smallest ``epsilon`` at ``delta`` over the orders (conversion of Balle et al. 2020, Thm. 21)."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta={delta} must be in (0, 1)", fix="e.g. delta=1e-5 (below 1 / population)")
    a = np.asarray(orders, np.float64)
    eps = rdp + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return float(max(0.0, np.nanmin(eps)))


def epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """``epsilon`` after ``steps`` rounds of the sampled Gaussian mechanism at ``delta``."""
    return epsilon_from_rdp(steps * rdp_sampled_gaussian(sampling_rate, noise_multiplier), delta)


class PrivacyAccountant(ServerStage):
    """Report the privacy spent so far: ``epsilon`` at ``delta`` after each round (a server stage after
    Aggregate). ``noise_multiplier`` must be the one of the run's :class:`GaussianNoise`.

    The running Rényi-DP (one value per order) is the stage's explicit state, so it is checkpointed.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"clients"})

    def __init__(self, noise_multiplier: float, *, delta: float = 1e-5) -> None:
        if not noise_multiplier >= 0:
            raise ConfigError(f"PrivacyAccountant(noise_multiplier={noise_multiplier}): must be >= 0")
        if not 0 < delta < 1:
            raise ConfigError(f"PrivacyAccountant(delta={delta}): must be in (0, 1)",
                              fix="e.g. delta=1e-5 (below 1 / population)")
        self.noise_multiplier = noise_multiplier
        self.delta = delta

    def init_state(self, params: Params) -> dict[str, Any]:
        return {"rdp": np.zeros(len(ORDERS))}

    def run(self, ctx: RoundContext) -> None:
        assert ctx.clients is not None
        q = len(ctx.clients) / max(1, ctx.dataset.num_clients)
        rdp = ctx.state.get("rdp", np.zeros(len(ORDERS))) + rdp_sampled_gaussian(q, self.noise_multiplier)
        ctx.state["rdp"] = rdp  # a new array: the previous round's state stays intact until the round commits
        ctx.metrics["epsilon"] = epsilon_from_rdp(rdp, self.delta)
        ctx.metrics["dp_delta"] = self.delta
