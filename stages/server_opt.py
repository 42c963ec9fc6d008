"""Server optimizers: FedAvgM and FedOpt (FedAdam, FedYogi, FedAdagrad) as a reduce stage.

The aggregated client delta ``d_t`` (any reducer: mean, median, clipped, noised) is the server's
pseudo-gradient, negated. :class:`ServerOpt` steps the global params with it:

* ``"sgd"`` with ``momentum=b`` — FedAvgM (Hsu et al. 2019): ``v = b v + d``, ``x += lr * v``
  (``momentum=0`` and ``lr=1`` is FedAvg);
* ``"adagrad"``, ``"adam"``, ``"yogi"`` — Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
  Algorithm 2: ``m = b1 m + (1 - b1) d`` and

  - Adagrad: ``v = v + d^2``
  - Adam:    ``v = b2 v + (1 - b2) d^2``
  - Yogi:    ``v = v - (1 - b2) d^2 sign(v - d^2)``

  then ``x += lr * m / (sqrt(v) + tau)``, with ``m`` starting at 0 and ``v`` at ``tau^2`` (no bias
  correction, as in the paper).

The moments are numpy arrays in the stage's explicit state (``ctx.state``), so they are checkpointed
and a resumed run continues exactly. Arithmetic is in float64, stored in the params' dtype.

Example:
    >>> from flgraph import stages as st
    >>> st.ServerOpt(st.WeightedMean(), "adam", lr=0.01)  # doctest: +ELLIPSIS
    ServerOpt(reducer=WeightedMean(..., method='adam', lr=0.01, momentum=0.0, beta1=0.9, beta2=0.99, tau=0.001)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flgraph.context import RoundContext
from flgraph.errors import ConfigError
from flgraph.graph import Reducer, ReduceStage
from flgraph.params import Params

from .aggregate import WeightedMean

__all__ = ["METHODS", "ServerOpt"]

METHODS = ("sgd", "adagrad", "adam", "yogi")


class ServerOpt(ReduceStage):
    """Aggregate with ``reducer``, then take a server optimizer step (``method``) on the aggregated delta."""

    def __init__(
        self,
        reducer: Reducer | None = None,
        method: str = "sgd",
        *,
        lr: float = 1.0,
        momentum: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"ServerOpt(method={method!r})", fix=f"use one of {list(METHODS)}")
        if not lr > 0:
            raise ConfigError(f"ServerOpt(lr={lr}): the server learning rate must be > 0")
        if not 0 <= momentum < 1:
            raise ConfigError(f"ServerOpt(momentum={momentum}): must be in [0, 1)", fix="e.g. momentum=0.9")
        if method != "sgd" and momentum:
            raise ConfigError(f"ServerOpt(method={method!r}, momentum={momentum}): momentum is for 'sgd' "
                              "(FedAvgM); adaptive methods use beta1", fix="drop momentum= or use method='sgd'")
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= b < 1:
                raise ConfigError(f"ServerOpt({name}={b}): must be in [0, 1)")
        if not tau > 0:
            raise ConfigError(f"ServerOpt(tau={tau}): the adaptivity tau must be > 0", fix="e.g. tau=1e-3")
        self.reducer = reducer if reducer is not None else WeightedMean()
        self.method = method
        self.lr = lr
        self.momentum = momentum
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def init_state(self, params: Params) -> dict[str, Any]:
        if self.method == "sgd":
            return {"momentum": np.zeros(params.spec.size, params.spec.carrier)} if self.momentum else {}
        return {"m": np.zeros(params.spec.size, params.spec.carrier),
                "v": np.full(params.spec.size, self.tau**2, params.spec.carrier)}

    def step(self, state: dict[str, Any], delta: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The params' increment for the aggregated ``delta`` and the new state (new arrays; ``state`` is
        not modified, so an interrupted round leaves the previous state intact)."""
        d = delta.astype(np.float64)
        if self.method == "sgd":
            if not self.momentum:
                return self.lr * d, {}
            v = self.momentum * state["momentum"].astype(np.float64) + d
            return self.lr * v, {"momentum": v.astype(delta.dtype)}
        m = self.beta1 * state["m"].astype(np.float64) + (1 - self.beta1) * d
        v = state["v"].astype(np.float64)
        d2 = d * d
        if self.method == "adagrad":
            v = v + d2
        elif self.method == "adam":
            v = self.beta2 * v + (1 - self.beta2) * d2
        else:  # yogi
            v = v - (1 - self.beta2) * d2 * np.sign(v - d2)
        return self.lr * m / (np.sqrt(v) + self.tau), {"m": m.astype(delta.dtype), "v": v.astype(delta.dtype)}

    def apply(self, ctx: RoundContext, delta: Any, weight: float) -> None:
        if not ctx.state:
            ctx.state.update(self.init_state(ctx.params))
        inc, new = self.step(ctx.state, delta)
        ctx.state.update(new)
        flat = (ctx.params.flat.astype(np.float64) + inc).astype(ctx.params.spec.carrier)
        ctx.params = Params(ctx.params.spec, flat)
        ctx.metrics["update_norm"] = float(np.linalg.norm(delta))
        ctx.metrics["server_step_norm"] = float(np.linalg.norm(inc))
