"""LocalTrain: train the global model on one client's own data (client stage).

Any torch module, loss function and optimizer factory; ``epochs`` or ``steps``; a seeded batch order
(stream ``(tag, round, client)``: epoch ``e`` uses that stream's ``e``-th permutation); ``device`` ``"auto"``
(the workers' GPUs when every worker has one, else the CPU: :mod:`flgraph.stages.placement`), ``"cpu"`` or
``"cuda"``. Bring your own training step with ``train_fn(model, data, ctx) -> loss`` (a float, or a dict of
metrics with a ``"loss"`` key).

Options: ``mu > 0`` adds FedProx's proximal term ``mu/2 ||w - w_global||^2`` to the local objective (its
gradient ``mu (w - w_global)`` is added to each step's gradient; the reported ``loss`` is the task loss);
``freeze=("head",)`` keeps parameters frozen by name or module prefix (``"head"`` matches ``head.weight``;
shell wildcards work too): they get no gradient and their delta is exactly zero; ``holdout=f`` trains on
the samples the evaluators do not hold out (:mod:`flgraph.stages.split`); ``correction="scaffold"``
corrects each step's gradient by SCAFFOLD's control variates and writes the client's ``control_delta``
next to its ``update`` (:mod:`flgraph.stages.scaffold`); ``clients_at_once=B`` trains blocks of up to ``B``
clients at once with ``torch.func`` (:mod:`flgraph.stages.vectorised`; one by one, with a warning saying why,
where the model or the options cannot be batched). Per-client ``epochs`` or
``steps`` come from the ClientSet's settings when present (stragglers, device profiles); the metrics
report the ``steps`` actually done.

The update is ``trained - global`` (a flat delta) with the client's sample count. A non-finite loss, a
non-finite update, an empty client, or a model whose output does not fit the labels stops the client
with a :class:`~flgraph.errors.ClientError` that names the client, the round and the stage.

Example:
    >>> from flgraph import stages as st
    >>> st.LocalTrain(epochs=2, batch_size=16, lr=0.1, mu=0.01, freeze=["head"])  # doctest: +NORMALIZE_WHITESPACE
    LocalTrain(epochs=2, steps=None, batch_size=16, lr=0.1, optimizer=None, loss=None, train_fn=None,
               device='auto', mu=0.01, freeze=('head',), holdout=0.0)
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from flgraph.context import ClientWork, Update
from flgraph.data import ClientData
from flgraph.errors import ClientError, ConfigError
from flgraph.graph import ClientStage
from flgraph.local.buffers import POOL
from flgraph.models.adapter import BoundModel, ModelAdapter
from flgraph.params import ParamSpec, all_finite
from flgraph.rng import client_torch_seed, stream

from . import scaffold, vectorised
from .local_step import PlainSGD, as_tensor, seed_torch
from .placement import check_device, local_device, settle
from .split import check_fraction, heldout

__all__ = ["SGD", "LocalTrain", "TrainContext", "frozen_names"]

log = logging.getLogger("flgraph")
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainContext:
    """What a custom ``train_fn`` gets besides the model and the data.

    ``rng`` is the client's seeded numpy Generator for this round (made on first use: a ``train_fn``
    that brings its own randomness does not pay for it).
    """

    round: int
    client: int
    epochs: int
    steps: int | None
    batch_size: int
    lr: float
    device: torch.device
    stream_key: tuple[int, ...]
    _rng: np.random.Generator | None = field(default=None, repr=False)

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = stream(*self.stream_key)
        return self._rng


class LocalTrain(ClientStage):
    """Train the broadcast global model on the client's data; produce an update."""

    requires: ClassVar[frozenset[str]] = frozenset({"model"})
    provides: ClassVar[frozenset[str]] = frozenset({"update"})

    def __init__(
        self,
        epochs: int = 1,
        *,
        steps: int | None = None,
        batch_size: int = 32,
        lr: float = 0.05,
        optimizer: OptimizerFactory | None = None,
        loss: LossFn | None = None,
        train_fn: Callable[[torch.nn.Module, Any, TrainContext], float | dict[str, float]] | None = None,
        device: str = "auto",
        mu: float = 0.0,
        freeze: Sequence[str] | None = None,
        holdout: float = 0.0,
        correction: str | None = None,
        clients_at_once: int = 1,
    ) -> None:
        if not (mu >= 0 and math.isfinite(mu)):
            raise ConfigError(f"LocalTrain(mu={mu}): the proximal weight must be finite and >= 0",
                              fix="mu=0 is FedAvg; the FedProx paper uses mu in {0.001, 0.01, 0.1, 1}")
        if mu > 0 and train_fn is not None:
            raise ConfigError("LocalTrain(mu=..., train_fn=...): the proximal term is added by the built-in "
                              "training loop, which a train_fn replaces",
                              fix="add mu/2 ||w - w_global||^2 in your train_fn, or drop train_fn")
        if isinstance(freeze, str):
            freeze = (freeze,)
        check_fraction("LocalTrain", holdout)
        if epochs < 1 and steps is None:
            raise ConfigError(f"LocalTrain(epochs={epochs}): train at least one epoch, or give steps=")
        if steps is not None and steps < 1:
            raise ConfigError(f"LocalTrain(steps={steps}): steps must be >= 1")
        if batch_size < 1:
            raise ConfigError(f"LocalTrain(batch_size={batch_size}): must be >= 1")
        check_device("LocalTrain", device)
        self.epochs = epochs
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.optimizer = optimizer
        self.loss = loss
        self.train_fn = train_fn
        self.device = device
        self.mu = float(mu)
        self.freeze: tuple[str, ...] | None = tuple(freeze) if freeze else None
        self.holdout = holdout
        if correction is not None:
            scaffold.check_options(correction, train_fn=train_fn, optimizer=optimizer, freeze=self.freeze)
            self.correction = correction
        if isinstance(clients_at_once, bool) or not isinstance(clients_at_once, int) or clients_at_once < 1:
            raise ConfigError(f"LocalTrain(clients_at_once={clients_at_once!r}): a whole number >= 1",
                              fix="1 trains clients one by one; e.g. 256 trains blocks of up to 256 clients at "
                                  "once (vectorised)")
        if clients_at_once > 1:  # only then a setting: the default's spec and repr stay as they were
            self.clients_at_once = clients_at_once
        self._sequential_because: str | None = None
        self._device: str | None = None  # device="auto" settled for the run (see place)

    def reads(self) -> frozenset[str]:
        return scaffold.client_reads(self.requires, getattr(self, "correction", None))

    def writes(self) -> frozenset[str]:
        return scaffold.client_writes(self.provides, getattr(self, "correction", None))

    def client_fields(self, spec: ParamSpec) -> dict[str, tuple[str, int]]:
        return scaffold.client_fields(spec) if getattr(self, "correction", None) else {}

    def place(self, cuda_by_worker: Mapping[str, int]) -> None:
        self._device = settle("LocalTrain", self.device, cuda_by_worker)

    def train_device(self) -> str:
        """The device this process trains on: the run's settled one, else ``device`` settled here alone."""
        return self._device or local_device(self.device)

    def prepare(self, dataset: Any, model_source: Any) -> None:
        template = getattr(model_source, "template", None)
        if getattr(self, "clients_at_once", 1) > 1 and template is not None:
            self._sequential_because = vectorised.why_not(self, template)
            if self._sequential_because is not None:  # once per run, in the driver
                warnings.warn(f"LocalTrain(clients_at_once={self.clients_at_once}) trains one client at a time "
                              f"(metric 'vectorised' = 0): {self._sequential_because}", UserWarning, stacklevel=2)
                log.warning("LocalTrain trains one client at a time: %s", self._sequential_because)
        spec = getattr(model_source, "spec", None)
        if self.freeze and spec is not None:
            names = [e.name for e in spec.entries]
            for pattern in self.freeze:
                if not frozen_names(names, (pattern,)):
                    modules = sorted({n.rsplit(".", 1)[0] for n in names if "." in n})
                    raise ConfigError(f"LocalTrain(freeze={list(self.freeze)}): {pattern!r} matches no parameter "
                                      "of the model", fix=f"name a module or parameter, one of {modules[:12]}")
            params = [n for n, _ in model_source.template.named_parameters()]
            if params and set(frozen_names(params, self.freeze)) == set(params):
                raise ConfigError(f"LocalTrain(freeze={list(self.freeze)}) freezes every parameter: nothing "
                                  "would train", fix="freeze a part of the model only, e.g. freeze=['head']")

    def run_block(self, works: Sequence[ClientWork]) -> list[BaseException | None]:
        """Train several clients: at once (:mod:`flgraph.stages.vectorised`) when ``clients_at_once > 1`` and
        the model and options allow it, else one by one. Returns each client's error, or None."""
        failed: Exception | None = None
        if getattr(self, "_sequential_because", None) is None:
            try:
                return vectorised.train_block(self, works)
            except Exception as e:  # batching failed: the clients are trained one by one below
                failed = e
        errors: list[BaseException | None] = []
        for work in works:
            try:
                self.run(work)
            except Exception as e:
                errors.append(e)
            else:
                errors.append(None)
        if failed is not None and any(e is None for e in errors):
            # one by one works where the block did not: an operation torch.func cannot batch. Say so once
            # (per worker process) and stop trying. (Where every client fails alone too, the data is at fault.)
            reason = f"torch.func could not batch the model: {type(failed).__name__}: {str(failed).splitlines()[0]}"
            self._sequential_because = reason
            warnings.warn(f"LocalTrain(clients_at_once={self.clients_at_once}) trains one client at a time "
                          f"(metric 'vectorised' = 0): {reason}", UserWarning, stacklevel=2)
            log.warning("LocalTrain trains one client at a time: %s", reason)
        return errors

    def run(self, work: ClientWork) -> None:
        adapter: ModelAdapter = work.model_source
        where = self.train_device()
        bm = adapter.bound(where)
        bm.load(work.global_params.flat, (work.round, id(work.global_params.flat)))  # kept on a GPU
        model = bm.module
        if not all(m.training for m in bm.modules):  # Module.train() walks and sets every submodule
            model.train()
        device = torch.device(where)
        epochs = int(work.setting("epochs", self.epochs))
        steps = work.setting("steps", self.steps)
        ctx = TrainContext(work.round, work.client, epochs, steps, self.batch_size, self.lr, device,
                           (work.seed, work.tag, work.round, work.client))
        seed_torch(device, client_torch_seed(work.seed, work.tag, work.round, work.clients.ids, work.position))
        data = work.data
        if self.holdout > 0:
            keep = ~heldout(work.seed, work.client, len(data.y), self.holdout)
            data = ClientData(data.x[keep], data.y[keep])
        n = len(data.y)
        if n == 0:
            raise ClientError("the client has no samples", client=work.client, stage="LocalTrain",
                              round=work.round, fix="remove empty clients from the dataset, or "
                              "pass on_client_error='drop' to Run to skip them")
        frozen = self._frozen_params(model)
        control = scaffold.ClientControl.start(work, model) if getattr(self, "correction", None) else None
        try:
            for p in frozen:
                p.requires_grad_(False)
            if self.train_fn is not None:
                out = self.train_fn(model, data, ctx)
                metrics = dict(out) if isinstance(out, dict) else {"loss": float(out)}
                self._check_loss(metrics.get("loss", 0.0), work, "the training step")
                metrics.setdefault("samples_processed", float(epochs * n))
            else:
                metrics = self._train(model, data, ctx, work, control.corrections if control else (), bm.params)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        delta = self._delta(bm, work)
        if self.freeze:
            for e in work.global_params.spec.entries:
                if frozen_names([e.name], self.freeze):
                    delta[e.offset : e.offset + e.size] = 0
        if control is not None:  # SCAFFOLD: the new client control variate and its change, from this delta
            control.finish(work, delta, int(metrics.get("steps", 0)), self.lr, n)
        if getattr(self, "clients_at_once", 1) > 1:
            metrics["vectorised"] = 0.0
        work.update = Update(work.client, n, work.round - 1, delta, metrics)

    def _frozen_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        if not self.freeze:
            return []
        named = dict(model.named_parameters())
        return [named[n] for n in frozen_names(list(named), self.freeze) if named[n].requires_grad]

    def _delta(self, bm: BoundModel, work: ClientWork) -> np.ndarray:
        flat = work.global_params.flat
        delta = np.subtract(bm.read(), flat, out=POOL.take(flat.size, flat.dtype))
        if not all_finite(delta):  # one BLAS pass; a huge but finite update still passes
            bad = int((~np.isfinite(delta)).sum())
            raise ClientError(f"the update holds {bad} non-finite values (NaN or inf)", client=work.client,
                              stage="LocalTrain", round=work.round,
                              fix="lower the learning rate or clip gradients; check the client's data")
        return delta

    def _train(self, model: torch.nn.Module, data: Any, ctx: TrainContext, work: ClientWork,
               corrections: Sequence[torch.Tensor] = (),
               params: Sequence[torch.nn.Parameter] | None = None) -> dict[str, float]:
        x, y = as_tensor(data.x, ctx.device), as_tensor(data.y, ctx.device)
        n = len(y)
        trainable = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        opt: Any = (self.optimizer(trainable) if self.optimizer is not None
                    else PlainSGD(trainable, self.lr) if ctx.device.type == "cpu" else SGD(self.lr)(trainable))
        loss_fn = self.loss or F.cross_entropy
        anchors = [p.detach().clone() for p in trainable] if self.mu > 0 else []
        total, done, processed = 0.0, 0, 0
        limit = ctx.steps if ctx.steps is not None else math.inf
        budget = work.sample_budget()  # a device cut-off: stop in time, send what it has
        epoch = 0
        while done < limit and (ctx.steps is not None or epoch < ctx.epochs):
            perm = torch.from_numpy(ctx.rng.permutation(n)).to(ctx.device)
            for i in range(0, n, ctx.batch_size):
                if done >= limit:
                    break
                idx = perm[i : i + ctx.batch_size]
                size = min(ctx.batch_size, n - i)
                if processed + size > budget:
                    limit = done
                    break
                opt.zero_grad(set_to_none=True)
                try:
                    out = model(x[idx])
                except (IndexError, RuntimeError, ValueError, TypeError) as e:
                    raise ClientError(
                        f"the model failed on a batch of shape {tuple(x[idx].shape)}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}",
                        client=work.client, stage="LocalTrain", round=work.round,
                        fix="check that the model's input size fits the client's features (and, with "
                            "BatchNorm, that no batch holds a single sample: set batch_size accordingly)",
                    ) from None
                try:
                    loss = loss_fn(out, y[idx])
                except (IndexError, RuntimeError, ValueError) as e:
                    raise self._misfit(e, out, y, work) from None
                loss.backward()
                if anchors:  # FedProx: the gradient of mu/2 ||w - w_global||^2
                    with torch.no_grad():
                        for p, p0 in zip(trainable, anchors):
                            if p.grad is not None:
                                p.grad.add_(p.detach() - p0, alpha=self.mu)
                if corrections:  # SCAFFOLD: the gradient corrected by c - c_i (the controls' difference)
                    with torch.no_grad():
                        for p, corr in zip(trainable, corrections):
                            if p.grad is not None:
                                p.grad.add_(corr)
                opt.step()
                lv = float(loss.detach())
                self._check_loss(lv, work, f"step {done + 1}")
                total += lv
                done += 1
                processed += size
            epoch += 1
        return {"loss": total / max(done, 1), "steps": float(done), "samples_processed": float(processed)}

    @staticmethod
    def _check_loss(value: float, work: ClientWork, where: str) -> None:
        if not math.isfinite(value):
            raise ClientError(f"{where} gave a non-finite loss ({value})", client=work.client,
                              stage="LocalTrain", round=work.round,
                              fix="lower the learning rate, clip gradients, or check the client's data "
                                  "for NaN/inf")

    @staticmethod
    def _misfit(e: Exception, out: torch.Tensor, y: torch.Tensor, work: ClientWork) -> ClientError:
        labels = f"labels of shape {tuple(y.shape)}"
        if y.dtype in (torch.int64, torch.int32) and y.numel():
            labels += f" with values {int(y.min())}..{int(y.max())}"
        return ClientError(
            f"the loss failed on the model's output of shape {tuple(out.shape)} and {labels}: "
            f"{type(e).__name__}: {str(e).splitlines()[0]}",
            client=work.client, stage="LocalTrain", round=work.round,
            fix="make the model's last layer produce one output per class (or pass a loss= that fits "
                "the labels)",
        )


