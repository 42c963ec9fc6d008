"""q-FFL's client and server steps (Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated
Learning", ICLR 2020, Algorithm 2 q-FedAvg).

Client side (:class:`QFFLUpdate`, after ``LocalTrain``, which ran local SGD from ``w`` to ``wbar_k``), with
``L = 1/lr`` (the paper's estimate of the local Lipschitz constant from the client step size) and ``F_k``
the loss of the global model ``w`` on the client's training data::

    Delta w_k = L (w - wbar_k)
    Delta_k   = F_k^q Delta w_k                                  writes "qffl_delta" (model-sized)
    h_k       = q F_k^(q-1) ||Delta w_k||^2 + L F_k^q            writes "qffl_h" (one value)

``F_k`` needs no stage before ``LocalTrain``: the global model ``w`` is still the round's broadcast
params after training, so this stage scores them on the same samples ``LocalTrain`` trained on (full
batch, cross-entropy). The model delta ``update`` is consumed here (the server step replaces it).

Server side (:class:`QFedAvgStep`, after ``{"qffl_delta": Aggregate(Mean()), "qffl_h": Aggregate(Mean())}``)::

    w <- w - (sum_k Delta_k) / (sum_k h_k)

Both values are reduced by the plain mean over the same clients, so the ratio of the means is the ratio of
the sums; a mean keeps the float32 accumulators at the scale of one client's value however many clients
a round has.

Example:
    >>> from flgraph import stages as st
    >>> u = st.QFFLUpdate(q=1.0, lr=0.1)
    >>> sorted(u.writes()), sorted(u.drops()), sorted(st.QFedAvgStep().reads())
    (['qffl_delta', 'qffl_h'], ['update'], ['aggregate:qffl_delta', 'aggregate:qffl_h'])
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from flgraph.context import ClientWork, RoundContext, Update
from flgraph.errors import ClientError, ConfigError, PipelineError
from flgraph.graph import ClientStage, ServerStage
from flgraph.params import Params

from .evaluate_clients import _score
from .split import check_fraction, heldout

__all__ = ["QFFLUpdate", "QFedAvgStep", "qffl_values"]


def qffl_values(delta: np.ndarray, loss: float, q: float, lr: float) -> tuple[np.ndarray, float]:
    """``(Delta_k, h_k)`` in float64 from the client's model delta ``wbar_k - w`` and its loss ``F_k`` at ``w``.

    Example:
        >>> import numpy as np
        >>> d, h = qffl_values(np.array([-0.1, 0.2]), loss=2.0, q=1.0, lr=0.1)
        >>> d.round(6).tolist(), round(h, 6)
        ([2.0, -4.0], 25.0)
    """
    lip = 1.0 / lr
    dw = np.asarray(delta, np.float64) * -lip
    fq = loss**q
    # q = 0 is FedAvg: the gradient-norm term vanishes whatever F_k is (0 * F^-1 would be NaN at F = 0)
    h = (q * loss ** (q - 1) * float(np.dot(dw, dw)) if q != 0 else 0.0) + lip * fq
    return fq * dw, h


class QFFLUpdate(ClientStage):
    """From the client's model delta and the global model's loss on its data: ``qffl_delta`` and ``qffl_h``.

    ``lr`` must be the client SGD step size (``L = 1/lr``); ``holdout`` the fraction ``LocalTrain`` held
    out, so that ``F_k`` is scored on the samples the client trained on.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"model", "update"})
    provides: ClassVar[frozenset[str]] = frozenset({"qffl_delta", "qffl_h"})

    def __init__(self, q: float = 1.0, *, lr: float = 0.05, holdout: float = 0.0, batch_size: int = 1024) -> None:
        if not (math.isfinite(q) and q >= 0):
            raise ConfigError(f"QFFLUpdate(q={q}): the fairness exponent must be finite and >= 0",
                              fix="q=0 is FedAvg with uniform client weights; the paper uses e.g. q=1")
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"QFFLUpdate(lr={lr}): L = 1/lr needs the clients' step size > 0",
                              fix="give the lr that LocalTrain uses")
        if batch_size < 1:
            raise ConfigError(f"QFFLUpdate(batch_size={batch_size}): must be >= 1")
        check_fraction("QFFLUpdate", holdout)
        self.q = float(q)
        self.lr = float(lr)
        self.holdout = holdout
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return "qffl-update"  # the default kebab case would split the acronym letter by letter

    def drops(self) -> frozenset[str]:
        return frozenset({"update"})

    def run(self, work: ClientWork) -> None:
        upd = work.update
        if upd is None:
            raise ClientError("no model update to turn into q-FFL's values", client=work.client,
                              stage="QFFLUpdate", round=work.round, fix="put QFFLUpdate right after LocalTrain")
        x, y = work.data.x, work.data.y
        if self.holdout > 0:
            keep = ~heldout(work.seed, work.client, len(y), self.holdout)
            x, y = x[keep], y[keep]
        bm = work.model_source.bound("cpu")
        bm.load(work.global_params.flat)
        total, _ = _score(bm.module, x, y, self.batch_size)
        loss = total / max(len(y), 1)
        spec = work.global_params.spec
        delta, h = qffl_values(upd.decoded(spec), loss, self.q, self.lr)
        if not (math.isfinite(loss) and math.isfinite(h) and h > 0):
            raise ClientError(f"q-FFL's h_k is {h} (loss F_k = {loss})", client=work.client, stage="QFFLUpdate",
                              round=work.round, fix="a zero loss with 0 < q < 1 has no finite h_k: use q = 0 "
                                                    "or q >= 1, or lower the learning rate")
        metrics = dict(upd.metrics, loss_before=loss)
        work.outputs["qffl_delta"] = Update(work.client, upd.num_samples, upd.base_round,
                                            delta.astype(spec.carrier), metrics)
        work.outputs["qffl_h"] = Update(work.client, upd.num_samples, upd.base_round,
                                        np.array([h], spec.carrier))
        work.update = None


class QFedAvgStep(ServerStage):
    """The server step ``w <- w - mean(Delta_k) / mean(h_k)`` (= the sums' ratio over the same clients)."""

    requires: ClassVar[frozenset[str]] = frozenset({"aggregate:qffl_delta", "aggregate:qffl_h"})

    def run(self, ctx: RoundContext) -> None:
        got, hs = ctx.aggregates.get("qffl_delta"), ctx.aggregates.get("qffl_h")
        if got is None or hs is None:  # no client's values were counted this round: w stays
            return
        (delta, n_delta), (h, n_h) = got, hs
        if n_delta != n_h:
            raise PipelineError(f"QFedAvgStep: 'qffl_delta' and 'qffl_h' were reduced over different weights "
                                f"({n_delta} and {n_h})",
                                fix="reduce both with st.Aggregate(st.Mean()): the step is the ratio of their sums")
        denom = float(np.asarray(h, np.float64)[0])
        flat = ctx.params.flat.astype(np.float64) - np.asarray(delta, np.float64) / denom
        ctx.params = Params(ctx.params.spec, flat.astype(ctx.params.spec.carrier))
        ctx.metrics["update_norm"] = float(np.linalg.norm(delta)) / denom
        ctx.metrics["qffl_h"] = denom

    @property
    def name(self) -> str:
        return "qfedavg-step"

    def settings(self) -> dict[str, Any]:
        return {}
