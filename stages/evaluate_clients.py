"""Evaluation on the clients' own held-out data: federated and personalized (server stages).

Both run client-side work through ``ctx.map_clients`` (where each client lives: a Dask worker, an edge
agent) on a seeded sample of ``clients`` clients (all of them by default), on the held-out part of each
client's data (:mod:`flgraph.stages.split`; give ``LocalTrain`` the same ``holdout=`` so it never trains on
it). Figures are weighted by the clients' held-out sample counts.

* :class:`FederatedEvaluate` — the global model as is: ``fed_accuracy``, ``fed_loss``.
* :class:`PersonalizedEvaluate` — each client first fine-tunes the global model on its own training part
  (``epochs`` of SGD; ``finetune=("head",)`` fine-tunes only those parameters), then evaluates:
  ``personal_accuracy``, ``personal_loss`` (and the figures before fine-tuning). FedBABU's evaluation.

Example:
    >>> from flgraph import stages as st
    >>> st.PersonalizedEvaluate(every=10, epochs=5, finetune=["head"])  # doctest: +NORMALIZE_WHITESPACE
    PersonalizedEvaluate(every=10, clients=None, holdout=0.2, batch_size=256, epochs=5, lr=0.01,
                         finetune_batch_size=10, finetune=('head',))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from flgraph.context import ClientWork, RoundContext
from flgraph.errors import ConfigError
from flgraph.graph import ServerStage
from flgraph.rng import stream, torch_seed

from .split import check_fraction, heldout
from .train import frozen_names

__all__ = ["FederatedEvaluate", "PersonalizedEvaluate"]


@torch.no_grad()
def _score(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, int]:
    """(summed cross-entropy, correct) of ``model`` on ``(x, y)``."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = torch.as_tensor(x[i : i + batch_size]), torch.as_tensor(y[i : i + batch_size])
        out = model(xb)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return loss, correct


class FederatedEvaluate(ServerStage):
    """Evaluate the global model on the held-out data of ``clients`` sampled clients (all if None)."""

    requires: ClassVar[frozenset[str]] = frozenset({"clients"})
    prefix: ClassVar[str] = "fed"

    def __init__(self, every: int = 1, *, clients: int | None = None, holdout: float = 0.2,
                 batch_size: int = 256) -> None:
        if every < 1:
            raise ConfigError(f"{type(self).__name__}(every={every}): must be >= 1")
        if clients is not None and clients < 1:
            raise ConfigError(f"{type(self).__name__}(clients={clients}): evaluate at least one client",
                              fix="clients=None evaluates every client")
        check_fraction(type(self).__name__, holdout)
        if holdout == 0:
            raise ConfigError(f"{type(self).__name__}(holdout=0) would evaluate on the training data",
                              fix="hold out a fraction, e.g. holdout=0.2, and give LocalTrain the same")
        self.every = every
        self.clients = clients
        self.holdout = holdout
        self.batch_size = batch_size

    def due(self, round: int, last: bool) -> bool:
        """Whether round ``round`` is evaluated (every ``every`` rounds and the last of a fit)."""
        return last or round % self.every == 0

    def sample(self, ctx: RoundContext) -> np.ndarray:
        """The clients evaluated this round (seeded by the stream ``(tag, round)``; sorted)."""
        ids = ctx.dataset.client_ids
        if self.clients is None or self.clients >= len(ids):
            return np.asarray(ids, np.int64)
        return np.sort(stream(ctx.seed, self.tag, ctx.round).choice(ids, size=self.clients, replace=False))

    def split(self, work: ClientWork) -> tuple[np.ndarray, np.ndarray]:
        """(training mask, held-out mask) of the client's samples."""
        ho = heldout(work.seed, work.client, len(work.data.y), self.holdout)
        return ~ho, ho

    def client(self, work: ClientWork) -> tuple[float, ...]:
        """Client-side work: (held-out samples, loss sum, correct) of the global model."""
        _, ho = self.split(work)
        bm = work.model_source.bound("cpu")
        bm.load(work.global_params.flat)
        loss, correct = _score(bm.module, work.data.x[ho], work.data.y[ho], self.batch_size)
        return float(ho.sum()), loss, float(correct)

    def run(self, ctx: RoundContext) -> None:
        if not self.due(ctx.round, ctx.last_round):
            return
        results = np.array(ctx.map_clients(self.client, self.sample(ctx)), np.float64)
        n = results[:, 0].sum()
        if n == 0:
            raise ConfigError(f"{type(self).__name__}: the evaluated clients hold no held-out samples",
                              fix="raise holdout= or evaluate clients with at least two samples")
        names = self.metric_names()
        for j, name in enumerate(names, start=1):
            ctx.metrics[name] = float(results[:, j].sum() / n)
        ctx.metrics[f"{self.prefix}_eval_clients"] = len(results)

    def metric_names(self) -> list[str]:
        return [f"{self.prefix}_loss", f"{self.prefix}_accuracy"]