def frozen_names(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` matched by ``patterns``: a pattern matches a name equal to it, a name under it as a
    module (``"head"`` matches ``"head.weight"``), or a shell wildcard (``"*.bias"``).

    Example:
        >>> frozen_names(["body.0.weight", "head.weight", "head.bias"], ["head"])
        ['head.weight', 'head.bias']
    """
    return [n for n in names
            if any(n == p or n.startswith(p + ".") or fnmatch.fnmatchcase(n, p) for p in patterns)]


class SGD:
    """Picklable SGD factory for ``LocalTrain(optimizer=...)``: ``SGD(lr, momentum)(params)``.

    A fresh optimizer per client and round (the momentum buffer starts at zero each time, as in FedAvg's
    and FedBABU's reference code). It is saved in the pipeline spec by its settings, so a run that uses it
    resumes without the pipeline being passed again. The default optimizer of ``LocalTrain`` is
    ``SGD(lr)``.

    Example:
        >>> import torch
        >>> opt = SGD(0.1, momentum=0.9)(torch.nn.Linear(2, 1).parameters())
        >>> type(opt).__name__, opt.defaults["momentum"]
        ('SGD', 0.9)
    """

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        if not 0 <= momentum < 1:
            raise ConfigError(f"SGD(momentum={momentum}): must be in [0, 1)", fix="e.g. momentum=0.9")
        self.lr = lr
        self.momentum = momentum

    def settings(self) -> dict[str, float]:
        """The constructor's keyword arguments (saved in the pipeline spec)."""
        return {"lr": self.lr, "momentum": self.momentum}

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr}, momentum={self.momentum})"

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
