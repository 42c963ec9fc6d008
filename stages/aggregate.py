"""Aggregate: combine the client updates into new global params (reduce stage).

``Aggregate(reducer, server_lr)`` applies ``global += server_lr * aggregated_delta``. :class:`WeightedMean`
is FedAvg's sample-weighted mean of the deltas, accumulated (in the params' dtype unless ``dtype=`` says
otherwise) along the engine's fixed reduction tree: pairwise summation, and a result that is bit-identical
for any chunking and worker count.

Example:
    >>> import numpy as np
    >>> from flgraph.context import Update
    >>> from flgraph.params import ParamSpec
    >>> from flgraph.stages.aggregate import WeightedMean
    >>> spec = ParamSpec.from_arrays({"w": np.zeros(2, np.float32)})
    >>> wm = WeightedMean()
    >>> a = wm.leaf(Update(0, 1, 0, np.array([1.0, 0.0], np.float32)), spec)
    >>> b = wm.leaf(Update(1, 3, 0, np.array([5.0, 4.0], np.float32)), spec)
    >>> delta, weight = wm.finalize(wm.combine(a, b), spec)
    >>> delta.tolist(), weight
    ([4.0, 3.0], 4.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flgraph.context import RoundContext, Update
from flgraph.errors import ConfigError
from flgraph.graph import Reducer, ReduceStage
from flgraph.local.buffers import POOL
from flgraph.params import Params, ParamSpec

__all__ = ["Aggregate", "Mean", "MetricsMean", "WeightedMean"]


class WeightedMean(Reducer):
    """Sample-weighted mean of the client deltas (``weight="samples"``) or the plain mean (``"uniform"``).

    A partial sum is ``(acc, weight, scale)``: the weighted sum of its deltas is ``scale * acc`` and
    ``weight`` their total weight. A leaf is the delta itself with ``scale`` its weight, so no client's
    delta is multiplied by its weight; two parts with the same scale (equal weights: every client the same
    size, or ``"uniform"``) add in one pass, others in two (the right part rescaled to the left's).
    ``finalize`` multiplies by ``scale / weight`` once.
    """

    def __init__(self, weight: str = "samples", *, dtype: str | None = None) -> None:
        if weight not in ("samples", "uniform"):
            raise ConfigError(f"WeightedMean(weight={weight!r})", fix="use 'samples' or 'uniform'")
        if dtype is not None and np.dtype(dtype).kind != "f":
            raise ConfigError(f"WeightedMean(dtype={dtype!r}): accumulate in a float dtype, e.g. 'float64'")
        self.weight = weight
        self.dtype = dtype

    def leaf(self, update: Update, spec: ParamSpec) -> tuple[np.ndarray, float, float]:
        """``(acc, weight, scale)``: the weighted sum of the deltas is ``scale * acc`` (see the class docstring)."""
        w = float(update.num_samples) if self.weight == "samples" else 1.0
        delta = update.decoded(spec)
        if self.dtype is not None and delta.dtype != np.dtype(self.dtype):
            acc = delta.astype(self.dtype)
        elif update.delta is delta:
            acc = delta  # the update is consumed here: accumulate in place, no copy
            update.delta = None
        else:
            acc = np.array(delta, copy=True)
        return acc, w, w

    def combine(self, left: Any, right: Any) -> tuple[np.ndarray, float, float]:
        acc, w, s = left
        racc, rw, rs = right
        if s == 0.0 and rs != 0.0:  # the left part carries no weight: the sum is the right part's
            POOL.give(acc)
            return (racc if racc.flags.writeable else racc.copy()), w + rw, rs
        if rs == s:
            acc += racc
        elif rs != 0.0:
            # two passes, the same wherever this node is combined (worker or driver), so the same bits
            acc += np.multiply(racc, rs / s, out=racc if racc.flags.writeable else None)
        POOL.give(racc)  # the right operand is consumed: its buffer serves the next client's delta
        return acc, w + rw, s

    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[np.ndarray, float]:
        total, w, s = acc
        if w <= 0:
            raise ConfigError("the updates of this round carry no weight (every client had 0 samples)")
        return (total * (s / w)).astype(spec.carrier, copy=False), w  # a new array: no second copy

    def merges(self, inner: Reducer) -> bool:
        """A sample-weighted mean of weighted means, each weighted by its group's total weight, is the
        weighted mean of all their clients: the groups' partial sums are combined as they are."""
        return self.weight == "samples" and isinstance(inner, WeightedMean) and inner.dtype == self.dtype

    def __repr__(self) -> str:
        return f"WeightedMean(weight={self.weight!r}, dtype={self.dtype!r})"


class Mean(WeightedMean):
    """The plain mean of the values, every client counting once (SCAFFOLD's averages).

    Example:
        >>> Mean()
        Mean(dtype=None)
    """

    def __init__(self, *, dtype: str | None = None) -> None:
        super().__init__("uniform", dtype=dtype)

    def settings(self) -> dict[str, Any]:
        return {"dtype": self.dtype}

    def __repr__(self) -> str:
        return f"Mean(dtype={self.dtype!r})"


class MetricsMean(Reducer):
    """The sample-weighted mean of each metric the clients report (``update.metrics``), for evaluation
    branches: its result is a dict of figures that the round's row records.

    Example:
        >>> import numpy as np
        >>> from flgraph.context import Update
        >>> mm = MetricsMean()
        >>> a = mm.leaf(Update(0, 1, 0, None, {"accuracy": 1.0}), None)
        >>> b = mm.leaf(Update(1, 3, 0, None, {"accuracy": 0.5}), None)
        >>> mm.finalize(mm.combine(a, b), None)
        ({'accuracy': 0.625}, 4.0)
    """

    yields_metrics = True

    def leaf(self, update: Update, spec: ParamSpec | None) -> tuple[dict[str, float], float]:
        w = float(update.num_samples)
        return {k: float(v) * w for k, v in sorted(update.metrics.items())}, w

    def combine(self, left: Any, right: Any) -> tuple[dict[str, float], float]:
        sums, w = left
        for k, v in right[0].items():
            sums[k] = sums.get(k, 0.0) + v
        return sums, w + right[1]

    def finalize(self, acc: Any, spec: ParamSpec | None) -> tuple[dict[str, float], float]:
        sums, w = acc
        if w <= 0:
            raise ConfigError("the evaluated clients hold no samples")
        return {k: v / w for k, v in sorted(sums.items())}, w

    def __repr__(self) -> str:
        return "MetricsMean()"


class Aggregate(ReduceStage):
    """Reduce a per-client value with ``reducer``. Over the model update it steps the global params by
    ``server_lr`` times the result; over another value (in a fan-out) it writes that value's aggregate.

    ``by="site"`` reduces each group of clients sharing the attribute ``site`` (a per-client setting of the
    round, or the dataset's :meth:`~flgraph.data.FederatedDataset.attribute`); the reduce stage after it
    combines the groups: ``Aggregate(WeightedMean(), by="site") >> Aggregate(Median())``.

    Example:
        >>> from flgraph import stages as st
        >>> st.Aggregate(st.WeightedMean(), by="site")
        Aggregate(reducer=WeightedMean(weight='samples', dtype=..., server_lr=1.0, by='site')
    """

    any_value = True

    def __init__(self, reducer: Reducer | None = None, *, server_lr: float = 1.0, by: str | None = None) -> None:
        if server_lr <= 0:
            raise ConfigError(f"Aggregate(server_lr={server_lr}): must be > 0")
        if by is not None and (not isinstance(by, str) or not by):
            raise ConfigError(f"Aggregate(by={by!r}): name a client attribute", fix="e.g. by='site'")
        self.reducer = reducer if reducer is not None else WeightedMean()
        self.server_lr = server_lr
        if by is not None:
            self.by = by

    def apply(self, ctx: RoundContext, delta: Any, weight: float) -> None:
        step = delta if self.server_lr == 1.0 else (delta * self.server_lr).astype(delta.dtype)
        ctx.params = Params(ctx.params.spec, ctx.params.flat + step)
        ctx.metrics["update_norm"] = float(np.linalg.norm(delta))
