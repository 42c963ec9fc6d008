"""BufferedAggregate: FedBuff's server (Nguyen et al., AISTATS 2022) for asynchronous runs (reduce stage).

Updates arrive one by one (in virtual-clock order); each is weighted by a staleness function of
``s = current version - version the client started from`` and added to a buffer; every ``buffer``
updates the server steps: ``global += server_lr * sum(f(s_i) w_i delta_i) / sum(w_i)`` with
``w_i = 1`` (``weight="uniform"``, the paper's) or the sample count (``"samples"``). Updates staler than
``max_staleness`` are dropped and counted. A pipeline whose reduce stage is a BufferedAggregate runs on
the asynchronous engine; its ``Select(clients=C)`` is the number of clients kept in flight.
``clip_norm`` clips each update's norm first (:class:`~flgraph.stages.ClipNorm`); ``optimizer`` (a
:class:`~flgraph.stages.ServerOpt`, e.g. FedAdam's) takes the buffered mean as its pseudo-gradient, its
moments kept in this stage's state.

Example:
    >>> from flgraph import stages as st
    >>> st.Polynomial(0.5)(3), st.Constant()(7), st.Hinge(a=10, b=4)(2)
    (0.5, 1.0, 1.0)
    >>> agg = st.BufferedAggregate(buffer=10, staleness=st.Polynomial(0.5), max_staleness=20)
    >>> agg.asynchronous
    True
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from flgraph.context import RoundContext
from flgraph.errors import ConfigError
from flgraph.graph import Reducer, ReduceStage
from flgraph.params import Params

from .aggregate import WeightedMean
from .privacy import ClipNorm

__all__ = ["BufferedAggregate", "Constant", "Hinge", "Polynomial"]


class Constant:
    """``f(s) = 1``: staleness is ignored."""

    def __call__(self, s: int) -> float:
        return 1.0

    def settings(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return "Constant()"


class Polynomial:
    """``f(s) = (1 + s) ** -a`` (FedBuff's default with ``a = 0.5``)."""

    def __init__(self, a: float = 0.5) -> None:
        if a < 0:
            raise ConfigError(f"Polynomial(a={a}): must be >= 0")
        self.a = a

    def __call__(self, s: int) -> float:
        return float((1.0 + s) ** -self.a)

    def __repr__(self) -> str:
        return f"Polynomial(a={self.a})"


class Hinge:
    """``f(s) = 1`` if ``s <= b`` else ``1 / (a (s - b) + 1)`` (FedAsync's hinge, Xie et al. 2019)."""

    def __init__(self, a: float = 10.0, b: int = 4) -> None:
        if a < 0 or b < 0:
            raise ConfigError(f"Hinge(a={a}, b={b}): both must be >= 0")
        self.a = a
        self.b = b

    def __call__(self, s: int) -> float:
        return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)

    def __repr__(self) -> str:
        return f"Hinge(a={self.a}, b={self.b})"


class BufferedAggregate(ReduceStage):
    """Buffer ``buffer`` staleness-weighted updates, then step the global params (asynchronous engine)."""

    asynchronous: ClassVar[bool] = True

    def __init__(self, buffer: int = 10, *, staleness: Any = None, max_staleness: int | None = None,
                 server_lr: float = 1.0, weight: str = "uniform", clip_norm: float | None = None,
                 optimizer: Any = None) -> None:
        if buffer < 1:
            raise ConfigError(f"BufferedAggregate(buffer={buffer}): must be >= 1")
        if max_staleness is not None and max_staleness < 0:
            raise ConfigError(f"BufferedAggregate(max_staleness={max_staleness}): must be >= 0 or None")
        if server_lr <= 0:
            raise ConfigError(f"BufferedAggregate(server_lr={server_lr}): must be > 0")
        staleness = staleness if staleness is not None else Polynomial(0.5)
        if not callable(staleness):
            raise ConfigError(f"staleness={staleness!r} is not callable",
                              fix="use st.Constant(), st.Polynomial(a) or st.Hinge(a, b), or a function s -> weight")
        if optimizer is not None and not callable(getattr(optimizer, "step", None)):
            raise ConfigError(f"optimizer={optimizer!r} has no step(state, delta)",
                              fix="pass a server optimizer such as st.ServerOpt(method='adam', lr=0.01)")
        self.buffer = buffer
        self.staleness = staleness
        self.max_staleness = max_staleness
        self.server_lr = server_lr
        self.weight = weight
        self.clip_norm = clip_norm
        self.optimizer = optimizer
        inner = WeightedMean(weight)
        self.reducer: Reducer = ClipNorm(inner, max_norm=clip_norm) if clip_norm is not None else inner

    def settings(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "staleness": self.staleness, "max_staleness": self.max_staleness,
                "server_lr": self.server_lr, "weight": self.weight, "clip_norm": self.clip_norm,
                "optimizer": self.optimizer}

    def init_state(self, params: Params) -> dict[str, Any]:
        state: dict[str, Any] = {"count": 0, "weight": 0.0, "acc": np.zeros(params.spec.size, params.spec.carrier)}
        if self.optimizer is not None:  # the optimizer's moments, flat in this stage's state ("opt_m", ...)
            state.update({f"opt_{k}": v for k, v in self.optimizer.init_state(params).items()})
        return state

    def add(self, state: dict[str, Any], value: Any, staleness: int) -> bool:
        """Add one update's leaf value (:class:`WeightedMean`'s ``(acc, weight, scale)``: the weighted delta is
        ``scale * acc``); False if it is too stale (dropped)."""
        if self.max_staleness is not None and staleness > self.max_staleness:
            return False
        acc, w, scale = value
        f = float(self.staleness(staleness)) * scale
        state["acc"] += acc * acc.dtype.type(f) if f != 1.0 else acc
        state["weight"] = float(state["weight"]) + float(w)
        state["count"] = int(state["count"]) + 1
        return True

    def full(self, state: dict[str, Any]) -> bool:
        return int(state["count"]) >= self.buffer

    def apply(self, ctx: RoundContext, delta: Any, weight: float) -> None:
        step = delta if self.server_lr == 1.0 else (delta * self.server_lr).astype(delta.dtype)
        ctx.params = Params(ctx.params.spec, ctx.params.flat + step)
        ctx.metrics["update_norm"] = float(np.linalg.norm(delta))

    def step(self, ctx: RoundContext, state: dict[str, Any]) -> None:
        """Apply the buffered mean and empty the buffer."""
        w = float(state["weight"])
        if w <= 0:
            raise ConfigError("the buffer carries no weight (every update had 0 samples)")
        delta = (state["acc"] / w).astype(ctx.params.spec.carrier)
        if self.optimizer is None:
            self.apply(ctx, delta, w)
        else:
            moments = {k[4:]: v for k, v in state.items() if k.startswith("opt_")}
            inc, new = self.optimizer.step(moments, delta)
            state.update({f"opt_{k}": v for k, v in new.items()})
            step = self.server_lr * inc
            ctx.params = Params(ctx.params.spec, (ctx.params.flat.astype(np.float64) + step).astype(
                ctx.params.spec.carrier))
            ctx.metrics["update_norm"] = float(np.linalg.norm(delta))
        state["acc"] = np.zeros_like(state["acc"])
        state["weight"] = 0.0
        state["count"] = 0