class PersonalizedEvaluate(FederatedEvaluate):
    """Fine-tune the global model on each client's own training part, then evaluate on its held-out part.

    ``finetune`` names the parameters fine-tuned (module prefixes or wildcards, as LocalTrain's
    ``freeze``); None fine-tunes the whole model. Plain SGD, ``epochs`` passes in batches of
    ``finetune_batch_size``, batch order from the stream ``(tag, round, client)``.
    """

    prefix: ClassVar[str] = "personal"

    def __init__(self, every: int = 1, *, clients: int | None = None, holdout: float = 0.2,
                 batch_size: int = 256, epochs: int = 1, lr: float = 0.01, finetune_batch_size: int = 10,
                 finetune: Sequence[str] | None = None) -> None:
        super().__init__(every, clients=clients, holdout=holdout, batch_size=batch_size)
        if epochs < 0:
            raise ConfigError(f"PersonalizedEvaluate(epochs={epochs}): must be >= 0")
        if finetune_batch_size < 1:
            raise ConfigError(f"PersonalizedEvaluate(finetune_batch_size={finetune_batch_size}): must be >= 1")
        self.epochs = epochs
        self.lr = lr
        self.finetune_batch_size = finetune_batch_size
        self.finetune: tuple[str, ...] | None = (finetune,) if isinstance(finetune, str) else (
            tuple(finetune) if finetune else None)

    def prepare(self, dataset: Any, model_source: Any) -> None:
        if self.finetune and hasattr(model_source, "template"):
            names = [n for n, _ in model_source.template.named_parameters()]
            if not frozen_names(names, self.finetune):
                raise ConfigError(f"PersonalizedEvaluate(finetune={list(self.finetune)}) matches no parameter",
                                  fix=f"name parameters or modules of the model, e.g. one of {names[:8]}")

    def client(self, work: ClientWork) -> tuple[float, ...]:
        """Client-side work: held-out count, then (loss sum, correct) before and after fine-tuning."""
        tr, ho = self.split(work)
        x, y = work.data.x, work.data.y
        bm = work.model_source.bound("cpu")
        bm.load(work.global_params.flat)
        model = bm.module
        before = _score(model, x[ho], y[ho], self.batch_size)
        named = dict(model.named_parameters())
        chosen = set(frozen_names(list(named), self.finetune)) if self.finetune else set(named)
        params = [p for n, p in named.items() if n in chosen]
        opt = torch.optim.SGD(params, lr=self.lr)
        rng = stream(work.seed, self.tag, work.round, work.client)
        torch.default_generator.manual_seed(torch_seed(work.seed, self.tag, work.round, work.client))
        xt, yt = torch.as_tensor(x[tr]), torch.as_tensor(y[tr])
        model.train()
        for _ in range(self.epochs):
            perm = torch.from_numpy(rng.permutation(len(yt)))
            for i in range(0, len(yt), self.finetune_batch_size):
                idx = perm[i : i + self.finetune_batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
        after = _score(model, x[ho], y[ho], self.batch_size)
        return float(ho.sum()), after[0], float(after[1]), before[0], float(before[1])

    def metric_names(self) -> list[str]:
        return ["personal_loss", "personal_accuracy", "personal_loss_before", "personal_accuracy_before"]
