"""Train models that compute their own loss, as Hugging Face ``transformers`` models do.

A ``transformers`` model called with ``labels=`` returns an output whose ``.loss`` is the task's loss
(cross-entropy for ``BertForSequenceClassification``, shifted next-token loss for ``GPT2LMHeadModel``),
and its logits are not what ``LocalTrain``'s built-in loop expects. :class:`OwnLossTrain` is the
``train_fn`` for such models: ``st.LocalTrain(train_fn=OwnLossTrain(), lr=..., batch_size=...)``. It runs
LocalTrain's ``epochs`` (or ``steps``) of SGD (or the ``optimizer`` factory given) over batches in the
client's seeded order (``ctx.rng``), calling ``model(**{inputs: x_batch}, labels=y_batch)`` and stepping
on ``output.loss``; with ``pad_token_id`` it passes ``attention_mask = x != pad_token_id`` too. ``x`` holds
token ids (int64); ``y`` the labels (a class per sample, or token ids for a language model).

Example:
    >>> import numpy as np, torch
    >>> from types import SimpleNamespace
    >>> from flgraph.data import ClientData
    >>> from flgraph.models.own_loss import OwnLossTrain
    >>> class Scorer(torch.nn.Module):  # returns its own loss, like a transformers model
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.Embedding(5, 2)
    ...     def forward(self, input_ids, labels):
    ...         logits = self.emb(input_ids).mean(1)
    ...         return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels))
    >>> ctx = SimpleNamespace(epochs=1, steps=None, batch_size=2, lr=0.1, device=torch.device("cpu"),
    ...                       rng=np.random.default_rng(0))
    >>> data = ClientData(np.array([[1, 2], [3, 4], [0, 1]]), np.array([0, 1, 1]))
    >>> sorted(OwnLossTrain()(Scorer(), data, ctx))
    ['loss', 'samples_processed', 'steps']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["OwnLossTrain"]


class OwnLossTrain:
    """``train_fn`` for models that return ``output.loss`` when given ``labels=`` (see the module docstring).

    ``inputs`` names the keyword the token ids go to (``"input_ids"``); ``pad_token_id`` adds an
    attention mask; ``optimizer(params) -> torch.optim.Optimizer`` replaces plain SGD at LocalTrain's lr.
    """

    def __init__(self, inputs: str = "input_ids", *, pad_token_id: int | None = None,
                 optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None) -> None:
        self.inputs = inputs
        self.pad_token_id = pad_token_id
        self.optimizer = optimizer

    def __call__(self, model: torch.nn.Module, data: Any, ctx: Any) -> dict[str, float]:
        x = torch.as_tensor(np.asarray(data.x), device=ctx.device)
        y = torch.as_tensor(np.asarray(data.y), device=ctx.device)
        if x.dtype.is_floating_point:
            raise ConfigError(f"OwnLossTrain: x is {x.dtype}, expected token ids (integers)",
                              fix="store token ids as int64 in the dataset")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = self.optimizer(params) if self.optimizer is not None else torch.optim.SGD(params, lr=ctx.lr)
        n, total, seen, steps = len(y), 0.0, 0, 0
        for _ in range(ctx.epochs if ctx.steps is None else 2**31 - 1):
            order = torch.from_numpy(ctx.rng.permutation(n))
            for start in range(0, n, ctx.batch_size):
                batch = order[start:start + ctx.batch_size].to(ctx.device)
                xb = x[batch]
                kwargs: dict[str, Any] = {self.inputs: xb, "labels": y[batch]}
                if self.pad_token_id is not None:
                    kwargs["attention_mask"] = (xb != self.pad_token_id).long()
                out = model(**kwargs)
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise ConfigError(f"OwnLossTrain: {type(model).__name__} returned no .loss when given labels=",
                                      fix="use a model that computes its loss from labels (e.g. *ForSequence"
                                          "Classification), or LocalTrain(loss=...) for one that returns logits")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
                steps += 1
                if ctx.steps is not None and steps >= ctx.steps:
                    return {"loss": total / seen, "steps": float(steps), "samples_processed": float(seen)}
        return {"loss": total / seen, "steps": float(steps), "samples_processed": float(seen)}

    def __repr__(self) -> str:
        return f"OwnLossTrain(inputs={self.inputs!r}, pad_token_id={self.pad_token_id!r})"
