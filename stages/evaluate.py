"""Evaluate: loss and accuracy of the global model on a central held-out set (server stage).

Runs every ``every`` rounds and at the last round of each ``fit``; uses the dataset's ``test`` split
unless ``data=(x, y)`` is given. Reports ``accuracy`` and ``test_loss``.

Example:
    >>> from flgraph import stages as st
    >>> st.Evaluate(every=5).due(10, last=False), st.Evaluate(every=5).due(11, last=False)
    (True, False)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flgraph.context import RoundContext
from flgraph.errors import ConfigError
from flgraph.graph import ServerStage
from flgraph.models.adapter import ModelAdapter

__all__ = ["Evaluate"]


class Evaluate(ServerStage):
    """Evaluate the global params centrally every ``every`` rounds (and at the end of a fit)."""

    def __init__(self, every: int = 1, *, data: tuple[np.ndarray, np.ndarray] | None = None,
                 batch_size: int = 1024, device: str = "cpu") -> None:
        if every < 1:
            raise ConfigError(f"Evaluate(every={every}): must be >= 1")
        self.every = every
        self.batch_size = batch_size
        self.device = device
        self._data = data

    def due(self, round: int, last: bool) -> bool:
        """Whether round ``round`` is evaluated."""
        return last or round % self.every == 0

    def _test_set(self, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        if self._data is not None:
            return self._data
        test = getattr(dataset, "test", None)
        if test is None:
            raise ConfigError("Evaluate has no held-out data: the dataset has no test split",
                              fix="give the dataset a test set, or pass Evaluate(data=(x, y))")
        return test.x, test.y

    def prepare(self, dataset: Any, model_source: Any) -> None:
        self._test_set(dataset)

    @torch.no_grad()
    def run(self, ctx: RoundContext) -> None:
        if not self.due(ctx.round, ctx.last_round):
            return
        x, y = self._test_set(ctx.dataset)
        adapter: ModelAdapter = ctx.model_source
        bm = adapter.bound(self.device)
        bm.load(ctx.params.flat)
        bm.module.eval()
        loss_sum, correct = 0.0, 0
        for i in range(0, len(y), self.batch_size):
            xb = torch.as_tensor(x[i : i + self.batch_size], device=self.device)
            yb = torch.as_tensor(y[i : i + self.batch_size], device=self.device)
            out = bm.module(xb)
            loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
        ctx.metrics["accuracy"] = correct / max(len(y), 1)
        ctx.metrics["test_loss"] = loss_sum / max(len(y), 1)
