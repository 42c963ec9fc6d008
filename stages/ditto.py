"""Ditto's personal models (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, Algorithm 1), a client stage placed after LocalTrain.

Each client k keeps a personal model ``v_k`` in per-client state (on disk, O(clients x model), never in the
driver). When k is selected in round t, after LocalTrain has produced its FedAvg update from ``w^t``,
:class:`DittoPersonal` takes ``epochs`` passes of mini-batch SGD on the client's training part::

    v_k <- v_k - lr (grad F_k(v_k) + lam (v_k - w^t))        w^t: the broadcast global model

and keeps the new ``v_k``; it does not touch the ``update``. ``v_k`` starts at ``w^t`` the first time k is
selected (a client that joins late starts from the current global model, not from a stale ``w^0``).
With ``evaluate=True`` it then scores ``v_k`` on the client's held-out part (:mod:`flgraph.stages.split`;
give LocalTrain the same ``holdout``) and writes the per-client value ``evaluation`` (metrics
``ditto_loss``, ``ditto_accuracy``, weighted by held-out samples) for ``Aggregate(MetricsMean())``.

Example:
    >>> from flgraph import stages as st
    >>> d = st.DittoPersonal(lam=0.1, lr=0.05, epochs=2)
    >>> sorted(d.reads()), sorted(d.writes()), sorted(st.DittoPersonal(holdout=0, evaluate=False).writes())
    (['model'], ['evaluation'], [])
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from flgraph.context import ClientWork, Update
from flgraph.errors import ClientError, ConfigError
from flgraph.graph import ClientStage
from flgraph.params import ParamSpec
from flgraph.rng import stream, torch_seed
from flgraph.store.client_state import ClientStateTable, _key

from .evaluate_clients import _score
from .split import check_fraction, heldout

__all__ = ["DittoPersonal", "personal_models"]

FIELD = "personal"


class DittoPersonal(ClientStage):
    """Update the client's personal model ``v_k`` towards its own data, held near ``w^t`` by ``lam``.

    ``lam`` is Ditto's lambda (0 trains ``v_k`` locally only); ``lr``, ``epochs`` (or ``steps``: that many
    mini-batches, epochs repeating) and ``batch_size`` set the personal solver's ``s`` SGD steps. Batch
    order: the stream ``(tag, round, client)``, epoch ``e`` its ``e``-th permutation.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"model"})

    def __init__(self, lam: float = 0.1, *, lr: float = 0.05, epochs: int = 1, steps: int | None = None,
                 batch_size: int = 32, holdout: float = 0.2, evaluate: bool = True,
                 eval_batch_size: int = 256) -> None:
        if not (lam >= 0 and math.isfinite(lam)):
            raise ConfigError(f"DittoPersonal(lam={lam}): lambda must be finite and >= 0",
                              fix="the paper tunes lam in {0.05, 0.1, 0.2, 0.5, 1, 2}; lam=0 is local training")
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"DittoPersonal(lr={lr}): the personal step size must be finite and > 0")
        if steps is None and epochs < 1:
            raise ConfigError(f"DittoPersonal(epochs={epochs}): take at least one pass, or give steps=")
        if steps is not None and steps < 1:
            raise ConfigError(f"DittoPersonal(steps={steps}): must be >= 1")
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"DittoPersonal(batch_size={batch_size}, eval_batch_size={eval_batch_size}): "
                              "must be >= 1")
        check_fraction("DittoPersonal", holdout)
        if evaluate and holdout == 0:
            raise ConfigError("DittoPersonal(evaluate=True, holdout=0) would score v_k on its training data",
                              fix="hold out a fraction (holdout=0.2, and LocalTrain(holdout=0.2)), or evaluate=False")
        self.lam = float(lam)
        self.lr = float(lr)
        self.epochs = epochs
        self.steps = steps
        self.batch_size = batch_size
        self.holdout = holdout
        self.evaluate = evaluate
        self.eval_batch_size = eval_batch_size

    def writes(self) -> frozenset[str]:
        return frozenset({"evaluation"}) if self.evaluate else frozenset()

    def client_fields(self, spec: ParamSpec) -> dict[str, tuple[str, int]]:
        return {FIELD: (spec.carrier, spec.size)}

    def run(self, work: ClientWork) -> None:
        w = work.global_params.flat
        saved = work.load_state(FIELD)
        bm = work.model_source.bound("cpu")
        bm.load(w if saved is None else np.asarray(saved, w.dtype))
        model = bm.module
        ho = heldout(work.seed, work.client, len(work.data.y), self.holdout)
        x, y = torch.as_tensor(work.data.x[~ho]), torch.as_tensor(work.data.y[~ho])
        if len(y) == 0:
            raise ClientError("the client has no training samples for its personal model", client=work.client,
                              stage="DittoPersonal", round=work.round,
                              fix="remove empty clients, or pass on_client_error='drop' to Run")
        spec = work.global_params.spec
        named = list(model.named_parameters())
        anchors = [torch.from_numpy(w[spec.entry(n).offset : spec.entry(n).offset + p.numel()]).view(p.shape)
                   for n, p in named]
        rng = stream(work.seed, work.tag, work.round, work.client)
        torch.default_generator.manual_seed(torch_seed(work.seed, work.tag, work.round, work.client))
        model.train()
        limit = self.steps if self.steps is not None else math.inf
        done, total, epoch = 0, 0.0, 0
        while done < limit and (self.steps is not None or epoch < self.epochs):
            perm = torch.from_numpy(rng.permutation(len(y)))
            for i in range(0, len(y), self.batch_size):
                if done >= limit:
                    break
                idx = perm[i : i + self.batch_size]
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                with torch.no_grad():  # v <- v - lr (grad F_k(v) + lam (v - w^t))
                    for (_, p), a in zip(named, anchors):
                        g = p.grad if p.grad is not None else torch.zeros_like(p)
                        p.sub_(g + self.lam * (p - a), alpha=self.lr)
                total += float(loss.detach())
                done += 1
            epoch += 1
        if not math.isfinite(total):
            raise ClientError("the personal model's loss is not finite", client=work.client, stage="DittoPersonal",
                              round=work.round, fix="lower DittoPersonal's lr")
        v = np.array(bm.read(), copy=True)
        work.save_state(FIELD, v)
        if self.evaluate:
            n = int(ho.sum())
            if n == 0:
                raise ClientError("the client holds no held-out sample to score its personal model on",
                                  client=work.client, stage="DittoPersonal", round=work.round,
                                  fix="raise holdout=, or leave out clients with fewer than two samples")
            sl, correct = _score(model, work.data.x[ho], work.data.y[ho], self.eval_batch_size)
            work.outputs["evaluation"] = Update(work.client, n, work.round - 1, None,
                                                {"ditto_loss": sl / n, "ditto_accuracy": correct / n})


def personal_models(run: Any) -> dict[int, np.ndarray]:
    """The personal models ``v_k`` a run keeps now (client id -> flat params), read from its client-state
    store; clients never selected have none. For tests and final evaluations: it reads every client.

    Example::

        with fg.Run(recipes.ditto(clients=5), model=..., data=...) as run:
            run.fit(10)
            v = personal_models(run)      # {client: flat array}
    """
    stage = next((s for s in run.segments.clients if isinstance(s, DittoPersonal)), None)
    if stage is None or run.engine.client_state is None:
        raise ConfigError("personal_models(run): the run's pipeline has no DittoPersonal stage",
                          fix="run a Ditto pipeline, e.g. fg.recipes.ditto(...)")
    table, key = run.engine.client_state
    slots = run.state.stage_states[key]
    have = ClientStateTable.entries(slots)
    out = {}
    for row, slot, rnd in zip(have["state_rows"].tolist(), have["state_slot"].tolist(), have["state_round"].tolist()):
        out[int(table.client_ids[row])] = table.store.read(_key(stage.tag), FIELD, row=row, slot=slot, rnd=rnd)
    return out
