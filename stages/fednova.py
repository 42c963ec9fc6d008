"""FedNova's normalised averaging (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency
Problem in Heterogeneous Federated Optimization", NeurIPS 2020, Sec. 4, plain local SGD).

A client that does ``tau_i`` local SGD steps from ``x`` to ``y_i`` has the cumulative step
``y_i - x = -lr sum_k g_i(k)``; its gradient weights are ``a_i = [1, ..., 1]``, so ``||a_i||_1 = tau_i``
and the normalised update is ``d_i = (y_i - x) / tau_i``. The server steps
``x <- x + lr_g tau_eff sum_i p_i d_i`` with ``tau_eff = sum_i p_i tau_i`` and ``p_i = n_i / n``.

On the round's graph (no reducer of the plain ``update``)::

    ... >> st.LocalTrain(...) >> st.FedNovaNormalize()
        >> {"normalized_update": st.Aggregate(st.WeightedMean()), "tau": st.Aggregate(st.WeightedMean())}
        >> st.FedNovaStep()

:class:`FedNovaNormalize` (client stage) reads LocalTrain's ``update`` and the ``steps`` it reports, and
writes ``normalized_update`` (``d_i``, carrying the training metrics) and ``tau`` (``[tau_i]``), both
weighted by the client's samples; :class:`FedNovaStep` (server stage) reads the two aggregates. With equal
``tau_i`` the step is FedAvg's: ``tau * mean(delta_i / tau) = mean(delta_i)``.

Example:
    >>> from flgraph import stages as st
    >>> sorted(st.FedNovaNormalize().writes()), sorted(st.FedNovaNormalize().drops())
    (['normalized_update', 'tau'], ['update'])
    >>> sorted(st.FedNovaStep().reads())
    ['aggregate:normalized_update', 'aggregate:tau']
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from flgraph.context import ClientWork, RoundContext, Update
from flgraph.errors import ClientError, ConfigError
from flgraph.graph import ClientStage, ServerStage
from flgraph.params import Params

__all__ = ["FedNovaNormalize", "FedNovaStep"]


class FedNovaNormalize(ClientStage):
    """Turn the client's update ``y_i - x`` into FedNova's ``d_i = (y_i - x) / tau_i`` and ``tau_i``.

    ``tau_i`` is the ``steps`` metric of the update (the local SGD steps LocalTrain did). It assumes plain
    SGD steps (no momentum, no proximal term: those change ``a_i``; :func:`flgraph.recipes.fednova`
    refuses them). Place it right after LocalTrain.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"update"})
    provides: ClassVar[frozenset[str]] = frozenset({"normalized_update", "tau"})

    def drops(self) -> frozenset[str]:
        return frozenset({"update"})

    def run(self, work: ClientWork) -> None:
        u = work.update
        if u is None or u.delta is None:
            raise ClientError("FedNovaNormalize found no plain update to normalise", client=work.client,
                              stage="FedNovaNormalize", round=work.round,
                              fix="put it right after LocalTrain (before any Compress)")
        if "steps" not in u.metrics:
            raise ClientError("the update reports no 'steps' metric, so its local steps tau_i are unknown",
                              client=work.client, stage="FedNovaNormalize", round=work.round,
                              fix="use LocalTrain's built-in loop, or return {'loss': ..., 'steps': ...} "
                                  "from train_fn")
        tau = float(u.metrics["steps"])
        delta = u.delta
        if tau > 0:  # no step: a zero delta, which the engine drops as too slow for the deadline
            np.divide(delta, np.asarray(tau, delta.dtype), out=delta)  # the update is ours: normalise in place
        work.update = None
        work.outputs["normalized_update"] = Update(u.client, u.num_samples, u.base_round, delta, u.metrics)
        work.outputs["tau"] = Update(u.client, u.num_samples, u.base_round, np.array([tau], delta.dtype))


class FedNovaStep(ServerStage):
    """``x <- x + server_lr * tau_eff * mean_p(d_i)``, from the aggregates of ``normalized_update`` and ``tau``.

    Put it after the fan-out that reduces both with ``st.Aggregate(st.WeightedMean())`` (``p_i = n_i / n``).
    Records ``tau_eff`` and ``update_norm`` (the norm of the model's step divided by ``server_lr``).
    """

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ConfigError(f"FedNovaStep(server_lr={server_lr}): must be > 0", fix="the paper's is 1")
        self.server_lr = server_lr

    def reads(self) -> frozenset[str]:
        return frozenset({"aggregate:normalized_update", "aggregate:tau"})

    def run(self, ctx: RoundContext) -> None:
        d, t = ctx.aggregates.get("normalized_update"), ctx.aggregates.get("tau")
        if d is None or t is None:  # every client failed or was dropped: the model stays
            return
        flat = ctx.params.flat
        tau_eff = float(np.asarray(t[0]).reshape(-1)[0])
        step = (np.asarray(d[0], flat.dtype) * np.asarray(self.server_lr * tau_eff, flat.dtype)).astype(
            flat.dtype, copy=False)
        ctx.params = Params(ctx.params.spec, flat + step)
        ctx.metrics["tau_eff"] = tau_eff
        ctx.metrics["update_norm"] = float(np.linalg.norm(step)) / self.server_lr
